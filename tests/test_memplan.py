"""memplan.py: the resident state against a hand count of the tiny checkpoint's shards; the rollout,
update and optimizer phases against the live tensor bytes of a real CPU step of the same code (FSDP2
at bf16 compute, one process); the command line on the released 7B config, without weights or data."""

import json
import os
import weakref

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

import data
import generate as G
import memplan
import model as M
import ptst
import train_grpo
import train_sft
from tests import tiny
from tests.scripts import ROOT
from train_utils import parse_config

RELEASED_7B = os.path.join(ROOT, "configs", "Qwen2.5-VL-7B-Instruct")
GIB = 2**30


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages made while active that are still alive (`now`) and the most at
    once (`peak`). A storage counts from the op that returns it until it is freed (a weakref
    finalizer); FSDP2 frees and refills its unsharded parameters by resizing their storages in place,
    which no op reports, so UntypedStorage.resize_ is followed too."""

    def __init__(self):
        super().__init__()
        self.sizes, self.now, self.peak = WeakIdKeyDictionary(), 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            t = t._local_tensor if isinstance(t, DTensor) else t
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.untyped_storage() not in self.sizes:
                size = [t.untyped_storage().nbytes()]
                self.sizes[t.untyped_storage()] = size
                weakref.finalize(t.untyped_storage(), self._add, size, -1)
                self._add(size, 1)
        return out

    def _add(self, size, sign):
        self.now += sign * size[0]
        self.peak = max(self.peak, self.now)

    def _resize(self, storage, nbytes):
        self._resize_storage(storage, nbytes)
        size = self.sizes.get(storage)
        if size is not None:
            self._add(size, -1)
            size[0] = storage.nbytes()
            self._add(size, 1)

    def __enter__(self):
        self._resize_storage = torch.UntypedStorage.resize_
        torch.UntypedStorage.resize_ = lambda storage, nbytes: self._resize(storage, nbytes)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize_storage
        return super().__exit__(*exc)

    def measure(self):
        """Start a phase: its peak counts from now."""
        self.peak = self.now


# ----------------------------------------------------------------------------- the resident state by hand

def test_resident_shards_equal_the_hand_count(tmp_path):
    """tests/tiny.py's checkpoint. Text: embedding and head 320 x 64 each, 2 layers of q 64x64+64,
    k and v 64x32+32, o 64x64, MLP 3 x 64x128, norms 2 x 64, the final norm 64: 115,264 elements,
    trained. Vision: patch embedding 32 x 1176, 3 blocks of norms 2 x 32, qkv 32x96+96, proj 32x32+32,
    MLP 2 x (32x64+64) + 64x32+32, merger norm 32, 128x128+128 and 128x64+64: 94,208, frozen.
    Over 2 ranks (every dim 0 even: no padding): fp32 masters 4 x 209,472 / 2, AdamW 2 x 4 x 115,264 / 2,
    a bf16 reference 2 x 209,472 / 2."""
    tiny.save_vl(tmp_path)
    cfg = parse_config(train_grpo.GRPOConfig, train_grpo.PRESETS, ["--init", str(tmp_path)])
    _, phases = memplan.grpo_phases(cfg, ptst.Stage(64, 4, 1), M.build_model(tmp_path), world=2)
    assert phases[0].parts == {"parameter shards": 418_944, "AdamW states": 461_056, "reference shards": 209_472}
    cfg.ref_cpu_offload = True
    _, phases = memplan.grpo_phases(cfg, ptst.Stage(64, 4, 1), M.build_model(tmp_path), world=2)
    assert phases[0].parts["reference shards"] == 0
    assert memplan.shard_elements((10, 4), 4) == 12  # ceil(10 / 4) = 3 rows of 4: FSDP2 pads the last shard


# ----------------------------------------------------------------------------- the plan against a measured step

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 256, 1024, 4, 1024
GRID = (1, 8, 8)  # 64 patches, 16 image tokens
SAMPLES, LENGTH = 4, 128  # G responses at the cap L
MICRO_BATCH = memplan.PROMPT_TEXT_TOKENS + 16 + SAMPLES * LENGTH  # a prompt and its 4 responses
KV_SLOTS, NEW_TOKENS = 3, 4  # a rollout of 2 prompts x 4 samples through 3 slots: refills


def write_checkpoint(path):
    """A random Qwen2.5-VL whose weights and activations dwarf the plan's small uncounted tensors."""
    with open(os.path.join(ROOT, "tests", "data", "configs", "qwen2_5_vl_released.json")) as f:
        raw = json.load(f)
    raw.update(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS, vocab_size=VOCAB,
               rope_scaling={"type": "mrope", "mrope_section": [16, 8, 8]}, num_attention_heads=4,
               **{key: VOCAB - i for i, key in enumerate(("image_token_id", "video_token_id", "vision_start_token_id",
                                                           "vision_end_token_id", "vision_token_id"), start=1)})
    raw["vision_config"].update(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=HIDDEN)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)
    model = M.build_model(path).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.02 * torch.randn(p.shape, generator=generator) + (p.dim() == 1))
    M.save_model(model, path)


