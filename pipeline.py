"""The whole Vision-R1 pipeline on the embedded synthetic world, on CPU, ending with the paper's
Table 4 in miniature (Vision-R1-Zero / -CI / -Long / Vision-R1).

    python pipeline.py                 # 39-54 minutes on 2 idle cores of a slow AVX2 machine, 2 torch threads (README)
    python pipeline.py --size mini     # the same steps, smaller: the CI test
    python pipeline.py --arch mllama   # LlamaV-CI: the cold start only, on a tiny Llama 3.2 Vision

Every step is a plain call of the real scripts with visible arguments, in the order the paper
runs them, each a process of its own forked from this one (launch.py: torch and transformers are
imported once here, not by every step again):

  synthetic.py       the world (problems + a random tiny Qwen2.5-VL)
  train_sft.py       the *base* model: direct-answer SFT, so that like Qwen2.5-VL-Instruct it
                     answers without long reasoning
  make_cold_data.py  cold-start CoT data by modality bridging (the synthetic teachers)
  train_sft.py       Vision-R1-CI: cold-start SFT of the base model
  train_grpo.py      Vision-R1: GRPO with PTST, stage 1 then stage 2 (lengths scaled to the world)
  train_grpo.py      the ablations: Zero (from base, R1-Zero prompt, 0.5/0.5 reward) and Long
  evaluate.py        every model (and Vision-R1 after stage 1) on the held-out test split; the
                     tables below are read from its summary files: Table 4, and each model's
                     accuracy per response-length bucket (the paper's CI analysis); then
                     PTST's suppression and growth, Long's accuracy peak and Zero's reward
  plot.py            reward, rollout-accuracy and response-length curves of the GRPO runs

All runs log to one wandb group (offline unless WANDB_MODE says otherwise). An --out that holds
files is refused; --resume continues a pipeline that stopped: every step continues its own run
(each script's --resume), and the synthetic world is built only when it is not there yet.

With --arch mllama the world's model is a random Llama 3.2 Vision and the pipeline is the paper's
LlamaV-CI: synthetic.py, the base SFT, cold data, the CI SFT, then evaluate.py on base and CI,
ending with a CI-vs-base table. No GRPO stages and no curves: train_grpo.py serves Qwen2.5-VL only.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from fractions import Fraction

import launch
from train_utils import check_run_folder, command_line

SIZES = {
    # world preset, SFT epochs (base, CI), held-out records and global batch, GRPO steps per stage
    # (Vision-R1 stages 1 and 2; Zero; Long), prompts per GRPO step, evaluation problems and samples
    # per problem
    "full": dict(world="toy", base_epochs=1, ci_epochs=6, holdout=64, sft_batch=16, stage_steps=(30, 30),
                 zero_steps=60, long_steps=60, prompts=8, test=300, samples=4, length_scale="1/32"),
    # the tiny world's 20 train problems keep ~13 cold CoTs: less than the toy preset's batch of 16
    "mini": dict(world="tiny", base_epochs=2, ci_epochs=2, holdout=0, sft_batch=8, stage_steps=(2, 2), zero_steps=2,
                 long_steps=2, prompts=2, test=6, samples=1, length_scale="1/256"),
}
# length_scale: the paper's 4K / 8K / 16K response caps become 128 / 256 / 512 tokens at 1/32


def run(args, log):
    """One step: `python <script> <args>`, echoed, its output written to the log, then its wall time
    (where a pipeline's minutes go) on the console and in the log. The step is a fork of this process
    (launch.py: the libraries are imported once here, not again by every step)."""
    command = "$ python " + " ".join(args)
    print(command, flush=True)
    start = time.monotonic()
    with open(log, "a") as f:
        f.write(command + "\n")
        f.flush()
        status = launch.run_forked(args[0], args[1:], f)
        if status:
            raise subprocess.CalledProcessError(status, [sys.executable, *args])
        took = f"  took {time.monotonic() - start:.0f} s"
        f.write(took + "\n")
    print(took, flush=True)


@command_line
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/toy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--resume", action="store_true", help="continue the pipeline run in --out")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads of every step, whatever the machine's cores: a float sum split over "
                             "another number of threads rounds otherwise, and the models drift apart over the SFT "
                             "epochs, so the README's numbers are those of 2 threads")
    parser.add_argument("--arch", choices=("qwen2_5_vl", "mllama"), default="qwen2_5_vl",
                        help="the world's model: Qwen2.5-VL (every stage, Table 4) or Llama 3.2 Vision "
                             "(mllama: the cold start and a CI-vs-base table; no GRPO stages)")
    args = parser.parse_args(argv)
    size, out, seed = SIZES[args.size], args.out, str(args.seed)
    check_run_folder(out, args.resume, "--out")
    resume = ["--resume"] if args.resume else []
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "pipeline.log")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)  # every step's torch threads
    launch.preload()
    mllama = args.arch == "mllama"
    group = ["--wandb-group", f"toy-{'mllama-' if mllama else ''}{args.size}-seed{seed}"]
    max_tokens = str(round(16384 * Fraction(size["length_scale"])))  # evaluation: the longest cap
    # the paper's CI length buckets (0-4K, 4-8K, 8K+) at the same scale
    buckets = ["--length-buckets", ",".join(str(round(edge * Fraction(size["length_scale"]))) for edge in (4096, 8192))]
    cold_start(out, size, seed, ["--arch", "mllama"] if mllama else [], group, resume, log)
    if mllama:
        models = {"base": f"{out}/base/final", "LlamaV-CI": f"{out}/ci/final"}
        run(["evaluate.py", *sum((["--model", path] for path in models.values()), []), "--bench", "synthetic",
             "--data", f"{out}/data/test.jsonl", "--out", f"{out}/eval", "--n", str(size["samples"]), *resume,
             "--max-new-tokens", max_tokens, "--limit", str(size["test"]), *buckets], log)
        print(accuracy_table(out, models))
        return
    grpo_common = ["--preset", "toy", "--length-scale", size["length_scale"], "--cold-start", f"{out}/ci/final",
                   "--base", f"{out}/base/final", "--out-root", f"{out}/grpo", "--data", f"{out}/data/rl.jsonl",
                   "--prompts-per-rollout", str(size["prompts"]), "--prompts-per-update", str(size["prompts"]),
                   "--seed", seed, *group, *resume]
    s1, s2 = size["stage_steps"]

    run(["train_grpo.py", *grpo_common, "--schedule", "vision-r1", "--stage", "1",
         "--stages", f"4Kx16x{s1},8Kx8x{s2}"], log)
    run(["train_grpo.py", *grpo_common, "--schedule", "vision-r1", "--stage", "2",
         "--stages", f"4Kx16x{s1},8Kx8x{s2}"], log)
    run(["train_grpo.py", *grpo_common, "--schedule", "zero", "--stages", f"4Kx16x{size['zero_steps']}"], log)
    run(["train_grpo.py", *grpo_common, "--schedule", "long", "--stages", f"16Kx4x{size['long_steps']}"], log)

    models = {"Vision-R1-Zero": f"{out}/grpo/zero/stage1/final", "Vision-R1-CI": f"{out}/ci/final",
              "Vision-R1-Long": f"{out}/grpo/long/stage1/final", "Vision-R1": f"{out}/grpo/vision-r1/stage2/final"}
    # the paper's protocol (temperature 0.6, top-p 0.95: evaluate.py's defaults), 4 samples per problem
    sampling = ["--n", str(size["samples"]), *buckets, *resume]
    # Zero is asked with the prompt it was trained with; the others with the template's default
    zero_prompt = ["--system", _r1_zero_prompt()]
    run(["evaluate.py", "--model", models["Vision-R1-Zero"], "--bench", "synthetic", "--data", f"{out}/data/test.jsonl",
         "--out", f"{out}/eval", *sampling, "--max-new-tokens", max_tokens, "--limit", str(size["test"]), *zero_prompt], log)
    stage1 = f"{out}/grpo/vision-r1/stage1/final"  # PTST's suppression stage, its own row in the length table
    run(["evaluate.py", *sum((["--model", path] for path in (models["Vision-R1-CI"], stage1, models["Vision-R1-Long"],
                                                             models["Vision-R1"])), []),
         "--bench", "synthetic", "--data", f"{out}/data/test.jsonl", "--out", f"{out}/eval", *sampling,
         "--max-new-tokens", max_tokens, "--limit", str(size["test"])], log)
    run(["plot.py", "--runs", f"{out}/grpo/vision-r1/stage1", f"{out}/grpo/vision-r1/stage2", f"{out}/grpo/long/stage1",
         f"{out}/grpo/zero/stage1", "--out", f"{out}/curves.png"], log)
    print(table4(out, models))
    print("\n" + length_table(out, {**models, "Vision-R1 stage 1": stage1}))
    print("\n" + ptst_lines(out, models, stage1))


def cold_start(out, size, seed, arch, group, resume, log):
    """The steps both architectures run: the world (built with `arch`, synthetic.py's --arch
    arguments, unless --resume finds it), the base SFT, cold-start data, the CI SFT of the base."""
    if not (resume and os.path.exists(f"{out}/model/model.safetensors")):  # written last
        run(["synthetic.py", "--out", out, "--seed", seed, "--preset", size["world"], *arch], log)
    run(["train_sft.py", "--preset", "toy", "--model", f"{out}/model", "--data", f"{out}/data/base_sft.jsonl",
         "--out", f"{out}/base", "--epochs", str(size["base_epochs"]), "--eval-holdout", str(size["holdout"]),
         "--global-batch", str(size["sft_batch"]), "--seed", seed, "--run-name", "base", *group, *resume],
        log)
    run(["make_cold_data.py", "build", "--input", f"{out}/data/train.jsonl", "--out", f"{out}/cold/cold.jsonl",
         "--describer", "synthetic", "--reasoner", "synthetic", "--error-rate", "0.2", "--seed", seed, *resume], log)
    run(["train_sft.py", "--preset", "toy", "--model", f"{out}/base/final", "--data", f"{out}/cold/cold.jsonl",
         "--out", f"{out}/ci", "--epochs", str(size["ci_epochs"]), "--eval-holdout", str(size["holdout"]),
         "--global-batch", str(size["sft_batch"]), "--seed", seed, "--run-name", "ci", *group, *resume], log)


def _r1_zero_prompt():
    import rewards
    return rewards.R1_ZERO_SYSTEM_PROMPT


def table4(out, models):
    """The paper's Table 4 columns, every number read from evaluate.py's summary files."""
    flags = {"Vision-R1-Zero": ("", "yes", ""), "Vision-R1-CI": ("yes", "", ""),
             "Vision-R1-Long": ("yes", "yes", ""), "Vision-R1": ("yes", "yes", "yes")}
    rows = ["| method | cold start | GRPO | PTST | mean length | accuracy |", "|---|---|---|---|---|---|"]
    for method, path in models.items():
        summary = read_summary(out, path)
        rows.append(f"| {method} | {' | '.join(flags[method])} | {summary['mean_tokens']:.0f} | "
                    f"{100 * summary['accuracy']:.1f} |")
    return "\n".join(rows)


def length_table(out, models):
    """Mean response length, accuracy and, per length bucket (the paper's 0-4K, 4-8K, 8K+ at the
    world's scale), the share of responses and their accuracy, one row per model, CI first: the
    over-thinking of the cold start and what PTST does to it."""
    order = ["Vision-R1-CI", "Vision-R1 stage 1", "Vision-R1", "Vision-R1-Long", "Vision-R1-Zero"]
    summaries = {method: read_summary(out, models[method]) for method in order}
    labels = list(summaries["Vision-R1-CI"]["by_length"])
    rows = ["| model | mean length | accuracy | " + " | ".join(f"{label} tokens: share / accuracy" for label in labels)
            + " |", "|---" * (3 + len(labels)) + "|"]
    for method, summary in summaries.items():
        cells = [f"{100 * b['share']:.0f}% / " + ("-" if b["accuracy"] is None else f"{100 * b['accuracy']:.1f}")
                 for b in summary["by_length"].values()]
        rows.append(f"| {method} | {summary['mean_tokens']:.0f} | {100 * summary['accuracy']:.1f} | "
                    + " | ".join(cells) + " |")
    return "\n".join(rows)


END_STEPS = 5  # Zero's reward: its first and last steps


def ptst_lines(out, models, stage1):
    """What the paper builds PTST on (its Fig. 1), read from this run's files: Vision-R1's held-out
    mean length and accuracy at CI, after stage 1 (suppression) and after stage 2 (growth again);
    the step at which Long's rollout accuracy (its trailing mean over plot.SMOOTH_STEPS steps, the
    curve plot.py draws) peaks; Zero's training reward over its first and its last END_STEPS steps
    (fewer when it ran fewer).
    Example: lengths 120 -> 84 -> 90 print "-30.0%" and "+7.1%"."""
    import plot

    ci, suppressed, grown = (read_summary(out, path) for path in (models["Vision-R1-CI"], stage1, models["Vision-R1"]))
    length = [s["mean_tokens"] for s in (ci, suppressed, grown)]
    accuracy = " -> ".join(f"{100 * s['accuracy']:.1f}" for s in (ci, suppressed, grown))
    long_rows = plot.read_metrics(os.path.dirname(models["Vision-R1-Long"]))
    long_accuracy = plot.trailing_mean([row["accuracy"] for row in long_rows], plot.SMOOTH_STEPS)
    peak = long_accuracy.index(max(long_accuracy))
    zero_reward = [row["reward"] for row in plot.read_metrics(os.path.dirname(models["Vision-R1-Zero"]))]
    ends = min(END_STEPS, len(zero_reward))  # --size mini runs 2 steps
    return "\n".join([
        f"Vision-R1: mean length {length[0]:.1f} (CI) -> {length[1]:.1f} after stage 1 "
        f"({length[1] / length[0] - 1:+.1%}) -> {length[2]:.1f} after stage 2 ({length[2] / length[1] - 1:+.1%}); "
        f"accuracy {accuracy}",
        f"Vision-R1-Long: rollout accuracy (trailing mean of {plot.SMOOTH_STEPS} steps) peaks at step {peak + 1} of "
        f"{len(long_accuracy)}: {100 * long_accuracy[peak]:.1f} (last step {100 * long_accuracy[-1]:.1f})",
        f"Vision-R1-Zero: training reward {statistics.fmean(zero_reward[:ends]):.2f} (first {ends} steps) -> "
        f"{statistics.fmean(zero_reward[-ends:]):.2f} (last {ends})"])


def read_summary(out, path):
    """evaluate.py's summary of the checkpoint `path` on the world's test split."""
    with open(os.path.join(out, "eval", "synthetic", _eval_name(path), "summary.json")) as f:
        return json.load(f)


def accuracy_table(out, models):
    """Mean response length and accuracy of each of `models` {row name: checkpoint}, read from
    evaluate.py's summary files (the paper's LlamaV-CI against its base, on the world's test split)."""
    rows = ["| model | mean length | accuracy |", "|---|---|---|"]
    for method, path in models.items():
        summary = read_summary(out, path)
        rows.append(f"| {method} | {summary['mean_tokens']:.0f} | {100 * summary['accuracy']:.1f} |")
    return "\n".join(rows)


def _eval_name(path):
    import evaluate
    return evaluate.model_name(path)


if __name__ == "__main__":
    sys.exit(main())
