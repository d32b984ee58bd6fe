"""Speed and memory of our pieces against the peer a researcher would otherwise use, measured in
the same run and printed as ratios.

    python bench.py logprobs     # token_logprobs vs naive log_softmax at vocab 151,936 x 4,096 tokens
    python bench.py sft          # one train_sft.py step vs one TRL SFTTrainer step, packed, same model and records;
                                 # MFU against the fp32 GEMM peak measured in the same run (pip install -r
                                 # requirements-bench.txt)
    python bench.py generate     # generate.generate vs transformers generate, greedy, batch 1 and 8 prompts x 8
    python bench.py rollout      # a long-tailed GRPO rollout: ours within a KV budget vs today's engine vs
                                 # transformers; FSDP2-wrapped decode vs unwrapped on 1 and 2 gloo ranks
    python bench.py rollout-estimate  # one stage-1 and one stage-2 rollout step at 7B on one 80 GB GPU per rank:
                                      # our engine's replayed schedule x a per-step cost model, vs vLLM's published rate
    python bench.py grpo-step    # one train_grpo.py step vs one TRL GRPOTrainer step, same model and workload;
                                 # each side's matrix products against the GEMM peak measured in the same run
                                 # (pip install -r requirements-bench.txt)
"""

import argparse
import concurrent.futures
import contextlib
import functools
import io
import json
import math
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque

import torch

import model as M


def _quietly(fn, threads, *args):
    torch.set_num_threads(threads)
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def in_fresh_process(fn, threads, *args):
    """fn(*args) in a new interpreter (spawned) with `threads` torch threads and its prints silenced: each
    side of a comparison starts from a clean heap (its peak memory its own), with none of the other
    side's imports, settings or worker threads."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_quietly, fn, threads, *args).result()


# -----------------------------------------------------------------------------
# logprobs: chunked head + log-softmax vs the naive full-vocab one (forward + backward)

def _memory_kib(field):
    """A field of /proc/self/status in KiB: VmRSS (resident now) or VmHWM (the most resident since the
    last `_reset_peak_rss`)."""
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":")))


def _reset_peak_rss():
    """Start VmHWM over from the resident size now (Linux: "5" to /proc/self/clear_refs), so that a
    peak reached while importing is not mistaken for this measurement's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _logprobs_worker(impl, tokens, vocab, hidden, device):
    """One measurement, run in a fresh process (`in_fresh_process`), so the CPU peak (resident memory)
    belongs to this implementation alone: {seconds, peak_bytes}."""
    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, device=device, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=device) * hidden**-0.5).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _memory_kib("VmRSS") * 1024
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
        peak = _memory_kib("VmHWM") * 1024 - base
    return {"seconds": time.perf_counter() - start, "peak_bytes": peak}


