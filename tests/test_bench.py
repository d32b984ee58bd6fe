"""bench.py grpo-step and sft on a tiny Qwen2: both sides get the same tokens (grpo-step: the same
prompts, every sample run to the length cap; sft: records of exactly --seq-len tokens, packed alike);
our side's times come out of the real train_grpo / train_sft loop. TRL's side runs only where
requirements-bench.txt is installed. bench.py logprobs at a tiny size. bench.py rollout: every engine
on the same forced lengths. bench.py rollout-estimate: its replay of the engine's schedule against the
engine, its 7B sizes by hand."""

import argparse
import os

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


def test_matmul_gflop_counts_linear_layers_and_products_not_attention():
    """A linear of 64 -> 32 over 10 rows is 2 * 10 * 64 * 32 FLOP (addmm), a 10 x 64 by 64 x 5 product
    2 * 10 * 64 * 5 (mm); a batched product (attention's math path) is left out."""
    import torch

    def work():
        x = torch.randn(10, 64)
        torch.nn.Linear(64, 32)(x)
        x @ torch.randn(64, 5)
        torch.bmm(torch.randn(3, 10, 64), torch.randn(3, 64, 10))

    assert bench.matmul_gflop(work) == pytest.approx((2 * 10 * 64 * 32 + 2 * 10 * 64 * 5) / 1e9, rel=1e-12)


# ----------------------------------------------------------------------------- sft

SFT_ARGS = argparse.Namespace(batch=4, seq_len=128, max_tokens=256, lr=1e-5, hidden=64, layers=2, vocab=1024,
                              warmup=1, steps=2, rounds=1, threads=1)


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory):
    problems = bench.grpo_problems(SFT_ARGS.batch * (SFT_ARGS.warmup + SFT_ARGS.steps), seed=0)
    path = str(tmp_path_factory.mktemp("sft_bench"))
    bench.save_grpo_checkpoint(path, problems, vocab=SFT_ARGS.vocab, hidden=SFT_ARGS.hidden, layers=SFT_ARGS.layers)
    return path, bench.sft_records(problems, path, SFT_ARGS.seq_len, seed=0)


def test_sft_records_are_exactly_seq_len_tokens_with_the_reply_labelled(sft_checkpoint):
    """Every record encodes to --seq-len tokens (so both trainers pack 2 a micro-batch of 256), with
    loss on the reply only; the chat template renders the same ids for TRL's prompt + completion."""
    path, records = sft_checkpoint
    processor, tokenizer = data.ChatProcessor(path), AutoTokenizer.from_pretrained(path)
    assert len({r["messages"][1]["content"] for r in records}) > len(records) // 2  # replies of many lengths
    for r in records:
        encoded = processor.encode_conversation(r["messages"], [])
        assert len(encoded["input_ids"]) == SFT_ARGS.seq_len
        labelled = sum(label != -100 for label in encoded["labels"])
        assert labelled == len(tokenizer(r["messages"][1]["content"])["input_ids"]) + 1  # + <|im_end|>
        trl_ids = tokenizer.apply_chat_template(r["messages"], return_dict=True)["input_ids"]
        assert trl_ids == encoded["input_ids"]
    with pytest.raises(ValueError, match="--seq-len 40 is too short"):
        bench.sft_records(bench.grpo_problems(1, seed=0), path, 40, seed=0)


