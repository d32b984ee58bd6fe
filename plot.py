"""Reward, accuracy and response-length curves of GRPO runs, the picture for PTST's length
behaviour (docs/method.md §3, Fig. 1): suppression in stage 1, growth again in stage 2. Accuracy is
the hard reward of the step's rollouts, whatever reward was trained (Zero's too); within a stage
every step draws prompts the stage has not trained on (while it makes less than one pass over the RL
set), so it is an accuracy on unseen problems at the rollout temperature.

    python plot.py --runs runs/toy/grpo/vision-r1/stage1 runs/toy/grpo/vision-r1/stage2 \\
        runs/toy/grpo/long/stage1 --out curves.png

Consecutive stages of one schedule are drawn as one curve (stage 2's steps continue stage 1's, a
dotted line marks where a stage begins); each metric is drawn faintly per step and as its trailing
mean over --smooth steps.
"""

import argparse
import json
import os
import statistics
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (("reward", "mean reward"), ("accuracy", "rollout accuracy"),
          ("response_length", "mean response length (tokens)"))
SMOOTH_STEPS = 10  # the curves' trailing-mean window (--smooth)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [row for row in map(json.loads, f) if "reward" in row]


def curves(run_dirs):
    """{schedule name: [metric rows with a global step]}, stages of a schedule chained in order."""
    by_schedule = defaultdict(list)
    for run_dir in sorted(run_dirs, key=lambda d: (os.path.dirname(os.path.normpath(d)), d)):
        name = os.path.basename(os.path.dirname(os.path.normpath(run_dir)))
        offset = by_schedule[name][-1]["global_step"] if by_schedule[name] else 0
        by_schedule[name] += [{**row, "global_step": offset + row["step"]} for row in read_metrics(run_dir)]
    return by_schedule


def trailing_mean(values, window):
    """Mean of each value and the (window - 1) before it (fewer at the start).

    >>> trailing_mean([1, 3, 5, 7], 2)
    [1.0, 2.0, 4.0, 6.0]
    """
    return [statistics.fmean(values[max(i + 1 - window, 0):i + 1]) for i in range(len(values))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="GRPO stage folders holding metrics.jsonl")
    parser.add_argument("--out", default="curves.png")
    parser.add_argument("--smooth", type=int, default=SMOOTH_STEPS, help="trailing-mean window in steps (1: raw only)")
    args = parser.parse_args()
    fig, axes = plt.subplots(1, len(PANELS), figsize=(15, 4))
    for name, rows in curves(args.runs).items():
        steps = [row["global_step"] for row in rows]
        stage_starts = [row["global_step"] - 1 for prev, row in zip(rows, rows[1:])
                        if row.get("stage") != prev.get("stage")]
        for ax, (key, _) in zip(axes, PANELS):
            values = [row[key] for row in rows]
            (line,) = ax.plot(steps, trailing_mean(values, args.smooth), label=name)
            if args.smooth > 1:
                ax.plot(steps, values, color=line.get_color(), alpha=0.25, linewidth=0.8)
            for start in stage_starts:
                ax.axvline(start + 0.5, color=line.get_color(), linestyle=":", linewidth=1)
    for ax, (_, title) in zip(axes, PANELS):
        ax.set_xlabel("GRPO step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
