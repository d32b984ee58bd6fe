"""Bad input at every entry point (data.py check, train_sft.py, train_grpo.py, evaluate.py,
make_cold_data.py, generate.py): each bad data file, checkpoint and flag x each script that reads it
ends with its message (the file, and for data the line, named), exit code 1 (2 for a flag), no
traceback, and the files an earlier good run left in the output folder unchanged, even where the
script continues that run (--resume; without it the folder is refused before any input is read).

Scripts run in-process through their main (as their command line calls it); one subprocess case
shows the real command line prints no traceback either."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist

import data
import evaluate
import generate
import make_cold_data
import train_grpo
import train_sft
import train_utils
from tests.scripts import ROOT
from tests.test_data import png_claiming_size

BAD_LINE = 5


@pytest.fixture(autouse=True)
def quiet_and_alone(monkeypatch):
    """No wandb files, and no process group left behind by a run that stopped half way."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("RANK", raising=False)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def run(main, argv, capsys):
    """(exit code, all output) of a script's main run as its command line runs it: Python prints
    a SystemExit's message on stderr and exits 1; any other exception fails the test with its traceback."""
    try:
        returned = main(argv)
        code = returned if isinstance(returned, int) else 0
        message = ""
    except SystemExit as e:
        code = 1 if isinstance(e.code, str) else (e.code or 0)
        message = e.code if isinstance(e.code, str) else ""
    out = capsys.readouterr()
    return code, out.out + out.err + message