def test_our_sft_side_times_each_step_of_the_real_loop(sft_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    path, records = sft_checkpoint
    steps = bench.ours_sft_steps(SFT_ARGS, path, records, str(tmp_path))
    assert len(steps) == SFT_ARGS.warmup + SFT_ARGS.steps
    assert all(s["tokens"] == SFT_ARGS.batch * SFT_ARGS.seq_len and s["seconds"] > 0 for s in steps)


def test_trl_sft_side_runs_the_same_workload(sft_checkpoint, tmp_path):
    """TRL packs the same records 2 a row and runs --batch of them an optimizer step: the same tokens
    a step as ours. Its first step has no previous end to time from."""
    pytest.importorskip("trl")
    path, records = sft_checkpoint
    steps = bench.trl_sft_steps(SFT_ARGS, path, records, str(tmp_path))
    assert len(steps) == SFT_ARGS.warmup + SFT_ARGS.steps - 1
    assert all(s["tokens"] == SFT_ARGS.batch * SFT_ARGS.seq_len and s["seconds"] > 0 for s in steps)


def test_sft_bench_prints_both_sides_the_ratio_and_the_mfu(capsys, monkeypatch):
    pytest.importorskip("trl")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    bench.bench_sft(SFT_ARGS)
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("sft: 4 records x 128 tokens an optimizer step, 2 packed a micro-batch of 256")
    assert [line.split()[0] for line in table[2:4]] == ["TRL", "ours"]
    assert all(line.split()[-4] == "512" and line.endswith("%") for line in table[2:4])  # tokens a step, MFU
    assert table[4].startswith("tokens/s ours/TRL: ") and "GEMM peak" in table[4]


def test_each_side_runs_in_a_fresh_process_with_the_threads_asked():
    import torch

    assert bench.in_fresh_process(os.getpid, 1) != os.getpid()
    assert bench.in_fresh_process(torch.get_num_threads, 2) == 2


def test_sft_bench_refuses_records_that_do_not_fill_a_micro_batch():
    args = argparse.Namespace(**{**vars(SFT_ARGS), "max_tokens": 300})
    with pytest.raises(SystemExit, match="--max-tokens must be a multiple of --seq-len"):
        bench.bench_sft(args)


# ----------------------------------------------------------------------------- logprobs and rollout

def test_logprobs_bench_runs_each_implementation_in_its_own_process(capsys):
    args = argparse.Namespace(tokens=256, vocab=20000, hidden=32, repeats=1)  # naive: [256, 20000] fp32 matrices
    bench.bench_logprobs(args)
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("token_logprobs, 256 tokens x vocab 20000, hidden 32 (chunks of 32 rows)")
    assert [line.split()[0] for line in table[2:4]] == ["naive", "chunked"]
    assert table[4].startswith("peak memory ratio chunked/naive:") and "time ratio" in table[4]


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


# ----------------------------------------------------------------------------- rollout-estimate

@pytest.mark.parametrize("slots, check_every", [(5, 3), (2, 1), (12, 8)])
def test_replay_gives_the_engines_decode_steps_and_prefills(vl_dir, monkeypatch, slots, check_every):
    """The schedule rollout-estimate costs is the engine's: generate.generate, lengths forced, runs
    exactly the decode steps (B rows, cached tokens they read) and prefill calls replay_slots predicts."""
    import generate as G

    model, eos, lens = M.load_model(vl_dir).eval(), 5, [7, 12, 9]
    prompts = [{"input_ids": list(range(20 + p, 20 + p + n)), "pixel_values": None, "image_grid_thw": None}
               for p, n in enumerate(lens)]
    lengths = bench.rollout_lengths(12, 12, seed=slots)
    seen_steps, seen_prefills, decode_step, prefill = [], [], G.decode_step, G.prefill

    def counted_step(model, pool, B, *rest):
        seen_steps.append((B, int(pool.lengths[:B].sum()) + B))  # each row reads its lengths + its new token
        return decode_step(model, pool, B, *rest)

    def counted_prefill(model, batch, *rest):
        seen_prefills.append([next(i for i, p in enumerate(prompts) if p is q) for q in batch])
        return prefill(model, batch, *rest)
    monkeypatch.setattr(G, "decode_step", counted_step)
    monkeypatch.setattr(G, "prefill", counted_prefill)
    with bench.forced_lengths_ours(G, lengths, 0, range(3), 4, eos):
        out = G.generate(model, prompts, eos_ids=[eos], n=4, max_new_tokens=12, kv_budget=slots * (12 + 12),
                         check_every=check_every)
    assert [len(c.token_ids) for c in out] == lengths.tolist() and 1 in lengths  # a row stops at its first token
    assert bench.replay_slots(lens, lengths.tolist(), 4, 12, slots, check_every) == (seen_steps, seen_prefills, [])
    assert len({B for B, _ in seen_steps}) > 1 and len(seen_prefills) >= (1 if slots == 12 else 2)


def test_replay_examples_and_a_paged_cache_with_room_for_every_row_runs_the_slot_schedule():
    assert bench.replay_slots([2], [2, 3], 2, 3, 1, 1) == ([(1, 3), (1, 3), (1, 4)], [[0]], [])
    assert bench.replay_paged([2], [3, 3], 2, 3, 8, 1) == ([(2, 6), (1, 4)], [[0], [0]], [(0, 2)])
    prompt_lens, lengths = [30, 50, 40], bench.rollout_lengths(24, 64, seed=0).tolist()
    every_row_at_once = bench.replay_slots(prompt_lens, lengths, 8, 64, 24, 8)
    assert bench.replay_paged(prompt_lens, lengths, 8, 64, 10**6, 8) == every_row_at_once
    for budget in (120, 200):  # a few rows at a time: the cache never holds more, rows get preempted
        steps, _, recomputed = bench.replay_paged(prompt_lens, lengths, 8, 64, budget, 8)
        assert max(cached for _, cached in steps) <= budget and recomputed
    with pytest.raises(ValueError, match="holds no row"):
        bench.replay_paged(prompt_lens, lengths, 8, 64, 50, 8)


def test_model_sizes_and_rank_state_of_the_7b_config():
    cfg, sizes = bench.model_sizes(os.path.join(os.path.dirname(bench.__file__), "configs/Qwen2.5-VL-7B-Instruct"))
    # by hand: per layer q 3584^2 + 3584, k and v 3584 x 512 + 512, o 3584^2, MLP 3 x 3584 x 18944, norms
    # 2 x 3584 -> 233,057,792; x 28 + final norm 3584 + embedding and head 2 x 152064 x 3584
    assert sizes["llm"] == 28 * 233_057_792 + 3584 + 2 * 152064 * 3584 == 7_615_616_512
    # patch embedding 1280 x 1176; per block norms 2 x 1280, qkv 1280 x 3840 + 3840, proj 1280^2 + 1280,
    # MLP 2 x (1280 x 3420 + 3420) + 3420 x 1280 + 1280 -> 19,702,200; merger 1280 + 5120^2 + 5120 + 5120 x 3584 + 3584
    assert sizes["vision"] == 1280 * 1176 + 32 * 19_702_200 + 44_574_464 == 676_550_144
    assert sizes["embed"] == 152064 * 3584 and cfg.head_dim == 128
    # fp32 parameters (4) + fp32 gradient and two AdamW moments of the LLM (12) + bf16 reference (2), over 8
    assert bench.resident_bytes(sizes, 8) == (6 * 8_292_166_656 + 12 * 7_615_616_512) / 8
