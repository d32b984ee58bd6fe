"""The scripts' defaults are the paper's run (as nanoGPT's are GPT-2's); the synthetic world is
`--preset toy`. Without its checkpoint or data the paper's command stops before any work with one
line naming the flag and the path, printed once however many ranks torchrun starts."""

import dataclasses
import importlib
import os
import subprocess
import sys

import pytest

import train_grpo
import train_sft
import train_utils
from tests.scripts import ROOT
from train_utils import parse_config


def test_no_preset_is_the_papers_run():
    grpo = parse_config(train_grpo.GRPOConfig, train_grpo.PRESETS, ["--stage", "1"])
    # docs/method.md §3: images 512^2 - 2048^2 pixels, stage 1 caps responses at 4K (no length scale), lr 1e-6
    assert (grpo.min_pixels, grpo.max_pixels, grpo.length_scale, grpo.lr) == (512**2, 2048**2, "1", 1e-6)
    assert grpo.prompts_per_rollout == 512 and grpo.activation_checkpointing
    assert train_grpo.resolve_schedule(grpo).stages[0].max_tokens == 4096
    sft = parse_config(train_sft.SFTConfig, train_sft.PRESETS, [])
    # docs/method.md §2: lr 5e-6, batch 32, 16K context, 2 epochs
    assert (sft.lr, sft.global_batch, sft.max_tokens, sft.epochs) == (5e-6, 32, 16384, 2.0)
    toy = parse_config(train_grpo.GRPOConfig, train_grpo.PRESETS, ["--preset", "toy"])
    assert toy.length_scale == "1/32" and toy.data == "runs/toy/data/rl.jsonl"


def run(script, args, cwd, rank="0"):
    """`python script args` in `cwd` as rank `rank` of a torchrun job: the whole process, imports included."""
    env = {**os.environ, "RANK": rank, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def exit_of(tmp_path, monkeypatch, capsys):
    """`main(args)` in tmp_path as rank `rank`, in this process (a process start costs seconds, the
    check milliseconds): (exit status, stdout, stderr) as the process would end, sys.exit(message)
    being status 1 with the message on stderr."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")

    def exit_of(main, args, rank="0"):
        monkeypatch.setenv("RANK", rank)
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            main(args)
        out, err = capsys.readouterr()
        code = stop.value.code
        return (1, out, err + code + "\n") if isinstance(code, str) else (code, out, err)

    return exit_of


def test_paper_run_without_its_checkpoint_or_data_exits_with_one_line(tmp_path, exit_of):
    out = run("train_grpo.py", ["--stage", "1"], tmp_path)  # one real process: imports print nothing either
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == "--cold-start runs/vision-r1-ci/final: no checkpoint (config.json) in that folder\n"
    assert exit_of(train_grpo.main, ["--stage", "2"]) == (1, "", "--out-root (stage 1's final checkpoint) "
                                                          "runs/vision-r1/vision-r1/stage1/final: "
                                                          "no checkpoint (config.json) in that folder\n")
    assert exit_of(train_sft.main, []) == (1, "", "--model checkpoints/Qwen2.5-VL-7B-Instruct: "
                                                  "no checkpoint (config.json) in that folder\n")
    assert exit_of(train_sft.main, [], rank="3") == (1, "", "")  # 8 ranks print the line once


def test_missing_data_is_named_after_the_checkpoint_is_found(tiny_world, exit_of):
    model = os.path.join(tiny_world, "model")
    assert exit_of(train_grpo.main, ["--init", model, "--ref", model]) == (1, "", "--data vision_r1_rl.parquet: "
                                                                          "no such file\n")
    assert exit_of(train_sft.main, ["--model", model]) == (1, "", "--data vision_r1_cold.json: no such file\n")


@pytest.mark.parametrize("trainer", ["train_sft", "train_grpo"])
def test_help_gives_every_field_its_meaning_default_and_preset_value(trainer, capsys):
    """--help lists each config field under its section with the comment written after it in the
    dataclass, its default (the paper's run) and each preset's value where that differs (argparse
    may wrap a line after a hyphen: "- " is read as "-" on both sides)."""
    module = importlib.import_module(trainer)
    config_cls = module.SFTConfig if trainer == "train_sft" else module.GRPOConfig
    with pytest.raises(SystemExit):
        module.main(["--help"])
    def unwrapped(text):
        return " ".join(text.split()).replace("- ", "-")

    text = unwrapped(capsys.readouterr().out)
    sections, comments = train_utils.field_comments(config_cls)
    assert set(comments) == {f.name for f in dataclasses.fields(config_cls)}  # no field without a meaning
    for f in dataclasses.fields(config_cls):
        presets = "".join(f"; {name}: {values[f.name]!r}" for name, values in module.PRESETS.items() if f.name in values)
        assert unwrapped(f"{comments[f.name]} (default: {f.default!r}{presets})") in text, f.name
    assert all(f"{title}:" in text for title in sections.values())
    assert comments["dist_timeout_minutes"].endswith("NCCL's default: 10")  # the comment's second line joined
