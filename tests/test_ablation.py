"""Forking for an ablation: each worked example of the README applies, as written, to a copy of the
repository and its command runs on the tiny world; a run never writes into another run's folder and
records how it was made (config.json with the commit, the fork's diff); --reward names a registered
training reward."""

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess

import pytest

import train_grpo
import train_sft
import train_utils
from tests.scripts import ROOT
from tests import scripts

GIT_IDENTITY = ["-c", "user.name=fork", "-c", "user.email=fork@localhost", "-c", "commit.gpgsign=false"]


def readme_examples():
    """[(title, diff, commands)]: each example of the README's "Forking for an ablation", its
    ```diff block as written and the `python ...` lines of its ```bash block, split as a shell would."""
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("## Forking for an ablation\n", 1)[1].split("\n## ", 1)[0]
    examples = []
    for part in section.split("\n### ")[1:]:
        diff = re.search(r"```diff\n(.*?)```", part, re.DOTALL).group(1)
        bash = re.search(r"```bash\n(.*?)```", part, re.DOTALL).group(1)
        commands = [shlex.split(line, comments=True) for line in bash.splitlines() if line.startswith("python ")]
        examples.append((part.splitlines()[0], diff, commands))
    return examples


EXAMPLES = readme_examples()


def fork(folder):
    """A copy of this checkout's files (tracked, and untracked ones git does not ignore) committed
    as a git repository of its own: the fork the examples' diffs apply to."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in listed:
        if name and os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.join(folder, os.path.dirname(name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(folder, name))
    for command in (["init", "-q"], ["add", "-A"], [*GIT_IDENTITY, "commit", "-qm", "the fork's base"]):
        subprocess.run(["git", *command], cwd=folder, check=True, capture_output=True)
    return folder


def flag(command, name, default=None):
    return command[command.index(name) + 1] if name in command else default


def toy_size(tiny_world):
    """Flags appended to a README command: the tiny world's model and problems, 12-token responses,
    2 prompts and one step per stage (the schedule's name, hence its folder, stays the command's)."""
    model = os.path.join(tiny_world, "model")
    return ["--cold-start", model, "--base", model, "--data", os.path.join(tiny_world, "data", "rl.jsonl"),
            "--stages", "12x4x1,12x2x1", "--length-scale", "1", "--prompts-per-rollout", "2",
            "--prompts-per-update", "2", "--save-every", "0", "--table-every", "0"]


@pytest.mark.parametrize("title, diff, commands", EXAMPLES, ids=[title.split(" (")[0] for title, _, _ in EXAMPLES])
def test_readme_fork_example_applies_to_one_file_and_runs_into_its_own_folder(tiny_world, tmp_path, title, diff,
                                                                                commands):
    files = re.findall(r"^diff --git a/(\S+) b/", diff, re.MULTILINE)
    added = [line[1:] for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert len(files) == 1 and f"(`{files[0]}`, {len(added)} line" in title  # the title says what the diff is
    repo = fork(tmp_path / "fork")
    (tmp_path / "example.diff").write_text(diff)
    subprocess.run(["git", "apply", str(tmp_path / "example.diff")], cwd=repo, check=True)

    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    outputs = []
    for command in commands:
        assert command[0] == "python"
        extra = toy_size(tiny_world) if command[1] == "train_grpo.py" else []
        done = scripts.run(command[1], [*command[2:], *extra], cwd=repo, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append(done.stdout)

    for command in (c for c in commands if c[1] == "train_grpo.py"):
        assert flag(command, "--wandb-group") == "toy-ablations"
        schedule, stage = flag(command, "--schedule", "vision-r1"), flag(command, "--stage")
        folder = repo / flag(command, "--out-root") / schedule / f"stage{stage}"
        with open(folder / "metrics.jsonl") as f:
            (row,) = map(json.loads, f)
        with open(folder / "config.json") as f:
            config = json.load(f)
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
        assert config["git_commit"] == head and config["uncommitted_changes"]
        assert all(line in (folder / "uncommitted.diff").read_text() for line in added)  # the fork's own diff
        assert config["config"]["out"] == os.path.relpath(folder, repo)
        assert config["config"]["wandb_group"] == "toy-ablations"
        checks = {  # the fork is what ran
            "train_grpo.py": lambda: config["config"]["scale_advantages"] is False
            and config["config"]["agg"] == "seq-mean-token-sum-norm",
            "ptst.py": lambda: config["config"]["schedule"] == "2Kx32-8Kx8",
            "rewards.py": lambda: config["config"]["reward"] == "hard-short"
            and abs(row["reward"] - (row["accuracy"] - 1e-4 * row["response_length"])) < 1e-6,
        }
        assert checks[files[0]](), (config["config"], row)
    if files[0] == "ptst.py":  # the schedule as written: the paper's lengths, scaled to the toy's
        assert "schedule 2Kx32-8Kx8" in outputs[0] and re.search(r"1\s+64\s+32\s+100", outputs[0])
        with open(repo / "runs/toy/ablations/2Kx32-8Kx8/stage2/config.json") as f:
            assert json.load(f)["config"]["init"] == "runs/toy/ablations/2Kx32-8Kx8/stage1/final"


def snapshot(folder):
    """{relative path: sha256} of every file under `folder`."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                files[os.path.relpath(os.path.join(root, name), folder)] = hashlib.sha256(f.read()).hexdigest()
    return files