def bench_logprobs(args):
    """Each implementation in --repeats fresh processes, alternating (naive, chunked, naive, ...), so
    a shared machine's load falls on both; the best time and the largest peak of each."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs = {"naive": [], "chunked": []}
    for _ in range(args.repeats):
        for impl, results in runs.items():
            results.append(in_fresh_process(_logprobs_worker, torch.get_num_threads(), impl, args.tokens, args.vocab,
                                            args.hidden, device))
    best = {impl: {"seconds": min(r["seconds"] for r in results), "peak_bytes": max(r["peak_bytes"] for r in results)}
            for impl, results in runs.items()}
    naive, ours = best["naive"], best["chunked"]
    print(f"token_logprobs, {args.tokens} tokens x vocab {args.vocab}, hidden {args.hidden} (chunks of "
          f"{M.head_chunk(args.hidden)} rows), {device}, fwd+bwd, best of {args.repeats}")
    print(f"{'':10s}{'peak MiB':>12s}{'seconds':>10s}")
    for name, r in best.items():
        print(f"{name:10s}{r['peak_bytes'] / 2**20:12.0f}{r['seconds']:10.2f}")
    print(f"peak memory ratio chunked/naive: {ours['peak_bytes'] / naive['peak_bytes']:.3f}  "
          f"(target <= 0.125)   time ratio chunked/naive: {ours['seconds'] / naive['seconds']:.2f} (target <= 1)")


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
                         num_key_value_heads=2, vocab_size=vocab,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}),
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


# -----------------------------------------------------------------------------
# rollout: one GRPO rollout with a long-tailed length profile, forced alike on every engine

BASELINE_COMMIT = "2778580"  # generate.py before the slot engine: a cache row per sample, compacted as rows stop


def todays_engine():
    """generate.py as of BASELINE_COMMIT, read from the git history, as a module."""
    import types

    source = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:generate.py"], cwd=os.path.dirname(__file__) or ".",
                            capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("generate_baseline")
    exec(compile(source, "generate_baseline.py", "exec"), module.__dict__)
    return module


def rollout_lengths(rows, cap, seed):
    """Each row's response length (docs/method.md §3's profile after the cold start, 75% of outputs
    under 4K and 14% over 8K of 16K): 75% short (5-25% of the cap), 11% medium (25-75%), the rest at
    the cap, shuffled. Example: 128 rows -> 96 short, 14 medium, 18 at the cap."""
    g = torch.Generator().manual_seed(seed)
    short, medium = round(0.75 * rows), round(0.11 * rows)
    fraction = torch.cat([0.05 + 0.2 * torch.rand(short, generator=g), 0.25 + 0.5 * torch.rand(medium, generator=g),
                          torch.ones(rows - short - medium)])
    return (fraction[torch.randperm(rows, generator=g)] * cap).ceil().long().clamp(1, cap)


@contextlib.contextmanager
def forced_lengths_ours(G, lengths, seed, prompt_ids, n, eos):
    """Our engine with row (p, j) stopping at its `lengths[p * n + j]`-th token: the step's sampler
    bans `eos` and then forces it at that position; the row is found on the device by its stream key."""
    keys = torch.tensor([G.stream_key(seed, i, j) for i in prompt_ids for j in range(n)])
    order = keys.argsort()
    sorted_keys, stop_at, eos = keys[order], lengths[order], torch.tensor([eos])
    draw = G.draw

    def forced(logits, keys, counts, **sampling):
        tokens, logprobs = draw(logits.index_fill(-1, eos, float("-inf")), keys, counts, **sampling)
        return torch.where(counts + 1 == stop_at[torch.searchsorted(sorted_keys, keys)], eos, tokens), logprobs
    G.draw = forced
    try:
        yield
    finally:
        G.draw = draw


@contextlib.contextmanager
def forced_lengths_baseline(B, lengths, eos):
    """Today's engine with the same forced lengths: its sampler sees the live rows in row order, one
    call per step, and a row leaves after its EOS, so the wrapper follows the live rows itself."""
    sample_next, state = B.sample_next, {"live": list(range(len(lengths))), "step": 0}

    def forced(logits, *args):
        tokens, logprobs = sample_next(logits.index_fill(-1, torch.tensor([eos]), float("-inf")), *args)
        stop = torch.tensor([int(lengths[row]) == state["step"] + 1 for row in state["live"]])
        state["live"] = [row for row, s in zip(state["live"], stop.tolist()) if not s]
        state["step"] += 1
        return torch.where(stop, eos, tokens), logprobs
    B.sample_next = forced
    try:
        yield
    finally:
        B.sample_next = sample_next


def forced_lengths_hf(lengths, width, eos):
    """transformers' LogitsProcessor for the same forced lengths (rows prompt-major, left-padded to `width`)."""
    from transformers import LogitsProcessor

    class ForceLengths(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stop = lengths.to(scores.device) == input_ids.shape[1] - width + 1
            scores[:, eos] = float("-inf")
            scores[stop] = float("-inf")
            scores[stop, eos] = 0.0
            return scores
    return ForceLengths()


def rollout_model(path, vocab):
    """bench_vl_config's random-weight Qwen2.5-VL saved to `path`; returns its image token id."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(bench_vl_config(vocab, vocab - 4)).save_pretrained(path)
    return vocab - 4


def rollout_engines(args, ours, hf, baseline, prompts, eos, banned):
    """bench_rollout's engines, name: (run(prompts, lengths) -> each row's length, tokens of cache it
    holds at most): transformers' generate, today's engine with every row at once and in calls of as
    many prompts as fit our budget, ours within --kv-budget-slots slots; lengths forced alike."""
    import generate as G
    from transformers import LogitsProcessorList

    def slot_len(prompts):
        return max(len(p["input_ids"]) for p in prompts) + args.max_tokens

    def run_ours(prompts, lengths):
        ids = range(len(prompts))
        with forced_lengths_ours(G, lengths, 0, ids, args.samples, eos):
            out = G.generate(ours, prompts, eos_ids=[eos], n=args.samples, max_new_tokens=args.max_tokens,
                             prompt_ids=ids, kv_budget=args.kv_budget_slots * slot_len(prompts),
                             check_every=args.check_every)
        return [len(c.token_ids) for c in out]

    def run_baseline(prompts, lengths, per_call):
        made = []
        for start in range(0, len(prompts), per_call):
            calls = prompts[start:start + per_call]
            rows = slice(start * args.samples, (start + len(calls)) * args.samples)
            generators = [torch.Generator().manual_seed(start + i) for i in range(len(calls))]
            with forced_lengths_baseline(baseline, lengths[rows], eos):
                out = baseline.generate(ours, calls, eos_ids=[eos], n=args.samples, max_new_tokens=args.max_tokens,
                                        generator=generators)
            made += [len(c.token_ids) for c in out]
        return made

    @torch.no_grad()
    def run_hf(prompts, lengths):
        batch = hf_batch(prompts, args.samples)
        width = batch["input_ids"].shape[1]
        out = hf.generate(**batch, max_new_tokens=args.max_tokens, do_sample=True, temperature=1.0, top_p=1.0,
                          top_k=0, suppress_tokens=banned, eos_token_id=eos, pad_token_id=0,
                          logits_processor=LogitsProcessorList([forced_lengths_hf(lengths, width, eos)]))
        return [row.tolist().index(eos) + 1 for row in out[:, width:]]  # the EOS is sampled only where forced

    rows, per_call = len(prompts) * args.samples, max(1, args.kv_budget_slots // args.samples)
    return {
        "transformers generate": (run_hf, rows * slot_len(prompts)),
        "today's engine, every row at once": (functools.partial(run_baseline, per_call=len(prompts)),
                                              rows * slot_len(prompts)),
        f"today's engine, {per_call} prompt(s) a call": (
            functools.partial(run_baseline, per_call=per_call),
            max(per_call * args.samples * slot_len(prompts[s:s + per_call]) for s in range(0, len(prompts), per_call))),
        f"ours, {args.kv_budget_slots} slots": (run_ours, args.kv_budget_slots * slot_len(prompts)),
    }


def bench_rollout(args):
    """--prompts x --samples rows (one image per prompt), temperature 1, each row's length forced by
    `rollout_lengths`, the same on every engine, timed in one run: transformers' generate (every row
    to the end), today's engine (every row at once, compacted as rows stop; and in calls of as many
    prompts as fit our budget), ours within --kv-budget-slots slots; then decode tokens/s of an
    FSDP2-wrapped model over the unwrapped one on --fsdp-ranks gloo ranks. The default budget holds
    1/8 of the rows, as a 7B stage-2 rollout (512 rows of up to 9K tokens per rank) would in ~30 GiB."""
    import generate as G
    from transformers import AutoModelForImageTextToText

    torch.set_num_threads(args.threads)
    baseline = todays_engine()
    eos = args.vocab - 5  # an ordinary token id, banned except where a row's length forces it
    lengths = rollout_lengths(args.prompts * args.samples, args.max_tokens, seed=0)
    with tempfile.TemporaryDirectory() as path:
        image_token_id = rollout_model(path, args.vocab)
        ours = M.load_model(path).eval()
        hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        fsdp = {world: fsdp_rollout(path, args, world) for world in args.fsdp_ranks}
    prompts = bench_prompts(args.prompts, image_token_id, seed=0)
    banned = G.vision_token_ids(ours)

    engines = rollout_engines(args, ours, hf, baseline, prompts, eos, banned)
    warm = bench_prompts(1, image_token_id, seed=1)
    for run, _ in engines.values():  # first-call costs of every engine
        run(warm, torch.full((args.samples,), 2))
    seconds = {}
    for name, (run, _) in engines.items():
        start = time.perf_counter()
        made = run(prompts, lengths)
        seconds[name] = time.perf_counter() - start
        if made != lengths.tolist():
            raise RuntimeError(f"{name} did not follow the forced lengths")

    tokens = int(lengths.sum())
    print(f"rollout: {args.prompts} prompts x {args.samples} samples, one image each, temperature 1, lengths forced "
          f"(75% 5-25% of {args.max_tokens}, 11% 25-75%, 14% at it): {tokens} tokens; Qwen2.5-VL 4 layers x 512, "
          f"vocab {args.vocab}; cpu fp32, {torch.get_num_threads()} thread(s)")
    print(f"{'engine':38s}{'KV tokens':>10s}{'seconds':>9s}{'tokens/s':>10s}")
    for name, (_, cache) in engines.items():
        print(f"{name:38s}{cache:10d}{seconds[name]:9.2f}{tokens / seconds[name]:10.1f}")
    peer, all_rows, same_budget, ours_s = seconds.values()
    print(f"ours / today's engine in the same budget: {same_budget / ours_s:.2f} (target >= 2);  "
          f"/ today's engine with every row's cache: {all_rows / ours_s:.2f};  / transformers: {peer / ours_s:.2f} "
          f"(target >= 4)")
    for world, ranks in fsdp.items():
        ratios = [r["unwrapped"] / r["wrapped"] for r in ranks]
        print(f"FSDP2-wrapped / unwrapped decode tokens/s, {world} gloo rank(s), {args.fsdp_prompts} prompts x "
              f"{args.samples}: {min(ratios):.2f} (worst rank; target >= 0.9)")


def fsdp_rollout(path, args, world):
    """bench.py _fsdp_rollout_worker on `world` gloo ranks; each rank's {unwrapped, wrapped} seconds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                          "--master_addr", "127.0.0.1", "--master_port", str(port), __file__,
                          "_fsdp_rollout_worker", path, str(args.vocab), str(args.fsdp_prompts), str(args.samples),
                          str(args.max_tokens)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fsdp_rollout_worker(path, vocab, prompts, samples, max_tokens):
    """Each rank samples its share of the prompts (forced lengths as in bench_rollout) with the model
    unwrapped and FSDP2-wrapped, twice each in ABBA order; rank 0 prints each rank's best time of each."""
    import torch.distributed as dist

    import generate as G

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    eos, everyone = vocab - 5, bench_prompts(prompts, vocab - 4, seed=0)
    lengths = rollout_lengths(prompts * samples, max_tokens, seed=0)
    ids = list(range(prompts))[rank::world]
    mine = torch.cat([lengths[i * samples:(i + 1) * samples] for i in ids])
    models = {"unwrapped": M.load_model(path).eval(),
              "wrapped": M.apply_fsdp(M.load_model(path), activation_checkpointing=False).eval()}

    def sample(model, max_new_tokens):
        with forced_lengths_ours(G, mine, 0, ids, samples, eos):
            G.generate(model, [everyone[i] for i in ids], eos_ids=[eos], n=samples, max_new_tokens=max_new_tokens,
                       prompt_ids=ids)

    for model in models.values():  # first-call costs
        sample(model, 2)
    seconds = {name: [] for name in models}
    for name in ("unwrapped", "wrapped", "wrapped", "unwrapped"):  # ABBA: neither side always goes first
        dist.barrier()  # every rank times the same side at the same time
        start = time.perf_counter()
        sample(models[name], max_tokens)
        seconds[name].append(time.perf_counter() - start)
    results = [None] * world
    dist.all_gather_object(results, {name: min(s) for name, s in seconds.items()})
    if rank == 0:
        print(json.dumps(results), flush=True)
    dist.barrier()
    dist.destroy_process_group()


