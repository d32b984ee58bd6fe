"""bench.py grpo-step on a tiny Qwen2: both sides get the same prompt tokens and run every sample to
the length cap; our side's time split comes out of the real train_grpo loop. TRL's side runs only
where requirements-bench.txt is installed."""

import argparse

import pytest
from transformers import AutoTokenizer

import bench
import data
import model as M

ARGS = argparse.Namespace(prompts=2, group_size=2, max_tokens=6, beta=0.04, lr=1e-6, micro_batch_tokens=4096,
                          warmup=1, steps=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    problems = bench.grpo_problems(ARGS.prompts * (ARGS.warmup + ARGS.steps), seed=0)
    path = str(tmp_path_factory.mktemp("grpo_bench"))
    bench.save_grpo_checkpoint(path, problems, vocab=1024, hidden=64, layers=2)
    return path, problems


def test_checkpoint_has_no_stop_token_and_both_sides_see_the_same_prompt(checkpoint):
    path, problems = checkpoint
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert data.eos_token_ids(path, tokenizer) == []  # ours samples to the cap; TRL gets min_new_tokens
    assert M.load_model(path).cfg.vocab_size == 1024
    question = problems[0]["question"]
    ours = data.ChatProcessor(path).encode_prompt(question, [])["input_ids"]
    trl = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_dict=True)["input_ids"]  # a dict by default from transformers 5
    assert ours == trl and len(ours) > 20


def test_too_small_a_vocab_is_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab 64 is smaller than the tokenizer"):
        bench.save_grpo_checkpoint(str(tmp_path), bench.grpo_problems(2, seed=0), vocab=64, hidden=64, layers=1)


def test_our_side_times_each_step_of_the_real_loop(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # restored after the test, whatever the bench set
    path, problems = checkpoint
    steps = bench.ours_grpo_steps(ARGS, path, problems, str(tmp_path))
    assert len(steps) == ARGS.warmup + ARGS.steps
    for step in steps:
        assert step["response_length"] == ARGS.max_tokens
        assert step["generate"] > 0 and step["score"] > 0 and step["train"] > 0


def test_trl_side_runs_the_same_workload(checkpoint, tmp_path):
    pytest.importorskip("trl")
    path, problems = checkpoint
    steps = bench.trl_grpo_steps(ARGS, path, problems, str(tmp_path))
    assert len(steps) == ARGS.warmup + ARGS.steps
    for step in steps:
        assert step["response_length"] == ARGS.max_tokens
        assert 0 < step["generate"] < step["total"]


def test_rollout_runs_every_engine_on_the_same_forced_lengths(capsys):
    """bench.py rollout at a tiny size: every engine makes exactly the forced lengths (the bench raises
    otherwise) and the table has a row per engine, the ratios and the FSDP2 comparison."""
    lengths = bench.rollout_lengths(128, 256, seed=0)
    assert sorted(lengths.tolist())[-18:] == [256] * 18 and (lengths <= 64).sum() == 96  # 75% short, 14% at the cap
    assert len(set(lengths.tolist())) > 40  # rows stop at many different steps
    args = argparse.Namespace(prompts=2, samples=3, max_tokens=12, kv_budget_slots=4, check_every=3, vocab=512,
                              fsdp_prompts=2, fsdp_ranks=[2], threads=1)
    bench.bench_rollout(args)
    table = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in table[2:6]] == [
        "transformers generate", "today's engine, every row at once", "today's engine, 1 prompt(s) a call", "ours, 4 slots"]
    assert table[6].startswith("ours / today's engine in the same budget:")
    assert table[7].startswith("FSDP2-wrapped / unwrapped decode tokens/s, 2 gloo rank(s)")
