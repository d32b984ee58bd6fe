"""The main job at toy size: every stage of pipeline.py runs, and the Table 4 it prints is the
one in evaluate.py's summary files."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.scripts import ROOT


def test_mini_pipeline_runs_every_stage_and_prints_table4(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}  # pipeline.py's --threads 2 rules
    out = subprocess.run([sys.executable, "pipeline.py", "--size", "mini", "--out", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:] + (tmp_path / "pipeline.log").read_text()[-3000:]
    console = out.stdout.splitlines()
    steps = [i for i, line in enumerate(console) if line.startswith("$ python ")]
    assert len(steps) == 11 and all(re.fullmatch(r"  took \d+ s", console[i + 1]) for i in steps)  # each step's time
    tables = out.stdout[out.stdout.index("| method |"):].strip().split("\n\n")
    table, lengths, ptst = (block.splitlines() for block in tables)
    assert [row.split("|")[1].strip() for row in table[2:]] == ["Vision-R1-Zero", "Vision-R1-CI", "Vision-R1-Long",
                                                                 "Vision-R1"]
    for row, name in zip(table[2:], ["zero-stage1-final", "ci-final", "long-stage1-final", "vision-r1-stage2-final"]):
        summary = json.loads((tmp_path / "eval" / "synthetic" / name / "summary.json").read_text())
        cells = [c.strip() for c in row.split("|")]
        assert cells[5] == f"{summary['mean_tokens']:.0f}" and cells[6] == f"{100 * summary['accuracy']:.1f}"
    # the length table: the paper's buckets at 1/256 (0-16, 17-32, >32 tokens), each bucket's share and accuracy
    assert lengths[0].split(" | ")[3:] == ["0-16 tokens: share / accuracy", "17-32 tokens: share / accuracy",
                                           ">32 tokens: share / accuracy |"]
    names = ["ci-final", "vision-r1-stage1-final", "vision-r1-stage2-final", "long-stage1-final", "zero-stage1-final"]
    for row, name in zip(lengths[2:], names, strict=True):
        summary = json.loads((tmp_path / "eval" / "synthetic" / name / "summary.json").read_text())
        shares = [f"{100 * b['share']:.0f}% / " + ("-" if b["accuracy"] is None else f"{100 * b['accuracy']:.1f}")
                  for b in summary["by_length"].values()]
        assert [c.strip() for c in row.split("|")[2:-1]] == [f"{summary['mean_tokens']:.0f}",
                                                            f"{100 * summary['accuracy']:.1f}", *shares]
    assert [line.split(":")[0] for line in ptst] == ["Vision-R1", "Vision-R1-Long", "Vision-R1-Zero"]
    for stage in ("vision-r1/stage1", "vision-r1/stage2", "zero/stage1", "long/stage1"):
        assert (tmp_path / "grpo" / stage / "final" / "model.safetensors").exists()
    for run in ("base", "ci", "grpo/vision-r1/stage1", "grpo/long/stage1"):
        assert json.loads((tmp_path / run / "config.json").read_text())["torch_threads"] == 2
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "cold" / "cold.summary.json").read_text())["kept"] > 0


def test_mllama_mini_pipeline_runs_the_cold_start_and_prints_the_ci_vs_base_table(tmp_path):
    """--arch mllama: the world's model is a Llama 3.2 Vision, both SFTs train it, evaluate.py scores
    base and CI, and the table's numbers are the summary files'; no GRPO stage runs."""
    env = {**os.environ, "WANDB_MODE": "disabled"}  # the Qwen pipeline above runs wandb (offline): ~4 s a step
    out = subprocess.run([sys.executable, "pipeline.py", "--arch", "mllama", "--size", "mini", "--out", str(tmp_path),
                          "--threads", "1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:] + (tmp_path / "pipeline.log").read_text()[-3000:]
    table = out.stdout[out.stdout.index("| model |"):].strip().splitlines()
    assert [row.split("|")[1].strip() for row in table[2:]] == ["base", "LlamaV-CI"]
    for row, name in zip(table[2:], ["base-final", "ci-final"]):
        summary = json.loads((tmp_path / "eval" / "synthetic" / name / "summary.json").read_text())
        cells = [c.strip() for c in row.split("|")]
        assert cells[2] == f"{summary['mean_tokens']:.0f}" and cells[3] == f"{100 * summary['accuracy']:.1f}"
    for run in ("model", "base/final", "ci/final"):
        assert json.loads((tmp_path / run / "config.json").read_text())["model_type"] == "mllama"
    assert json.loads((tmp_path / "ci" / "config.json").read_text())["torch_threads"] == 1
    assert json.loads((tmp_path / "cold" / "cold.summary.json").read_text())["kept"] > 0
    assert not (tmp_path / "grpo").exists() and "train_grpo.py" not in (tmp_path / "pipeline.log").read_text()


def test_plot_smooths_with_a_trailing_mean_and_chains_stages(tmp_path):
    import plot

    assert plot.trailing_mean([1, 3, 5, 7], 2) == [1.0, 2.0, 4.0, 6.0]
    assert plot.trailing_mean([2.0], 10) == [2.0]
    for stage, rewards in (("stage1", [0.1, 0.2]), ("stage2", [0.3])):
        (tmp_path / "run" / stage).mkdir(parents=True)
        (tmp_path / "run" / stage / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": i + 1, "stage": stage, "reward": r}) + "\n" for i, r in enumerate(rewards)))
    rows = plot.curves([str(tmp_path / "run" / "stage2"), str(tmp_path / "run" / "stage1")])["run"]
    assert [(row["global_step"], row["reward"]) for row in rows] == [(1, 0.1), (2, 0.2), (3, 0.3)]


def test_ptst_lines_read_the_suppression_the_growth_long_s_peak_and_zero_s_reward(tmp_path):
    """Hand-made summaries and metrics: lengths 120 -> 84 -> 90 are -30.0% and +7.1%; Long's accuracy
    [1, 0 x 9, 0.5, 0.2] has trailing means of 10 steps 1.0, 0.5, ..., 0.1, 0.05, 0.07 (a mean over
    all steps so far would end at 0.14); Zero's rewards 0, 0.1, ..., 0.6 average 0.2 over the first five
    steps and 0.4 over the last five."""
    import pipeline

    for name, tokens, accuracy in (("ci-final", 120, 0.5), ("vision-r1-stage1-final", 84, 0.55),
                                   ("vision-r1-stage2-final", 90, 0.625)):
        (tmp_path / "eval" / "synthetic" / name).mkdir(parents=True)
        (tmp_path / "eval" / "synthetic" / name / "summary.json").write_text(
            json.dumps({"mean_tokens": tokens, "accuracy": accuracy}))
    for run, key, values in (("long", "accuracy", [1.0] + [0.0] * 9 + [0.5, 0.2]),
                             ("zero", "reward", [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])):
        (tmp_path / "grpo" / run / "stage1").mkdir(parents=True)
        (tmp_path / "grpo" / run / "stage1" / "metrics.jsonl").write_text("".join(
            json.dumps({"step": i + 1, "reward": 0.0, key: value}) + "\n" for i, value in enumerate(values)))
    out = str(tmp_path)
    models = {"Vision-R1-Zero": f"{out}/grpo/zero/stage1/final", "Vision-R1-CI": f"{out}/ci/final",
              "Vision-R1-Long": f"{out}/grpo/long/stage1/final", "Vision-R1": f"{out}/grpo/vision-r1/stage2/final"}
    assert pipeline.ptst_lines(out, models, f"{out}/grpo/vision-r1/stage1/final").splitlines() == [
        "Vision-R1: mean length 120.0 (CI) -> 84.0 after stage 1 (-30.0%) -> 90.0 after stage 2 (+7.1%); "
        "accuracy 50.0 -> 55.0 -> 62.5",
        "Vision-R1-Long: rollout accuracy (trailing mean of 10 steps) peaks at step 1 of 12: 100.0 (last step 7.0)",
        "Vision-R1-Zero: training reward 0.20 (first 5 steps) -> 0.40 (last 5)"]


def test_an_out_that_holds_a_run_is_refused_before_any_step(tmp_path):
    """The synthetic world is the first step: a second pipeline into the same --out stops before it."""
    import pipeline

    (tmp_path / "pipeline.log").write_text("an earlier run\n")
    with pytest.raises(SystemExit) as refused:
        pipeline.main(["--out", str(tmp_path)])
    assert refused.value.code == f"{tmp_path} holds a run already: --resume continues it, another --out starts a new one"
    assert os.listdir(tmp_path) == ["pipeline.log"]