# -----------------------------------------------------------------------------
# rollout-estimate: one GRPO rollout step at 7B on one 80 GB GPU per rank, from the engine's schedule
# (replayed exactly, tests/test_bench.py) and a per-step cost model whose every assumption is a flag

def replay_slots(prompt_lens, lengths, n, max_new_tokens, slots, check_every):
    """generate.generate's schedule for forced response lengths (sample j of prompt p takes
    lengths[p * n + j] tokens, its stop token included): `slots` slots, samples admitted prompt-major
    into the lowest free slots, a stop check every `check_every` decode steps (finished rows idle until
    then), live rows compacted to 0 .. B-1. Returns (steps, prefills, recomputed): per decode step
    (B, cached tokens read), each row attending over its own prompt + tokens fed + the new one (as
    flash_attn_with_kvcache does); per prefill call the prompts it packs (a sample whose prompt a slot
    holds copies it from there); no recomputed tokens (those are replay_paged's).
    Example: prompt_lens [2], lengths [2, 3], n 2, max_new_tokens 3, one slot, check_every 1 ->
    steps [(1, 3), (1, 3), (1, 4)], prefills [[0]]: sample 1 reuses the prompt left in the slot."""
    waiting = deque((p, j) for p in range(len(prompt_lens)) for j in range(n))
    owner, holds, count = [None] * slots, [None] * slots, [0] * slots  # as generate's owner, holds, counts
    steps, prefills = [], []

    def collect():
        for s, row in enumerate(owner):
            if row is not None and count[s] >= lengths[row[0] * n + row[1]]:
                owner[s] = None

    while True:
        collect()
        while waiting and None in owner:
            free = [s for s in range(slots) if owner[s] is None]
            taken = [(s, waiting.popleft()) for s in free[:len(waiting)]]
            prompt_of = {s: p for s, (p, _) in taken}
            holders = {p for t, p in enumerate(holds) if p is not None and prompt_of.get(t, p) == p}
            fresh = dict.fromkeys(p for s, (p, _) in taken if holds[s] != p and p not in holders)
            prefills += [list(fresh)] if fresh else []
            for s, (p, j) in taken:
                owner[s], holds[s], count[s] = (p, j), p, 1
            collect()
        live = [s for s in range(slots) if owner[s] is not None]
        for dst, src in zip([s for s in range(len(live)) if owner[s] is None], reversed(live)):
            owner[dst], holds[dst], count[dst], owner[src] = owner[src], holds[src], count[src], None
        B = len(live)
        if B == 0:
            return steps, prefills, []
        for _ in range(min(check_every, *(max_new_tokens - count[s] for s in range(B)))):
            steps.append((B, sum(prompt_lens[owner[s][0]] + count[s] for s in range(B))))
            for s in range(B):
                count[s] += count[s] < lengths[owner[s][0] * n + owner[s][1]]


