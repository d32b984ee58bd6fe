"""Speed and memory of our pieces against the peer a researcher would otherwise use, measured in
the same run and printed as ratios.

    python bench.py logprobs     # token_logprobs vs naive log_softmax at vocab 151,936 x 4,096 tokens
"""

import argparse
import json
import os
import resource
import subprocess
import sys
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
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    args.run(args)


if __name__ == "__main__":
    main()