def snapshot(folder):
    """{relative path: sha256} of every file under `folder`."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return files


# ----------------------------------------------------------------------------- good inputs

def records(tiny_world, name, count=6):
    """The first `count` records of a tiny-world file, image paths made absolute."""
    with open(os.path.join(tiny_world, "data", name)) as f:
        rows = [json.loads(line) for line in f][:count]
    for row in rows:
        row["images"] = [os.path.join(tiny_world, "data", image) for image in row["images"]]
    return rows


@pytest.fixture(scope="module")
def good_run(tiny_world, tmp_path_factory):
    """An output folder as an earlier good run left it: make_cold_data.py's cold.jsonl, its
    rejected file and summary, from three problems."""
    folder = tmp_path_factory.mktemp("good_run")
    source = folder / "problems.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records(tiny_world, "train.jsonl", 3)))
    assert make_cold_data.main(["build", "--input", str(source), "--out", str(folder / "cold.jsonl")]) == 0
    source.unlink()
    assert {"cold.jsonl", "cold.rejected.jsonl", "cold.summary.json"} <= set(os.listdir(folder))
    return folder


@pytest.fixture
def out(good_run, tmp_path):
    """This case's copy of the good run's output folder."""
    return str(shutil.copytree(good_run, tmp_path / "out"))


# ----------------------------------------------------------------------------- bad data files

PROBLEM_CASES = ["malformed_json", "missing_image", "truncated_image", "decompression_bomb", "empty_file",
                 "parquet_without_column"]
CONVERSATION_CASES = [*PROBLEM_CASES, "no_assistant_turn", "empty_answer"]
IMAGE_CASES = {"missing_image", "truncated_image", "decompression_bomb"}


def bad_file(tiny_world, tmp_path, kind, case):
    """A file of six good records of `kind` ("problems" or "conversations") but for line 5, which
    has the `case`; "empty_file" is 0 bytes; "parquet_without_column" lacks its question or turns
    (every row is bad)."""
    rows = records(tiny_world, "rl.jsonl" if kind == "problems" else "base_sft.jsonl")
    bad = rows[BAD_LINE - 1]
    if case == "parquet_without_column":
        path = tmp_path / f"{kind}.parquet"
        dropped = "question" if kind == "problems" else "conversations"
        pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k not in (dropped, "meta")}
                                             for r in rows]), path)
        return str(path)
    if case == "missing_image":
        bad["images"] = [str(tmp_path / "nowhere.png")]
    elif case == "truncated_image":
        with open(rows[0]["images"][0], "rb") as f:
            whole = f.read()
        (tmp_path / "truncated.png").write_bytes(whole[:len(whole) // 2])
        bad["images"] = [str(tmp_path / "truncated.png")]
    elif case == "decompression_bomb":
        (tmp_path / "bomb.png").write_bytes(png_claiming_size(20000, 20000))
        bad["images"] = [str(tmp_path / "bomb.png")]
    elif case == "no_assistant_turn":
        bad["conversations"] = bad["conversations"][:1]
    elif case == "empty_answer":
        bad["conversations"][1]["value"] = ""
    lines = [json.dumps(r) for r in rows]
    if case == "malformed_json":
        lines[BAD_LINE - 1] = lines[BAD_LINE - 1][:30]
    path = tmp_path / f"{kind}.jsonl"
    path.write_text("" if case == "empty_file" else "\n".join(lines) + "\n")
    return str(path)


def model_dir(tiny_world):
    return os.path.join(tiny_world, "model")


# each entry point as argv for its main, given (data file, output folder, checkpoint)
READERS = {
    "problems": {
        "data.py check": (data.main, lambda path, out, ckpt: ["check", path]),
        "train_grpo.py": (train_grpo.main, lambda path, out, ckpt: [
            "--preset", "toy", "--init", ckpt, "--ref", ckpt, "--data", path, "--out-root", out,
            "--stages", "8x2x1", "--length-scale", "1", "--prompts-per-rollout", "2", "--prompts-per-update", "2"]),
        "evaluate.py": (evaluate.main, lambda path, out, ckpt: [
            "--model", ckpt, "--bench", "synthetic", "--data", path, "--out", out, "--max-new-tokens", "4",
            "--attention", "sdpa"]),
        "make_cold_data.py build": (make_cold_data.main, lambda path, out, ckpt: [
            "build", "--input", path, "--out", os.path.join(out, "cold.jsonl"), "--resume"]),
        "generate.py": (generate.main, lambda path, out, ckpt: [
            "--model", ckpt, "--prompts", path, "--out", os.path.join(out, "completions.jsonl"),
            "--max-new-tokens", "4"]),
    },
    "conversations": {
        "data.py check": (data.main, lambda path, out, ckpt: ["check", path]),
        "train_sft.py": (train_sft.main, lambda path, out, ckpt: [
            "--preset", "toy", "--model", ckpt, "--data", path, "--out", out, "--global-batch", "2",
            "--eval-holdout", "0", "--epochs", "1", "--resume"]),
        "make_cold_data.py stats": (make_cold_data.main, lambda path, out, ckpt: ["stats", path]),
    },
}
CASES = {"problems": PROBLEM_CASES, "conversations": CONVERSATION_CASES}
DATA_TABLE = [(kind, case, entry) for kind, cases in CASES.items() for case in cases for entry in READERS[kind]
              if not (entry == "make_cold_data.py stats" and case in IMAGE_CASES)]  # stats reads text only


@pytest.mark.parametrize("kind, case, entry", DATA_TABLE, ids=[f"{k}-{c}-{e}" for k, c, e in DATA_TABLE])
def test_bad_data_file(tiny_world, tmp_path, out, capsys, kind, case, entry):
    path = bad_file(tiny_world, tmp_path, kind, case)
    main, argv = READERS[kind][entry]
    before = snapshot(out)
    code, output = run(main, argv(path, out, model_dir(tiny_world)), capsys)
    assert code == 1, output
    assert "Traceback" not in output
    line = 1 if case in ("empty_file", "parquet_without_column") else BAD_LINE
    assert f"{path}:{line}: " in output, output
    assert snapshot(out) == before


def test_check_names_an_empty_answer_on_its_line(tiny_world, tmp_path, capsys):
    path = bad_file(tiny_world, tmp_path, "conversations", "empty_answer")
    assert data.main(["check", path]) == 1
    report = capsys.readouterr().out.splitlines()
    assert report[0] == f"{path}:{BAD_LINE}: empty answer: assistant turn 1 is empty"
    assert report[1] == f"{path}: 5 good of 6 conversations records (empty answer: 1)"


def test_skip_bad_skips_an_empty_answer_but_not_an_empty_file(tiny_world, tmp_path, capsys):
    path = bad_file(tiny_world, tmp_path, "conversations", "empty_answer")
    kept = data.load_conversations(path, skip_bad=True)
    assert len(kept) == 5 and all(m["content"] for r in kept for m in r["messages"])
    assert f"{path}: skipped 1 of 6 records (empty answer: 1)" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    empty = bad_file(tiny_world, tmp_path / "empty", "conversations", "empty_file")
    with pytest.raises(data.DataError, match=f"{empty}:1: empty file"):
        data.load_conversations(empty, skip_bad=True)
    assert data.main(["check", empty, "--skip-bad"]) == 1


# ----------------------------------------------------------------------------- bad checkpoints

CHECKPOINT_CASES = ["pickle_checkpoint", "pickle_named_safetensors"]


def bad_checkpoint(tiny_world, tmp_path, case):
    """The tiny world's checkpoint folder (config, tokenizer, image processor) with its weights as
    `torch.save` wrote them: as pytorch_model.bin, or renamed model.safetensors."""
    folder = tmp_path / case
    shutil.copytree(model_dir(tiny_world), folder, ignore=shutil.ignore_patterns("*.safetensors"))
    name = "pytorch_model.bin" if case == "pickle_checkpoint" else "model.safetensors"
    torch.save({"lm_head.weight": torch.zeros(2, 2)}, folder / name)
    return str(folder)


CHECKPOINT_READERS = {
    "train_sft.py": ("conversations", READERS["conversations"]["train_sft.py"]),
    "train_grpo.py": ("problems", READERS["problems"]["train_grpo.py"]),
    "evaluate.py": ("problems", READERS["problems"]["evaluate.py"]),
    "generate.py": ("problems", READERS["problems"]["generate.py"]),
    "make_cold_data.py build --describer local": ("problems", (make_cold_data.main, lambda path, out, ckpt: [
        "build", "--input", path, "--out", os.path.join(out, "cold.jsonl"), "--describer", "local",
        "--describer-model", ckpt, "--resume"])),
}
CHECKPOINT_TABLE = [(case, entry) for case in CHECKPOINT_CASES for entry in CHECKPOINT_READERS]


@pytest.mark.parametrize("case, entry", CHECKPOINT_TABLE, ids=[f"{c}-{e}" for c, e in CHECKPOINT_TABLE])
def test_bad_checkpoint(tiny_world, tmp_path, out, capsys, case, entry):
    checkpoint = bad_checkpoint(tiny_world, tmp_path, case)
    kind, (main, argv) = CHECKPOINT_READERS[entry]
    good_data = os.path.join(tiny_world, "data", "rl.jsonl" if kind == "problems" else "base_sft.jsonl")
    before = snapshot(out)
    code, output = run(main, argv(good_data, out, checkpoint), capsys)
    assert code == 1, output
    assert "Traceback" not in output
    if case == "pickle_checkpoint":
        assert f"{checkpoint}: found pytorch_model.bin: pickle checkpoints are not loaded" in output, output
    else:
        assert f"not a safetensors file: {checkpoint}/model.safetensors" in output, output
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- bad flags

def flag_cases(tiny_world):
    """(entry, main, argv, the flag the message must name); every one a usage error."""
    problems, conversations = (os.path.join(tiny_world, "data", name) for name in ("rl.jsonl", "base_sft.jsonl"))
    ckpt = model_dir(tiny_world)
    sft, grpo = READERS["conversations"]["train_sft.py"][1], READERS["problems"]["train_grpo.py"][1]
    evaluate_argv, generate_argv = READERS["problems"]["evaluate.py"][1], READERS["problems"]["generate.py"][1]
    return {
        "sft-global-batch-0": (train_sft.main, lambda out: sft(conversations, out, ckpt) + ["--global-batch", "0"],
                               "--global-batch"),
        "sft-max-tokens-0": (train_sft.main, lambda out: sft(conversations, out, ckpt) + ["--max-tokens", "0"],
                             "--max-tokens"),
        "grpo-group-size-1": (train_grpo.main, lambda out: grpo(problems, out, ckpt) + ["--stages", "8x1x1"],
                              "--stages"),
        "grpo-rollout-not-divisible": (train_grpo.main, lambda out: grpo(problems, out, ckpt) + [
            "--prompts-per-rollout", "6", "--prompts-per-update", "4"], "--prompts-per-rollout"),
        "grpo-micro-batch-tokens-0": (train_grpo.main, lambda out: grpo(problems, out, ckpt) + [
            "--micro-batch-tokens", "0"], "--micro-batch-tokens"),
        "evaluate-max-new-tokens-0": (evaluate.main, lambda out: evaluate_argv(problems, out, ckpt) + [
            "--max-new-tokens", "0"], "--max-new-tokens"),
        "generate-batch-size-0": (generate.main, lambda out: generate_argv(problems, out, ckpt) + [
            "--batch-size", "0"], "--batch-size"),
        "generate-n-0": (generate.main, lambda out: generate_argv(problems, out, ckpt) + ["--n", "0"], "--n"),
        "cold-input-is-out": (make_cold_data.main, lambda out: [
            "build", "--input", os.path.join(out, "cold.jsonl"), "--out", os.path.join(out, "cold.jsonl")], "--input"),
        "cold-concurrency-0": (make_cold_data.main, lambda out: [
            "build", "--input", problems, "--out", os.path.join(out, "cold.jsonl"), "--concurrency", "0"],
            "--concurrency"),
    }


FLAG_CASES = ["sft-global-batch-0", "sft-max-tokens-0", "grpo-group-size-1", "grpo-rollout-not-divisible",
              "grpo-micro-batch-tokens-0", "evaluate-max-new-tokens-0", "generate-batch-size-0", "generate-n-0",
              "cold-input-is-out", "cold-concurrency-0"]


@pytest.mark.parametrize("case", FLAG_CASES)
def test_bad_flag(tiny_world, out, capsys, case):
    main, argv, flag = flag_cases(tiny_world)[case]
    before = snapshot(out)
    code, output = run(main, argv(out), capsys)
    assert code == 2, output
    assert "Traceback" not in output
    assert f"error: {flag}" in output or f"argument {flag}" in output, output
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- the mechanism itself

def test_only_rank_0_says_it_and_bugs_keep_their_traceback(monkeypatch):
    @train_utils.command_line
    def main(argv=None):
        raise argv

    with pytest.raises(SystemExit) as stopped:
        main(data.DataError("f.jsonl:5: missing image"))
    assert stopped.value.code == "f.jsonl:5: missing image"
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(SystemExit) as stopped:
        main(data.DataError("f.jsonl:5: missing image"))
    assert stopped.value.code == 1
    with pytest.raises(SystemExit) as stopped:
        main(SystemExit("--model x: no such file"))
    assert stopped.value.code == 1
    with pytest.raises(SystemExit) as stopped:
        main(SystemExit(2))  # argparse's usage errors keep their code
    assert stopped.value.code == 2
    with pytest.raises(KeyError):
        main(KeyError("a bug"))


def test_the_command_line_prints_no_traceback(tiny_world, tmp_path, out):
    path = bad_file(tiny_world, tmp_path, "conversations", "truncated_image")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    before = snapshot(out)
    done = subprocess.run([sys.executable, "train_sft.py", *READERS["conversations"]["train_sft.py"][1](
        path, out, model_dir(tiny_world))], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert f"{path}:{BAD_LINE}: unreadable image" in done.stderr
    assert snapshot(out) == before
