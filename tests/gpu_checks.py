"""Checks for a machine with one GPU, as the README's "First run on GPUs" reports them. Not collected by
pytest (CI has no GPU); each is a plain command over the real scripts:

    python tests/gpu_checks.py checkpoint WORLD OUT           # a random Qwen2.5-VL of real widths (16 x 2048,
                                                              # MLP 11008, 16 / 2 heads: 1.24B) on WORLD's tokenizer
    python tests/gpu_checks.py memory TRAIN_GRPO_FLAGS...     # train_grpo.main, each phase's allocated GiB printed
    python tests/gpu_checks.py flash sft|grpo WORLD OUT       # the flash-attn branches on CUDA tensors, with
                                                              # tests/flash_attn_standin.py as the flash_attn package
    python tests/gpu_checks.py sdpa-flash TRAIN_GRPO_FLAGS... # train_grpo.main with --attention sdpa's training
                                                              # passes held to SDPA's flash kernel

WORLD is a `python synthetic.py --preset tiny --out WORLD` folder (with `make_cold_data.py build` output in
WORLD/cold/cold.jsonl for `flash sft`).
"""

import importlib.machinery
import json
import os
import shutil
import sys
import time
import types
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def real_width_checkpoint(world, out, layers=16, hidden=2048, intermediate=11008, heads=16, kv_heads=2):
    """WORLD's model config with Qwen2.5-VL-3B-like text widths, random bf16 weights, WORLD's tokenizer
    and image processor."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    source = os.path.join(world, "model")
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    text, head_dim = config["text_config"], hidden // heads
    text.update(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                num_key_value_heads=kv_heads, num_hidden_layers=layers, layer_types=["full_attention"] * layers)
    text["rope_parameters"]["mrope_section"] = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]  # 16:24:24
    config["vision_config"]["out_hidden_size"] = hidden
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config)).to(torch.bfloat16)
    model.save_pretrained(out)
    for name in os.listdir(source):
        if name not in ("config.json", "model.safetensors"):
            shutil.copy(os.path.join(source, name), out)
    print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")


def memory_by_phase(argv):
    """train_grpo.main(argv), printing for each rollout, frozen log-prob pass, update and optimizer step the
    allocated GiB before it, its peak and after it (the peak counter reset at each phase)."""
    import train_grpo

    def probed(owner, name):
        original = getattr(owner, name)

        def call(*args, **kwargs):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before, start = torch.cuda.memory_allocated(), time.perf_counter()
            result = original(*args, **kwargs)
            torch.cuda.synchronize()
            print(f"MEM {name:20s} before {before / 2**30:.2f} peak {torch.cuda.max_memory_allocated() / 2**30:.2f} "
                  f"after {torch.cuda.memory_allocated() / 2**30:.2f} reserved {torch.cuda.memory_reserved() / 2**30:.2f}"
                  f" GiB, {time.perf_counter() - start:.2f} s", flush=True)
            return result
        setattr(owner, name, call)

    for name in ("rollout", "frozen_logprobs", "accumulate_gradients"):
        probed(train_grpo, name)
    probed(torch.optim.AdamW, "step")
    train_grpo.main(argv)


def flash_standin(which, world, out):
    """train_sft (paper preset) or two GRPO steps with `import flash_attn` answered by the stand-in, which
    checks the kernels' contracts on the tensors it gets; prints how many calls of each ran, in which
    dtype (all on CUDA: model.use_flash opens the flash branches for CUDA tensors only). The stand-in
    reads tensors on the host, which a CUDA graph capture refuses: generation runs without graphs."""
    from tests import flash_attn_standin

    calls = []
    package = types.ModuleType("flash_attn")
    package.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    package.flash_attn_varlen_func = flash_attn_standin.recorded(flash_attn_standin.flash_attn_varlen_func, calls)
    package.flash_attn_with_kvcache = flash_attn_standin.recorded(flash_attn_standin.flash_attn_with_kvcache, calls)
    sys.modules["flash_attn"] = package
    import generate
    import train_grpo
    import train_sft

    sample = generate.generate
    generate.generate = lambda *args, **kwargs: sample(*args, **{**kwargs, "cuda_graphs": False})
    os.environ.setdefault("WANDB_MODE", "disabled")
    if which == "sft":
        train_sft.main(["--model", os.path.join(world, "model"), "--data", os.path.join(world, "cold", "cold.jsonl"),
                        "--out", out, "--epochs", "1", "--global-batch", "4", "--eval-holdout", "0", "--save-every", "0"])
    else:
        train_grpo.main(["--stage", "1", "--stages", "128x8x2", "--cold-start", os.path.join(world, "model"),
                         "--data", os.path.join(world, "data", "rl.jsonl"), "--out-root", out,
                         "--prompts-per-rollout", "8", "--prompts-per-update", "8", "--save-every", "0",
                         "--min-pixels", "784", "--max-pixels", "12544"])
    print("flash-attn calls:", dict(Counter(calls)))


def sdpa_flash_only(argv):
    """train_grpo.main(argv) (with --attention sdpa) with its frozen log-prob passes and updates allowed
    SDPA's flash kernel only: a call that would take another kernel (a mask, 3-d inputs, more queries than
    keys under is_causal) stops the run with "No available kernel". For WORLD's data, whose images are all
    one size (mixed sizes pad the vision tower's windows, under a mask). Generation keeps every kernel:
    its decode step attends one query per row under a mask."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import train_grpo

    for name in ("frozen_logprobs", "accumulate_gradients"):
        def flash_only(*args, _original=getattr(train_grpo, name), **kwargs):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return _original(*args, **kwargs)
        setattr(train_grpo, name, flash_only)
    train_grpo.main(argv)
    print("sdpa-flash: every training pass ran on SDPA's flash kernel")


if __name__ == "__main__":
    command, *rest = sys.argv[1:] or ["-h"]
    if command == "checkpoint":
        real_width_checkpoint(*rest)
    elif command == "memory":
        memory_by_phase(rest)
    elif command == "flash":
        flash_standin(*rest)
    elif command == "sdpa-flash":
        sdpa_flash_only(rest)
    else:
        sys.exit(__doc__)