def plan_config(path, kv_budget_gib):
    args = ["--preset", "toy", "--init", path, "--param-dtype", "bfloat16", "--activation-checkpointing", "true",
            "--micro-batch-tokens", str(MICRO_BATCH), "--max-pixels", str(16 * memplan.PIXELS_PER_TOKEN),
            "--prompts-per-rollout", "2", "--prompts-per-update", "2", "--kv-budget-gib", repr(kv_budget_gib)]
    return parse_config(train_grpo.GRPOConfig, train_grpo.PRESETS, args)


def prompt(model, generator):
    """An image of GRID and PROMPT_TEXT_TOKENS of text: the plan's prompt at max_pixels."""
    text = torch.randint(0, 100, (memplan.PROMPT_TEXT_TOKENS - 1,), generator=generator).tolist()
    ids = text + [model.cfg.vision_start_token_id] + [model.cfg.image_token_id] * (GRID[1] * GRID[2] // 4)
    return {"input_ids": ids, "pixel_values": torch.randn(GRID[1] * GRID[2], tiny.PATCH_DIM, generator=generator),
            "image_grid_thw": torch.tensor([GRID])}


@pytest.fixture(scope="module")
def measured_step(tmp_path_factory):
    """Live bytes of a GRPO step's phases as train_grpo.main runs them, in one process at bf16 compute
    (FSDP2-wrapped: the GPU path): a policy and a reference loaded shard by shard; an update of one
    packed micro-batch (a prompt and 4 responses at the cap) and an optimizer step, which makes
    AdamW's states; the measured step: an update of two such micro-batches (gradients accumulate) and
    an optimizer step; a rollout within a KV budget of 3 slots. Returns (checkpoint, measured bytes
    per phase)."""
    path = str(tmp_path_factory.mktemp("memplan") / "model")
    write_checkpoint(path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    generator = torch.Generator().manual_seed(0)
    measured = {}
    try:
        with LiveBytes() as live:
            policy = M.load_sharded(path, "cpu", param_dtype=torch.bfloat16, activation_checkpointing=True)
            policy.visual.requires_grad_(False)
            reference = M.load_sharded(path, "cpu", dtype=torch.bfloat16, param_dtype=torch.bfloat16,
                                       activation_checkpointing=False).requires_grad_(False)
            params = [p for p in policy.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-6, foreach=True)
            group = {**prompt(policy, generator), "rows": list(range(SAMPLES)),
                     "continuations": [torch.randint(0, 100, (LENGTH,), generator=generator).tolist()
                                       for _ in range(SAMPLES)]}
            # the second step's update and optimizer are the ones measured (a later phase overwrites)
            for phase in ("update", "optimizer", "update", "optimizer", "resident", "rollout"):
                live.measure()
                if phase == "update":
                    policy.train()
                    for _ in range(2 if "optimizer" in measured else 1):
                        batch, = data.pack_shared_prompts([group], MICRO_BATCH)
                        _, logp, _, mask = train_grpo.response_logprobs(policy, batch, LENGTH, 1.0, "cpu",
                                                                        with_entropy=True)
                        loss, _ = train_grpo.policy_loss(logp, logp.detach(), torch.randn(SAMPLES), mask,
                                                         ref_logp=logp.detach() + 0.1, kl_coef=0.01)
                        loss.backward()
                        del batch, logp, mask, loss
                elif phase == "optimizer":
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                elif phase == "rollout":
                    policy.eval()
                    prompts = [prompt(policy, generator) for _ in range(2)]
                    budget = G.kv_budget_tokens(policy.cfg, torch.bfloat16, kv_gib(policy.cfg))
                    completions = G.generate(policy, prompts, eos_ids=[], n=SAMPLES, max_new_tokens=NEW_TOKENS,
                                             kv_budget=budget)
                    assert [len(c.token_ids) for c in completions] == [NEW_TOKENS] * 2 * SAMPLES
                measured[phase] = live.now if phase == "resident" else live.peak
            del policy, reference, optimizer
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)
    return path, measured


def kv_gib(cfg):
    """A budget of KV_SLOTS slots of one prompt + NEW_TOKENS positions."""
    slot = memplan.PROMPT_TEXT_TOKENS + 16 + NEW_TOKENS
    return KV_SLOTS * slot * G.kv_bytes_per_token(cfg, torch.bfloat16) / GIB


@pytest.mark.parametrize("phase", ["update", "optimizer", "rollout"])
def test_plan_is_within_a_quarter_of_the_measured_peak(measured_step, phase):
    """Each phase of the plan of that step (world 1, bf16 compute, rollouts of NEW_TOKENS at the cap
    through the same KV budget) against the most live tensor bytes measured in it, and so is what the
    phase adds to the resident state, which the plan counts exactly. The plan leaves out small tensors
    (indices, masks, per-token scalars), and on CPU attention takes SDPA's path, which keeps padded
    copies that flash-attn does not. Measured: plan / measured 0.99 (update), 1.00 (optimizer), 0.98
    (rollout); above the resident state 0.98, 1.00, 0.94."""
    path, measured = measured_step
    model = M.build_model(path)
    cfg = plan_config(path, kv_gib(model.cfg))
    _, phases = memplan.grpo_phases(cfg, ptst.Stage(NEW_TOKENS if phase == "rollout" else LENGTH, SAMPLES, 1),
                                    model, world=1)
    resident, planned = phases[0], {p.name: p for p in phases}[phase]
    assert not planned.problem
    assert resident.total == pytest.approx(measured["resident"], rel=0.01)
    assert planned.total == pytest.approx(measured[phase], rel=0.25), (planned.parts, measured[phase])
    assert planned.total - resident.total == pytest.approx(measured[phase] - measured["resident"], rel=0.25)
    if phase == "rollout":
        assert f"({KV_SLOTS} slots x" in " ".join(planned.parts)


# ----------------------------------------------------------------------------- the chunked head

def head_peak(rows, vocab, hidden, dtype, with_entropy, backward):
    """Live bytes token_logprobs (default chunk) adds at its peak over `rows` rows, beyond its inputs,
    in forward or in backward (a loss on the log-probs only, as every trainer's; beyond what forward
    left). Its outputs and per-row scalars count too (a few KiB)."""
    g = torch.Generator().manual_seed(0)
    with LiveBytes() as live:  # inputs made inside, so views of them are not counted as new
        hidden_states = torch.randn(rows, hidden, generator=g).to(dtype).requires_grad_()
        weight = (0.1 * torch.randn(vocab, hidden, generator=g)).to(dtype).requires_grad_()
        targets = torch.randint(0, vocab, (rows,), generator=g)
        live.measure()
        base = live.now
        out = M.token_logprobs(hidden_states, weight, targets, temperature=0.7, with_entropy=with_entropy)
        logp = out[0] if with_entropy else out
        if backward:
            live.measure()
            base = live.now
            torch.autograd.grad(logp.sum(), (hidden_states, weight))
    return live.peak - base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("phase", ["forward", "forward with entropy", "backward"])
def test_head_bytes_is_the_live_peak_of_token_logprobs(dtype, phase):
    """memplan.head_bytes against the bytes token_logprobs holds at once, over 3 blocks of rows (the
    last one short). Backward also makes the hidden states' gradient (memplan counts it beside)."""
    rows, vocab, hidden, a = 300, 1000, 128, dtype.itemsize
    backward = phase == "backward"
    planned = memplan.head_bytes(rows, vocab, hidden, a, with_entropy="entropy" in phase, backward=backward)
    planned += a * rows * hidden if backward else 0
    assert M.head_chunk(hidden) == 128
    assert head_peak(rows, vocab, hidden, dtype, "entropy" in phase, backward) == pytest.approx(planned, rel=0.01)


def test_head_peak_is_a_small_multiple_of_its_weight_whatever_the_tokens():
    """Issue 24: a [chunk, vocab] block is no larger than the weight's fp32 gradient and one buffer
    serves every block, so 4,096 tokens through a head of 64 x 2,000 hold one such size in forward
    and two in backward (the buffer and the weight's gradient), plus per-token outputs and the hidden
    states' gradient; the naive log_softmax holds several [4096, 2000] fp32 matrices (31 MiB each, 64
    weights' worth)."""
    rows, vocab, hidden = 4096, 2000, 64
    weight_fp32, per_row = 4 * vocab * hidden, 16 * rows
    assert head_peak(rows, vocab, hidden, torch.float32, False, False) <= weight_fp32 + per_row
    assert head_peak(rows, vocab, hidden, torch.float32, False, True) <= 2 * weight_fp32 + per_row + 4 * rows * hidden


# ----------------------------------------------------------------------------- the command line

def test_plan_of_the_released_7b_needs_only_its_config(tmp_path, capsys):
    """Issue 16's command on a fresh clone: the released config, no weights, tokenizer or data, no
    process group; exit 0. A GPU too small for a phase gets one warning line naming it; the stage,
    the KV budget and the micro-batch change the plan."""
    args = ["--plan", "--init", RELEASED_7B, "--world-size", "8", "--data", str(tmp_path / "none.parquet")]
    assert train_grpo.main(["--stage", "1", *args, "--gpu-memory-gib", "80"]) == 0
    stage1 = capsys.readouterr().out
    assert "8.29B parameters" in stage1 and "warning" not in stage1
    assert not dist.is_initialized()

    assert train_grpo.main(["--stage", "2", *args, "--gpu-memory-gib", "30", "--kv-budget-gib", "8",
                            "--micro-batch-tokens", "65536"]) == 0
    small = capsys.readouterr().out
    warnings = [line for line in small.splitlines() if line.startswith("warning")]
    assert sorted(warnings)[0].startswith("warning: rollout needs 37.5 GiB per GPU, more than --gpu-memory-gib 30")
    assert len(warnings) == 2 and sorted(warnings)[1].startswith("warning: update needs")
    assert "8192 tokens x 8 samples" in small and "KV budget 8 GiB" in small and "micro-batches of 30437" not in small

    assert train_sft.main(["--plan", "--model", RELEASED_7B, "--world-size", "8", "--gpu-memory-gib", "10",
                           "--data", str(tmp_path / "none.json")]) == 0
    sft = capsys.readouterr().out
    assert "reference" not in sft and {line.split()[1] for line in sft.splitlines() if line.startswith("warning")} \
        == {"resident", "update", "optimizer"}
    assert "--attention sdpa" not in stage1 + small + sft  # flash-attn's attention is what the rows count

    # without flash-attn the plan says what it leaves out; the rows stay flash-attn's
    assert train_grpo.main(["--stage", "1", *args, "--gpu-memory-gib", "80", "--attention", "sdpa"]) == 0
    sdpa = capsys.readouterr().out.splitlines()
    assert sdpa[-1].startswith("not counted either: --attention sdpa's padded batches")
    assert sdpa[:-1] == stage1.splitlines()
