"""Speed and memory of our pieces against the peer a researcher would otherwise use, measured in
the same run and printed as ratios.

    python bench.py logprobs     # token_logprobs vs naive log_softmax at vocab 151,936 x 4,096 tokens
    python bench.py generate     # generate.generate vs transformers generate, greedy, batch 1 and 8 prompts x 8
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

import model as M


# -----------------------------------------------------------------------------
# logprobs: chunked head + log-softmax vs the naive full-vocab one (forward + backward)

def _logprobs_worker(impl, tokens, vocab, hidden, device):
    """One measurement in a fresh process, so CPU peak RSS belongs to this implementation alone."""
    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, device=device, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=device) * hidden**-0.5).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    if impl == "naive":
        logp = torch.log_softmax((h @ w.t()).float(), dim=-1).gather(1, targets[:, None])[:, 0]
    else:
        logp = M.token_logprobs(h, w, targets)
    logp.sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_bytes": peak}))


def bench_logprobs(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    for impl in ("naive", "chunked"):
        out = subprocess.run([sys.executable, __file__, "_logprobs_worker", impl, str(args.tokens), str(args.vocab),
                              str(args.hidden), device], capture_output=True, text=True, check=True)
        results[impl] = json.loads(out.stdout.strip().splitlines()[-1])
    naive, ours = results["naive"], results["chunked"]
    print(f"token_logprobs, {args.tokens} tokens x vocab {args.vocab}, hidden {args.hidden}, {device}, fwd+bwd")
    print(f"{'':10s}{'peak MiB':>12s}{'seconds':>10s}")
    for name, r in (("naive", naive), ("chunked", ours)):
        print(f"{name:10s}{r['peak_bytes'] / 2**20:12.0f}{r['seconds']:10.2f}")
    print(f"peak memory ratio chunked/naive: {ours['peak_bytes'] / naive['peak_bytes']:.3f}  "
          f"(target <= 0.25)   time ratio chunked/naive: {ours['seconds'] / naive['seconds']:.2f}")


# -----------------------------------------------------------------------------
# generate: our KV-cached, group-aware loop vs transformers' generate on the same checkpoint

def bench_vl_config(vocab, image_token_id):
    """A random-weight Qwen2.5-VL big enough for CPU timings to mean something: 4 layers of width
    512 (8 heads, 2 KV heads), a 4-block vision tower; the vision specials at the top of the vocab."""
    from transformers import Qwen2_5_VLConfig

    ids = dict(image_token_id=image_token_id, video_token_id=image_token_id + 1,
               vision_start_token_id=image_token_id + 2, vision_end_token_id=image_token_id + 3)
    return Qwen2_5_VLConfig(
        text_config=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=vocab, rope_theta=1e6,
                         rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]}),
        vision_config=dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=512,
                           fullatt_block_indexes=[1, 3], window_size=112, patch_size=14, temporal_patch_size=2,
                           spatial_merge_size=2),
        pad_token_id=0, **ids)


def bench_prompts(count, image_token_id, seed):
    """`count` prompts, each random text (20-50 tokens), one image (grids 8x8 to 16x16 patches), more text."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for i in range(count):
        side = 8 + 2 * (i % 5)
        grid = torch.tensor([[1, side, side]])
        n_text = int(torch.randint(20, 51, (1,), generator=g))
        text = torch.randint(0, image_token_id, (n_text,), generator=g).tolist()
        image = [image_token_id + 2] + [image_token_id] * (side * side // 4) + [image_token_id + 3]
        prompts.append({"input_ids": text[:5] + image + text[5:], "image_grid_thw": grid,
                        "pixel_values": torch.randn(side * side, 3 * 2 * 14 * 14, generator=g)})
    return prompts


def hf_batch(prompts, n):
    """transformers' inputs for the same work: every prompt repeated n times, left-padded."""
    rows = [p for p in prompts for _ in range(n)]
    width = max(len(p["input_ids"]) for p in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, p in enumerate(rows):
        input_ids[i, width - len(p["input_ids"]):] = torch.tensor(p["input_ids"])
        attention_mask[i, width - len(p["input_ids"]):] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask,
                pixel_values=torch.cat([p["pixel_values"] for p in rows]),
                image_grid_thw=torch.cat([p["image_grid_thw"] for p in rows]))


def bench_generate(args):
    """Greedy, EOS off so every row makes exactly --new-tokens tokens; each timing is the best of
    --repeats runs (the machine may be shared), ours and transformers' alternating."""
    import generate as G
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLForConditionalGeneration

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    image_token_id = args.vocab - 4
    with tempfile.TemporaryDirectory() as path:
        torch.manual_seed(0)
        Qwen2_5_VLForConditionalGeneration(bench_vl_config(args.vocab, image_token_id)).save_pretrained(path)
        ours = M.load_model(path, dtype=dtype, device=device).eval()
        hf = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device).eval()
    banned = G.vision_token_ids(ours)

    def run_ours(prompts, n, new_tokens):
        out = G.generate(ours, prompts, eos_ids=(), n=n, max_new_tokens=new_tokens, greedy=True)
        return [c.token_ids for c in out]

    @torch.no_grad()
    def run_hf(prompts, n, new_tokens):
        batch = {k: v.to(device) for k, v in hf_batch(prompts, n).items()}
        out = hf.generate(**batch, max_new_tokens=new_tokens, do_sample=False, suppress_tokens=banned,
                          eos_token_id=None, pad_token_id=0)
        return out[:, batch["input_ids"].shape[1]:].tolist()

    print(f"generate, greedy, {args.new_tokens} new tokens per row, Qwen2.5-VL 4 layers x 512, vocab {args.vocab}, "
          f"one image per prompt, {device} {dtype}, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'prompts x samples':>18s}{'transformers tok/s':>20s}{'ours tok/s':>12s}{'ratio':>8s}{'same tokens':>13s}")
    run_ours(bench_prompts(1, image_token_id, seed=1), 1, 2)  # warm-up: first-call costs of both
    run_hf(bench_prompts(1, image_token_id, seed=1), 1, 2)
    for n_prompts, n in ((1, 1), (8, 8)):
        prompts = bench_prompts(n_prompts, image_token_id, seed=0)
        seconds, tokens = {run_hf: [], run_ours: []}, {}
        for _ in range(args.repeats):
            for run in seconds:
                start = time.perf_counter()
                tokens[run] = run(prompts, n, args.new_tokens)
                seconds[run].append(time.perf_counter() - start)
        hf_seconds, our_seconds = min(seconds[run_hf]), min(seconds[run_ours])
        total = n_prompts * n * args.new_tokens
        same = sum(a == b for a, b in zip(tokens[run_hf], tokens[run_ours]))
        print(f"{f'{n_prompts} x {n}':>18s}{total / hf_seconds:20.1f}{total / our_seconds:12.1f}"
              f"{hf_seconds / our_seconds:8.2f}{f'{same}/{len(tokens[run_ours])}':>13s}")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_logprobs_worker":
        impl, tokens, vocab, hidden, device = sys.argv[2:]
        return _logprobs_worker(impl, int(tokens), int(vocab), int(hidden), device)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    p = sub.add_parser("logprobs")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=256)
    p.set_defaults(run=bench_logprobs)
    p = sub.add_parser("generate")
    p.add_argument("--new-tokens", type=int, default=64)
    # 8,192: the head is then ~25% of the bench model's per-token matmuls (7B Qwen2.5-VL: ~8%);
    # at 32K it would be ~60% and both implementations would mostly time the same head matmul
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores; 1 on a shared box)")
    p.set_defaults(run=bench_generate)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    args.run(args)


if __name__ == "__main__":
    main()