def replay_paged(prompt_lens, lengths, n, max_new_tokens, budget, check_every):
    """The same loop with a paged cache: no slots, a row holds its prompt and its tokens. At a check the
    latest-admitted rows are preempted (back to the head of the queue, keeping their tokens: vLLM's
    recompute preemption) while the live rows' tokens plus the check_every each may add exceed `budget`,
    then waiting rows are admitted while they fit. An admitted row's prompt is prefilled unless a live
    row of it holds it (copied), and the tokens it had before a preemption are recomputed after it;
    that prefill draws its next token. Returns replay_slots' steps and prefills, and the recomputed
    tokens as (prompt, tokens) pairs.
    Example: prompt_lens [2], lengths [3, 3], n 2, max_new_tokens 3, budget 8, check_every 1 -> steps
    [(2, 6), (1, 4)], prefills [[0], [0]], recomputed [(0, 2)]: after one step the two rows need
    2 x (2 + 2 + 1) > 8 tokens, so row 1 waits for row 0 to finish."""
    waiting, live, count = deque(range(len(lengths))), [], [0] * len(lengths)
    steps, prefills, recomputed = [], [], []

    def need(rows):
        return sum(prompt_lens[r // n] + count[r] + check_every for r in rows)

    while True:
        live = [r for r in live if count[r] < lengths[r]]
        while need(live) > budget:
            waiting.appendleft(live.pop())
        call = []
        while waiting and need(live + [waiting[0]]) <= budget:
            r = waiting.popleft()
            if all(q // n != r // n for q in live):
                call.append(r // n)
            recomputed += [(r // n, count[r])] if count[r] else []
            live.append(r)
            count[r] += 1
        prefills += [call] if call else []
        live = [r for r in live if count[r] < lengths[r]]
        if not live and not waiting:
            return steps, prefills, recomputed
        if not live and not call:
            raise ValueError(f"a budget of {budget} tokens holds no row")
        for _ in range(min([check_every] + [max_new_tokens - count[r] for r in live])):
            steps.append((len(live), sum(prompt_lens[r // n] + count[r] for r in live)))
            for r in live:
                count[r] += count[r] < lengths[r]


def model_sizes(path):
    """Parameter counts of a checkpoint's config.json (meta device, no weights): all, the trainable
    language model, its input embedding (a lookup, not a matmul), the frozen vision tower."""
    model = M.build_model(path)
    total, vision = (sum(p.numel() for p in m.parameters()) for m in (model, model.visual))
    embed = model.model.embed_tokens.weight.numel()
    return model.cfg, {"params": total, "llm": total - vision, "embed": embed, "vision": vision}


def resident_bytes(sizes, ranks):
    """A rank's state before the rollout under FSDP over `ranks`: fp32 parameter shards, the fp32
    gradient and AdamW's two moments of the trainable LLM (zero_grad frees the gradient, but PyTorch's
    caching allocator keeps its blocks, which mem_get_info counts as used), the bf16 reference's shards."""
    return (4 * sizes["params"] + 12 * sizes["llm"] + 2 * sizes["params"]) / ranks


def estimate_workload(prompts, n, cap, seed):
    """(text tokens, image tokens) of each prompt and each row's response length: one square image per
    prompt, side uniform in 512-2048 px, resized as the processor resizes it within docs/method.md §3's
    bounds (512^2-2048^2 pixels), a token per 28 x 28 pixels; 100 text tokens (template and question);
    lengths from `rollout_lengths`."""
    import data

    g = torch.Generator().manual_seed(seed)
    resize = functools.partial(data.qwen2vl_image_processing().smart_resize, factor=28, min_pixels=512**2,
                               max_pixels=2048**2)
    sides = (512 + 1536 * torch.rand(prompts, generator=g)).round().long().tolist()
    return ([(100, math.prod(resize(side, side)) // 28**2) for side in sides],
            rollout_lengths(prompts * n, cap, seed).tolist())


def rollout_seconds(steps, prefills, recomputed, prompts, cfg, sizes, kv_bytes, args):
    """(decode, prefill) seconds of a replayed schedule on the GPU of `args`. A decode step reads the
    bf16 LLM's weights once and the rows' cached K/V (`kv_bytes` a token) at hbm x bandwidth_fraction,
    or computes 2 FLOPs per matmul weight per row at peak x mfu, whichever takes longer. Prefill, at
    peak x mfu: 2 FLOPs per matmul weight per token, causal attention (2 x layers x hidden x length^2
    for a prompt; tokens recomputed after their prompt attend over it too), 2 FLOPs per vision weight
    per patch (4 patches an image token). prompts: (text tokens, image tokens) of each."""
    matmul, attention = sizes["llm"] - sizes["embed"], 2 * cfg.num_hidden_layers * cfg.hidden_size
    compute, bandwidth = args.peak_tflops * 1e12 * args.mfu, args.hbm_tb_s * 1e12 * args.bandwidth_fraction
    decode = sum(max((2 * matmul + cached * kv_bytes) / bandwidth, 2 * matmul * B / compute)
                 for B, cached in steps)
    flops = 0
    for text, image in (prompts[p] for call in prefills for p in call):
        flops += 2 * matmul * (text + image) + attention * (text + image) ** 2 + 8 * sizes["vision"] * image
    for p, tokens in recomputed:
        flops += 2 * matmul * tokens + attention * ((sum(prompts[p]) + tokens) ** 2 - sum(prompts[p]) ** 2)
    return decode, flops / compute


def bench_rollout_estimate(args):
    """One stage-1 (4K x 16) and one stage-2 (8K x 8) rollout step of a rank, --prompts-per-step /
    --ranks prompts (docs/method.md §3), on one GPU: our engine, the same loop with a paged cache,
    and vLLM's published throughput. Prints the assumptions, then a markdown table."""
    import generate as G

    cfg, sizes = model_sizes(args.config)
    kv_bytes = G.kv_bytes_per_token(cfg, torch.bfloat16)
    resident, gathered = resident_bytes(sizes, args.ranks), 2 * sizes["params"]
    # kv_budget_gib 0: half the free memory, read before generate gathers the model
    gib = args.kv_budget_gib or (args.gpu_memory_gib * 2**30 - resident) / 2 / 2**30
    budget = G.kv_budget_tokens(cfg, torch.bfloat16, gib)
    per_rank = args.prompts_per_step // args.ranks
    print(f"{os.path.relpath(args.config)}: {sizes['params'] / 1e9:.2f}B parameters ({sizes['llm'] / 1e9:.2f}B "
          f"LLM, trained; {sizes['vision'] / 1e9:.2f}B vision, frozen); K/V {kv_bytes:,} bytes a token in bf16")
    print(f"rank state, FSDP over {args.ranks}: {resident / 2**30:.1f} GiB (fp32 parameter shards, fp32 gradient "
          f"and 2 AdamW moments of the LLM, bf16 reference) + {gathered / 2**30:.1f} GiB, the model gathered in bf16")
    print(f"KV budget: {gib:.1f} GiB = {budget:,} tokens " + ("(--kv-budget-gib)" if args.kv_budget_gib else
          f"(half of {args.gpu_memory_gib} GiB - the rank state, as kv_budget_gib 0 reads it before the gather)"))
    print(f"GPU: {args.hbm_tb_s} TB/s x {args.bandwidth_fraction}, {args.peak_tflops} TFLOP/s x MFU {args.mfu}; "
          f"a stop check every {args.check_every} steps; host time, K/V copies and activations not counted")
    print(f"per rank: {per_rank} prompts, one image each, side uniform 512-2048 px -> 361-5,329 image tokens, "
          f"+ 100 text tokens; lengths 75% 5-25% of the cap, 11% 25-75%, 14% at it (rollout_lengths)")
    print(f"paged: rows limited by the tokens they hold (+{args.check_every} each), recompute preemption; "
          f"vLLM: {args.vllm_tok_s:,.0f} output tok/s published (Llama-3.1-8B bf16, one H100, shorter rows)")
    print("| stage | rows | output tokens | KV GiB | slots | steps | mean B | seconds (prefill) | paged: steps "
          "| mean B | seconds (prefill) | vLLM seconds | GiB per GPU |")
    print("|---" * 13 + "|")
    for stage, cap, n in ((1, 4096, 16), (2, 8192, 8)):
        prompts, lengths = estimate_workload(per_rank, n, cap, seed=stage)
        prompt_lens = [text + image for text, image in prompts]
        slot_len = max(prompt_lens) + cap
        slots = min(len(lengths), budget // slot_len)
        cells = []
        for steps, prefills, recomputed in (replay_slots(prompt_lens, lengths, n, cap, slots, args.check_every),
                                            replay_paged(prompt_lens, lengths, n, cap, budget, args.check_every)):
            decode, prefill = rollout_seconds(steps, prefills, recomputed, prompts, cfg, sizes, kv_bytes, args)
            cells += [f"{len(steps):,}", f"{sum(B for B, _ in steps) / len(steps):.0f}",
                      f"{decode + prefill:.0f} ({prefill:.0f})"]
        tokens, memory = sum(lengths), resident + gathered + slots * slot_len * kv_bytes
        print(f"| {stage} ({cap} x {n}) | {len(lengths)} | {tokens:,} | {gib:.1f} | {slots} | {' | '.join(cells)} | "
              f"{tokens / args.vllm_tok_s:.0f} | {memory / 2**30:.1f} |")


# -----------------------------------------------------------------------------
# grpo-step: one step of train_grpo.py vs one step of TRL's GRPOTrainer, same model and workload

def grpo_problems(count, seed):
    """`count` text-only problems of the synthetic world: the scene's description stands in for
    its image, so a text-only checkpoint can be given them."""
    import synthetic

    splits = synthetic.make_problems(synthetic.Preset(n_train=count, n_rl=0, n_test=0), seed)
    return [{"id": problem_id, "question": f"{synthetic.describe(scene)} {synthetic.question_text(query)}",
             "answer": synthetic.answer(scene, query)} for problem_id, scene, query in splits["train"]]


def save_grpo_checkpoint(path, problems, vocab, hidden, layers, seed=0):
    """A random-weight text-only Qwen2 (64-dim heads, one KV head per 4 query heads, MLP 3x wide,
    tied head) with a byte-level BPE trained on the problems and the synthetic world's chat template.
    Its generation_config.json lists no stop token, so every sample runs to the length cap. The
    image-processor config is there only because data.ChatProcessor reads one."""
    import synthetic
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = synthetic.train_tokenizer([synthetic.REASONING_TEXT] * 2 + [p["question"] for p in problems], 1024)
    if vocab < len(tokenizer):
        raise ValueError(f"vocab {vocab} is smaller than the tokenizer's {len(tokenizer)} tokens")
    tokenizer.save_pretrained(path)
    synthetic.image_processor(synthetic.PRESETS["tiny"]).save_pretrained(path)
    heads = max(hidden // 64, 1)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1),
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[], pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)


def ours_grpo_steps(args, path, problems, out):
    """train_grpo.main, the real loop, for warm-up + measured steps; each step's time split from its
    metrics.jsonl: [{generate, score, train, response_length}]. generate covers prompt encoding and
    sampling; train the reference log-probs and the packed update with its optimizer step (each
    group's prompt packed once for its responses, where TRL runs prompt + completion per sample)."""
    import train_grpo

    os.makedirs(out, exist_ok=True)
    data_path = os.path.join(out, "problems.jsonl")
    with open(data_path, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in problems)
    os.environ["WANDB_MODE"] = "disabled"  # a benchmark logs nothing anywhere
    train_grpo.main([
        "--preset", "toy", "--init", path, "--ref", path, "--data", data_path, "--out-root", out, "--length-scale", "1",
        "--stages", f"{args.max_tokens}x{args.group_size}x{args.warmup + args.steps}",
        "--prompts-per-rollout", str(args.prompts), "--prompts-per-update", str(args.prompts), "--ppo-epochs", "1",
        "--kl-coef", str(args.beta), "--lr", str(args.lr), "--weight-decay", "0", "--grad-clip", "1.0",
        "--micro-batch-tokens", str(args.micro_batch_tokens), "--activation-checkpointing", "false",
        "--save-every", "0", "--table-every", "0"])
    with open(os.path.join(out, "vision-r1", "stage1", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{"generate": r["time_generate"], "score": r["time_score"], "train": r["time_train"],
             "response_length": r["response_length"]} for r in rows]


def trl_grpo_steps(args, path, problems, out):
    """TRL's GRPOTrainer on the same checkpoint and prompts (as a chat, so the same template
    applies), group size, length cap (min_new_tokens = the cap, so every sample has that many
    tokens, as ours), beta, lr, clipping and one optimizer update per step, with a length reward.
    Per step: [{generate, total, response_length}]; total from step begin to step end (the
    optimizer step included, the logging after it not), generate from the trainer's `_generate`."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    steps = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            steps.append({"start": time.perf_counter()})

        def on_step_end(self, *_, **__):
            steps[-1]["total"] = time.perf_counter() - steps[-1].pop("start")

        def on_log(self, *_, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                steps[-1]["response_length"] = logs["completions/mean_length"]

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate(self, prompts):
            start = time.perf_counter()
            result = super()._generate(prompts)
            steps[-1]["generate"] = time.perf_counter() - start
            return result

    def length_reward(completion_ids, **_):
        return [float(len(ids)) for ids in completion_ids]

    config = GRPOConfig(
        output_dir=out, use_cpu=True, bf16=False, activation_checkpointing=False, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=0, max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.prompts * args.group_size, gradient_accumulation_steps=1,
        num_generations=args.group_size, num_iterations=1, max_completion_length=args.max_tokens,
        generation_kwargs={"min_new_tokens": args.max_tokens}, temperature=1.0, top_p=1.0, beta=args.beta,
        epsilon=0.2, learning_rate=args.lr, weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=1.0)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p["question"]}]} for p in problems])
    trainer = TimedGRPOTrainer(model=path, reward_funcs=length_reward, args=config, train_dataset=dataset,
                               processing_class=AutoTokenizer.from_pretrained(path), callbacks=[StepTimer()])
    trainer.train()
    return steps


def matmul_gflop(fn, *args):
    """GFLOP of fn(*args) in matrix products (aten mm and addmm: the linear layers and the head), counted
    by torch's FlopCounterMode. Attention is left out on both sides: CPU SDPA's flash kernel is not
    counted, its math path would be."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn(*args)
    counts = counter.get_flop_counts()["Global"]
    return sum(counts.get(op, 0) for op in (torch.ops.aten.mm, torch.ops.aten.addmm)) / 1e9


def alternating_rounds(args, root, sides):
    """`args.rounds` rounds, each a GEMM peak measurement (`gemm_flops`), then every side's warm-up +
    measured steps in a fresh process, in turn, so that a change in a shared machine's load falls on
    all of them. sides: [(steps(args, *inputs, out) -> rows a step, inputs, index of the first
    measured row)]. Returns (each side's measured rows over all rounds, the best peak)."""
    rows, peak = [[] for _ in sides], 0.0
    for r in range(args.rounds):
        peak = max(peak, gemm_flops())
        for i, (steps, inputs, first) in enumerate(sides):
            out = os.path.join(root, f"side{i}-round{r}")
            rows[i] += in_fresh_process(steps, args.threads, args, *inputs, out)[first:]
    return rows, peak


def bench_grpo_step(args):
    """Ours against TRL in `alternating_rounds`; the table shows medians over the measured steps of
    all rounds. The trainers' own per-step prints are silenced. Each side's first step runs once more
    beforehand, its matrix products counted (`matmul_gflop`), set against the GEMM peak: the time no
    implementation of that side's work can go below on this machine, so that the target reads
    against what is left outside the products."""
    torch.set_num_threads(args.threads)
    problems = grpo_problems(args.prompts * (args.warmup + args.steps), seed=0)
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, "model")
        save_grpo_checkpoint(path, problems, args.vocab, args.hidden, args.layers)
        one_step = argparse.Namespace(**{**vars(args), "warmup": 1, "steps": 0})
        gflop = {name: in_fresh_process(matmul_gflop, args.threads, steps, one_step, path, problems,
                                        os.path.join(root, f"{name}-counted"))
                 for name, steps in (("ours", ours_grpo_steps), ("TRL", trl_grpo_steps))}
        (ours, trl), peak = alternating_rounds(args, root, [(ours_grpo_steps, (path, problems), args.warmup),
                                                            (trl_grpo_steps, (path, problems), args.warmup)])

    def median(rows, key):
        return statistics.median(key(r) for r in rows)

    our_split = {k: median(ours, lambda r: r[k]) for k in ("generate", "score", "train")}
    our_total = median(ours, lambda r: r["generate"] + r["score"] + r["train"])
    trl_generate, trl_total = median(trl, lambda r: r["generate"]), median(trl, lambda r: r["total"])
    print(f"grpo-step: {args.prompts} prompts x {args.group_size} samples x {args.max_tokens} tokens, "
          f"beta {args.beta}, one optimizer update; Qwen2 {args.layers} layers x {args.hidden}, vocab {args.vocab}, "
          f"cpu fp32, {torch.get_num_threads()} threads; median of {len(ours)} steps ({args.rounds} alternating runs "
          f"of {args.warmup} warm-up + {args.steps})")
    print(f"{'seconds':8s}{'generate':>10s}{'score':>8s}{'train':>8s}{'total':>8s}{'tokens/sample':>15s}")
    print(f"{'TRL':8s}{trl_generate:10.2f}{trl_total - trl_generate:>16.2f}{trl_total:8.2f}"
          f"{median(trl, lambda r: r['response_length']):15.1f}   (score + train together)")
    print(f"{'ours':8s}{our_split['generate']:10.2f}{our_split['score']:8.2f}{our_split['train']:8.2f}{our_total:8.2f}"
          f"{median(ours, lambda r: r['response_length']):15.1f}")
    print(f"step time TRL/ours: {trl_total / our_total:.2f} (target >= 3)   generate: "
          f"{trl_generate / our_split['generate']:.2f}   score + train: "
          f"{(trl_total - trl_generate) / (our_split['score'] + our_split['train']):.2f}")
    floor = {name: gflop[name] * 1e9 / peak for name in gflop}
    print(f"matrix products a step: TRL {gflop['TRL']:.1f} GFLOP, ours {gflop['ours']:.1f}; at the GEMM peak "
          f"({peak / 1e9:.1f} GFLOP/s, fp32 2048^3, best of {5 * args.rounds}) {floor['TRL']:.2f} and "
          f"{floor['ours']:.2f} s; outside them: TRL {trl_total - floor['TRL']:.2f} s, ours "
          f"{our_total - floor['ours']:.2f} s (the target needs <= {trl_total / 3 - floor['ours']:.2f})")

# -----------------------------------------------------------------------------
# sft: one train_sft.py step vs one TRL SFTTrainer step, same model, data, batch and optimizer

def sft_records(problems, path, seq_len, seed):
    """A cold-start-like conversation per problem (text only: the scene described stands in for its
    image), each exactly `seq_len` tokens as data.ChatProcessor encodes it, so that both trainers
    pack `max_tokens // seq_len` of them into every micro-batch: lines of the synthetic world's
    reasoning text in a seeded order while they fit, the answer in tags, then " one" (one token
    each) up to the length."""
    import random

    import data
    import synthetic

    processor, lines = data.ChatProcessor(path), synthetic.REASONING_TEXT.strip().splitlines()
    rng, records = random.Random(seed), []

    def length(reply, question):
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
        return len(processor.encode_conversation(messages, [])["input_ids"])

    for p in problems:
        end, reasoning = f" </think><answer> {p['answer']} </answer>", "<think>"
        for line in rng.sample(lines, len(lines)):
            if length(f"{reasoning} {line}{end}", p["question"]) > seq_len:
                break
            reasoning = f"{reasoning} {line}"
        reply = reasoning + end
        reply += " one" * (seq_len - length(reply, p["question"]))
        if length(reply, p["question"]) != seq_len:
            raise ValueError(f"--seq-len {seq_len} is too short for a question and its answer")
        records.append({"id": p["id"], "images": [], "messages": [{"role": "user", "content": p["question"]},
                                                                  {"role": "assistant", "content": reply}]})
    return records


def ours_sft_steps(args, path, records, out):
    """train_sft.main, the real loop (run folder `out`/run), for warm-up + measured steps of --batch
    records; each step's seconds and tokens from its metrics.jsonl (tokens_per_s over the step, logged every step: from
    one log to the next, the encoding and packing of its records included)."""
    import train_sft

    os.makedirs(out, exist_ok=True)
    data_path = os.path.join(out, "cold.jsonl")
    with open(data_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records[:args.batch * (args.warmup + args.steps)])
    os.environ["WANDB_MODE"] = "disabled"  # a benchmark logs nothing anywhere
    train_sft.main([
        "--preset", "toy", "--model", path, "--data", data_path, "--out", os.path.join(out, "run"),
        "--eval-holdout", "0", "--epochs", "1", "--global-batch", str(args.batch), "--max-tokens", str(args.max_tokens),
        "--lr", str(args.lr),
        "--schedule", "constant", "--warmup-ratio", "0", "--weight-decay", "0", "--grad-clip", "1.0",
        "--activation-checkpointing", "false", "--param-dtype", "float32", "--attention", "sdpa"])
    with open(os.path.join(out, "run", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    tokens = args.batch * args.seq_len
    return [{"seconds": tokens / r["tokens_per_s"], "tokens": tokens} for r in rows if "tokens_per_s" in r]


def trl_sft_steps(args, path, records, out):
    """TRL's SFTTrainer on the same checkpoint and records (prompt-completion chats, so the loss is on
    the reply alone, as ours), packing on (best-fit decreasing, padding-free: `max_tokens // seq_len`
    records a row, as ours packs them), micro-batches of one row, --batch records per optimizer step
    through gradient accumulation, the same AdamW (lr, betas, no decay), clipping and constant lr,
    no activation checkpointing. Per step: {seconds from the previous step's end, tokens}."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    ends, tokens = [], []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):  # once an optimizer step, before its first micro-batch
            tokens.append(0)

        def on_step_end(self, *_, **__):
            ends.append(time.perf_counter())

    class CountingSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, *rest, **kwargs):
            tokens[-1] += inputs["input_ids"].numel()
            return super().training_step(model, inputs, *rest, **kwargs)

    per_row = args.max_tokens // args.seq_len
    config = SFTConfig(
        output_dir=out, use_cpu=True, bf16=False, activation_checkpointing=False, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=0, max_steps=args.warmup + args.steps, packing=True,
        max_length=args.max_tokens, per_device_train_batch_size=1, gradient_accumulation_steps=args.batch // per_row,
        learning_rate=args.lr, weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0)
    chats = [{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in records]
    trainer = CountingSFTTrainer(model=path, args=config, train_dataset=Dataset.from_list(chats),
                                 processing_class=AutoTokenizer.from_pretrained(path), callbacks=[StepTimer()])
    trainer.train()
    return [{"seconds": b - a, "tokens": n} for a, b, n in zip(ends, ends[1:], tokens[1:])]


def gemm_flops(n=2048, repeats=5):
    """The machine's fp32 GEMM rate at the torch threads set: FLOP/s of the best of `repeats` n x n products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        seconds.append(time.perf_counter() - start)
    return 2 * n**3 / min(seconds)


def bench_sft(args):
    """Ours against TRL in `alternating_rounds`; medians over the measured steps of all rounds. MFU:
    model FLOPs (model.flops_per_token, the mean causal context half a record) per second over the
    best GEMM peak. The trainers' own prints are silenced."""
    if args.max_tokens % args.seq_len or args.batch % (args.max_tokens // args.seq_len):
        raise SystemExit("--max-tokens must be a multiple of --seq-len, and --batch of the records a micro-batch holds")
    torch.set_num_threads(args.threads)
    problems = grpo_problems(args.batch * (args.warmup + args.steps), seed=0)
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, "model")
        save_grpo_checkpoint(path, problems, args.vocab, args.hidden, args.layers)
        records = sft_records(problems, path, args.seq_len, seed=0)
        flops_per_token = M.flops_per_token(M.build_model(path).cfg, args.seq_len / 2)
        (ours, trl), peak = alternating_rounds(args, root, [(ours_sft_steps, (path, records), args.warmup),
                                                            (trl_sft_steps, (path, records), args.warmup - 1)])
    print(f"sft: {args.batch} records x {args.seq_len} tokens an optimizer step, {args.max_tokens // args.seq_len} "
          f"packed a micro-batch of {args.max_tokens}; AdamW lr {args.lr}, clip 1.0; Qwen2 {args.layers} layers x "
          f"{args.hidden}, vocab {args.vocab}; cpu fp32, {torch.get_num_threads()} thread(s); median of {len(ours)} "
          f"steps ({args.rounds} alternating runs of {args.warmup} warm-up + {args.steps})")
    print(f"{'':16s}{'s/step':>8s}{'tokens/step':>13s}{'tokens/s':>10s}{'GFLOP/s':>9s}{'MFU':>7s}")
    rates = {}
    for name, steps in (("TRL SFTTrainer", trl), ("ours", ours)):
        seconds, tokens = statistics.median(s["seconds"] for s in steps), statistics.median(s["tokens"] for s in steps)
        rates[name] = tokens / seconds
        flops = rates[name] * flops_per_token
        print(f"{name:16s}{seconds:8.2f}{tokens:13.0f}{rates[name]:10.0f}{flops / 1e9:9.1f}{flops / peak:7.1%}")
    print(f"tokens/s ours/TRL: {rates['ours'] / rates['TRL SFTTrainer']:.2f} (target >= 1.5)   GEMM peak "
          f"{peak / 1e9:.1f} GFLOP/s (fp32 2048^3, best of {5 * args.rounds})")


def add_training_parsers(sub):
    """The flags of bench.py logprobs, sft and grpo-step."""
    p = sub.add_parser("logprobs")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="fresh processes per implementation, alternating")
    p.set_defaults(run=bench_logprobs)
    p = sub.add_parser("sft", help="needs requirements-bench.txt (TRL)")
    p.add_argument("--batch", type=int, default=16, help="records an optimizer step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens a record (every one exactly)")
    p.add_argument("--max-tokens", type=int, default=2048, help="a packed micro-batch (TRL: a packed row)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate of both sides (constant)")
    add_trl_comparison_flags(p, steps=3)
    p.set_defaults(run=bench_sft)
    p = sub.add_parser("grpo-step", help="needs requirements-bench.txt (TRL)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (> 0: both sides run a reference model)")
    p.add_argument("--lr", type=float, default=1e-6)
    # train_grpo's toy preset: 4,096 packed tokens per forward/backward
    p.add_argument("--micro-batch-tokens", type=int, default=4096)
    add_trl_comparison_flags(p, steps=2)
    p.set_defaults(run=bench_grpo_step)


def add_trl_comparison_flags(p, steps):
    """The model and timing flags bench.py sft and grpo-step share. The model: 4 x 256 with vocab 4,096,
    the head ~25% of the weights as in the generate bench's model; a run stays under ~2 minutes on one core."""
    p.add_argument("--hidden", type=int, default=256, help="the random-weight Qwen2's width")
    p.add_argument("--layers", type=int, default=4, help="its decoder layers")
    p.add_argument("--vocab", type=int, default=4096, help="its vocabulary (the tokenizer's ids first)")
    p.add_argument("--warmup", type=int, default=1, help="steps (at least 1: TRL's step time is end to end)")
    p.add_argument("--steps", type=int, default=steps, help="measured steps per run")
    p.add_argument("--rounds", type=int, default=2, help="alternating runs of each side")
    p.add_argument("--threads", type=int, default=1, help="torch threads of both sides (1: steady on a shared box)")


def add_sampling_parsers(sub):
    """The flags of bench.py generate, rollout and rollout-estimate."""
    p = sub.add_parser("generate")
    p.add_argument("--new-tokens", type=int, default=64)
    # 8,192: the head is then ~25% of the bench model's per-token matmuls (7B Qwen2.5-VL: ~8%);
    # at 32K it would be ~60% and both implementations would mostly time the same head matmul
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores; 1 on a shared box)")
    p.set_defaults(run=bench_generate)
    p = sub.add_parser("rollout")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=256, help="the length cap")
    p.add_argument("--kv-budget-slots", type=int, default=16,
                   help="our cache: this many slots of (the longest prompt + max tokens)")
    p.add_argument("--check-every", type=int, default=None, help="our decode steps between stop checks "
                                                                  "(default: the engine's)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--fsdp-prompts", type=int, default=4, help="prompts over all ranks in the FSDP2 comparison")
    p.add_argument("--fsdp-ranks", type=int, nargs="*", default=[1, 2], help="gloo world sizes of that comparison")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared box)")
    p.set_defaults(run=bench_rollout)
    p = sub.add_parser("rollout-estimate", help="no GPU needed: every assumption is a flag")
    here = os.path.dirname(os.path.abspath(__file__))
    p.add_argument("--config", default=os.path.join(here, "configs", "Qwen2.5-VL-7B-Instruct"),
                   help="a config.json directory")
    p.add_argument("--ranks", type=int, default=8, help="GPUs sharing a step's prompts (FSDP over all of them)")
    p.add_argument("--prompts-per-step", type=int, default=512, help="prompts per rollout step, all ranks")
    p.add_argument("--gpu-memory-gib", type=float, default=79.6, help="an 80 GB H100's memory as CUDA reports it")
    p.add_argument("--kv-budget-gib", type=float, default=0.0, help="0: derived as train_grpo's default derives it")
    p.add_argument("--hbm-tb-s", type=float, default=3.35, help="memory bandwidth (H100 SXM)")
    p.add_argument("--bandwidth-fraction", type=float, default=0.7, help="of --hbm-tb-s a decode step achieves")
    p.add_argument("--peak-tflops", type=float, default=989, help="dense bf16 peak (H100 SXM)")
    p.add_argument("--mfu", type=float, default=0.4, help="of the peak prefill (and compute-bound decode) achieves")
    p.add_argument("--check-every", type=int, default=8, help="decode steps between stop checks (CUDA's default)")
    p.add_argument("--vllm-tok-s", type=float, default=12500, help="vLLM's published output tokens/s, Llama-3.1-8B "
                   "bf16 on one H100 (morphllm.com/vllm-benchmarks)")
    p.set_defaults(run=bench_rollout_estimate)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_fsdp_rollout_worker":
        path, *sizes = sys.argv[2:]
        return _fsdp_rollout_worker(path, *map(int, sizes))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    add_training_parsers(sub)
    add_sampling_parsers(sub)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    args.run(args)


if __name__ == "__main__":
    main()