@pytest.mark.parametrize("trainer", ["train_sft", "train_grpo"])
def test_a_second_run_into_a_run_folder_is_refused_and_leaves_it_byte_identical(tiny_world, tmp_path, trainer,
                                                                                 monkeypatch):
    """The same command twice: the first run writes config.json (every setting as resolved, the
    git commit) beside its checkpoints; the second, without --resume, stops with one line naming the
    folder and the flag that gives a run its own, and every file of the first is unchanged."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    model = os.path.join(tiny_world, "model")
    if trainer == "train_sft":
        main, out_flag, folder = train_sft.main, "--out", tmp_path / "run"
        argv = ["--preset", "toy", "--model", model, "--data", os.path.join(tiny_world, "data", "base_sft.jsonl"),
                "--out", str(folder), "--global-batch", "8", "--epochs", "0.2", "--eval-holdout", "0"]
    else:
        main, out_flag, folder = train_grpo.main, "--out-root", tmp_path / "runs" / "vision-r1" / "stage1"
        argv = ["--preset", "toy", "--init", model, "--ref", model, *toy_size(tiny_world),
                "--out-root", str(tmp_path / "runs")]
    main(argv)
    before = snapshot(folder)
    assert {"config.json", "metrics.jsonl", "final/model.safetensors"} <= set(before)
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code == (f"{folder} holds a run already: --resume continues it, "
                                  f"another {out_flag} starts a new one")
    assert snapshot(folder) == before

    with open(folder / "config.json") as f:
        config = json.load(f)
    commit, diff = train_utils.git_state()
    assert (config["git_commit"], config["uncommitted_changes"]) == (commit, bool(diff)) and commit
    assert config["config"]["out"] == str(folder) and config["config"]["attention"] == "sdpa"  # resolved
    assert config["config"]["param_dtype"] == "float32"  # the toy preset's value


def test_reward_flag_names_a_registered_reward(capsys):
    """--reward overrides the schedule's training reward by its name in rewards.REWARDS; any other
    name is a usage error that lists them."""
    cfg = train_utils.parse_config(train_grpo.GRPOConfig, train_grpo.PRESETS,
                                   ["--schedule", "long", "--reward", "zero"])
    assert train_grpo.resolve_schedule(cfg).reward == "zero"
    with pytest.raises(SystemExit) as refused:
        train_utils.parse_config(train_grpo.GRPOConfig, train_grpo.PRESETS, ["--reward", "shortest"])
    assert refused.value.code == 2
    assert "reward 'shortest' is not one of rewards.REWARDS: hard, zero" in capsys.readouterr().err
