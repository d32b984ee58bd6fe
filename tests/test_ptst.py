"""Tests for ptst.py: schedules pinned to docs/method.md §3, parsing, scaling, checkpoints, CLI."""
import os
from fractions import Fraction

import pytest

import ptst
from ptst import SCHEDULES, Stage, get_stage, init_checkpoint, parse_schedule, scale_schedule, stage_dir
from rewards import R1_ZERO_SYSTEM_PROMPT
from tests import scripts


def shape(schedule):
    return [(stage.max_tokens, stage.group_size, stage.steps) for stage in schedule.stages]


def test_default_schedule_is_the_papers():
    """Stage 1: 4K x 16, 100 steps; stage 2: 8K x 8, 100 steps (released); optional 16K x 4."""
    schedule = SCHEDULES[ptst.DEFAULT_SCHEDULE]
    assert schedule.name == "vision-r1"
    assert shape(schedule) == [(4096, 16, 100), (8192, 8, 100), (16384, 4, 100)]
    assert schedule.release_stage == 2
    assert [stage.tokens_per_prompt for stage in schedule.stages] == [65536] * 3  # L x G ~ 64K
    assert (schedule.start, schedule.reward, schedule.system_prompt) == ("cold", "hard", None)


def test_ablation_schedules_are_the_papers():
    long, zero = SCHEDULES["long"], SCHEDULES["zero"]
    assert shape(long) == [(16384, 4, 300)]
    assert (long.start, long.reward, long.system_prompt) == ("cold", "hard", None)
    assert shape(zero) == [(4096, 16, 300)]
    assert (zero.start, zero.reward, zero.system_prompt) == ("base", "zero", R1_ZERO_SYSTEM_PROMPT)
    assert shape(SCHEDULES["zero-ptst"]) == [(4096, 16, 100), (8192, 8, 100)]
    assert SCHEDULES["zero-ptst"].start == "base"
    assert shape(SCHEDULES["4Kx16-4Kx16"]) == [(4096, 16, 100), (4096, 16, 100)]
    assert shape(SCHEDULES["4Kx16-8Kx16"]) == [(4096, 16, 100), (8192, 16, 100)]
    assert shape(SCHEDULES["4Kx16-6Kx12-8Kx8"]) == [(4096, 16, 100), (6144, 12, 100), (8192, 8, 100)]


def test_parse_schedule_takes_the_rest_from_the_named_schedule():
    schedule = parse_schedule("4096x16x100, 8192x8x50", like=SCHEDULES["zero"])
    assert shape(schedule) == [(4096, 16, 100), (8192, 8, 50)]
    assert (schedule.name, schedule.start, schedule.reward) == ("custom", "base", "zero")
    assert schedule.release_stage is None
    assert shape(parse_schedule("4Kx16x100,16kx4x1")) == [(4096, 16, 100), (16384, 4, 1)]


@pytest.mark.parametrize("spec, message", [
    ("4096x16", "MAX_TOKENSxGROUP_SIZExSTEPS"), ("4096x0x100", "group size"), ("axbxc", "max tokens"),
    ("4096x16x100,", "MAX_TOKENS"), ("", "MAX_TOKENS"),
])
def test_parse_schedule_errors_name_the_bad_piece(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_schedule(spec)


def test_scale_schedule_keeps_the_shape():
    scaled = scale_schedule(SCHEDULES["vision-r1"], "1/64")
    assert shape(scaled) == [(64, 16, 100), (128, 8, 100), (256, 4, 100)]
    assert scaled.release_stage == 2 and scaled.name == "vision-r1"
    assert shape(scale_schedule(SCHEDULES["long"], 0.5)) == [(8192, 4, 300)]
    assert shape(scale_schedule(SCHEDULES["long"], Fraction(1, 3))) == [(5461, 4, 300)]  # 5461.33
    assert shape(scale_schedule(SCHEDULES["zero"], "1e-9")) == [(1, 16, 300)]  # never below 1
    for bad in ["0", "-1/64", "x", "1/0"]:
        with pytest.raises(ValueError, match="length scale"):
            scale_schedule(SCHEDULES["zero"], bad)


def test_get_stage_is_one_based():
    assert get_stage("vision-r1", 1) == Stage(4096, 16, 100)
    assert get_stage(SCHEDULES["vision-r1"], 2) == Stage(8192, 8, 100)
    for k in (0, 4):
        with pytest.raises(ValueError, match="stages 1..3"):
            get_stage("vision-r1", k)
    with pytest.raises(ValueError, match="known: vision-r1"):
        get_stage("vision-r2", 1)


def test_checkpoint_chain():
    assert stage_dir("runs", "vision-r1", 2) == os.path.join("runs", "vision-r1", "stage2")
    assert init_checkpoint("runs", "vision-r1", 1, "ckpt/cold", "ckpt/base") == "ckpt/cold"
    assert init_checkpoint("runs", "zero", 1, "ckpt/cold", "ckpt/base") == "ckpt/base"
    assert init_checkpoint("runs", "vision-r1", 3, "ckpt/cold", "ckpt/base") == os.path.join(
        "runs", "vision-r1", "stage2", "final")
    custom = parse_schedule("64x4x2,128x2x2", name="tiny")
    assert init_checkpoint("runs", custom, 2, "c", "b") == os.path.join("runs", "tiny", "stage1", "final")
    with pytest.raises(ValueError):
        init_checkpoint("runs", "long", 2, "c", "b")


def test_schedule_validation():
    with pytest.raises(ValueError, match="no stages"):
        ptst.Schedule("empty", ())
    with pytest.raises(ValueError, match="start"):
        ptst.Schedule("bad", (Stage(1, 1, 1),), start="sft")


def test_cli_prints_the_default_schedule():
    out = scripts.run("ptst.py", check=True).stdout
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["2"], ["3"])]
    assert [row[:5] for row in rows] == [["1", "4096", "16", "100", "65536"], ["2", "8192", "8", "100", "65536"],
                                         ["3", "16384", "4", "100", "65536"]]
    assert "optional" in out.splitlines()[-2] and "vision-r1" in out


def test_cli_options(capsys):
    ptst.main(["--schedule", "zero", "--length-scale", "1/64"])
    out = capsys.readouterr().out
    assert "base model" in out and "R1-Zero" in out
    assert ["1", "64", "16", "300", "1024"] in [line.split() for line in out.splitlines()]
    ptst.main(["--stages", "4Kx16x10,8Kx8x10", "--length-scale", "1/64"])
    out = capsys.readouterr().out
    assert ["2", "128", "8", "10", "1024"] in [line.split() for line in out.splitlines()]
