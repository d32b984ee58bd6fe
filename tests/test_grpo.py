"""train_grpo.py end to end: on the tiny world 2 (uneven) ranks and 2x2 HSDP ranks = 1 rank at step 1 and
kill-and-resume is exact; a short run raises held-out reward over its SFT checkpoint."""

import datetime
import json
import os
import time

import pytest
import torch

import model as M
import train_grpo
from tests import scripts
from tests.test_fsdp import ProcessGroupAsked, asked_process_group, torchrun  # noqa: F401


@pytest.fixture(scope="module")
def reference(tiny_world, tmp_path_factory):
    """A reference model that differs from the policy, so the KL term (and the loss) is not 0."""
    ref = M.load_model(os.path.join(tiny_world, "model"))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = str(tmp_path_factory.mktemp("ref"))
    M.save_model(ref, path)
    return path


def grpo_args(tiny_world, reference, out, *extra):
    return ["--preset", "toy", "--init", os.path.join(tiny_world, "model"), "--ref", reference, "--data",
            os.path.join(tiny_world, "data", "rl.jsonl"), "--out-root", str(out), "--stages", "12x4x3",
            "--length-scale", "1", "--prompts-per-rollout", "4", "--prompts-per-update", "2", "--kl-coef", "1.0",
            "--lr", "1e-3", "--save-every", "1", "--table-every", "0", *extra]


def metrics(out):
    with open(os.path.join(out, "vision-r1", "stage1", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_uneven_ranks_give_the_one_rank_step(tiny_world, reference, tmp_path, monkeypatch):
    """2 ranks take the 1-rank run's first step: the same samples, loss, KL and entropy, and the loss is
    not trivially 0. Rank 1's prompts are 5 times longer than rank 0's: with 256-token micro-batches it
    packs each group's prompt with one response, 4 micro-batches per group (8 for the old and reference
    log-probs), against rank 0's 1, which packs its groups whole."""
    import data

    monkeypatch.setenv("WANDB_MODE", "disabled")
    with open(os.path.join(tiny_world, "data", "rl.jsonl")) as f:
        problems = [{**p, "images": [os.path.join(tiny_world, "data", im) for im in p["images"]]}
                    for p in map(json.loads, f)]
    order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(0)).tolist()  # step 0's prompts
    for i in order[1:4:2]:  # rank 1's share of the 4
        problems[i]["question"] = "Look closely at every shape in the picture. " * 8 + problems[i]["question"]
    path = tmp_path / "rl.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    processor = data.ChatProcessor(os.path.join(tiny_world, "model"), 28 * 28, 112 * 112)
    records = data.load_problems(str(path))
    short, long = [[len(processor.encode_problem(records[i])["input_ids"]) for i in order[r:4:2]] for r in (0, 1)]
    assert all(2 * (n + 4 * 12) <= 256 for n in short) and all(n + 12 <= 256 < n + 24 for n in long)

    args = ("--stages", "12x4x1", "--data", str(path), "--micro-batch-tokens", "256")
    train_grpo.main(grpo_args(tiny_world, reference, tmp_path / "one", *args))
    torchrun("train_grpo.py", *grpo_args(tiny_world, reference, tmp_path / "two", *args), timeout=300)
    one, two = metrics(tmp_path / "one")[0], metrics(tmp_path / "two")[0]
    assert one["response_length"] == two["response_length"] and one["kl_ref"] > 0.01 and abs(one["loss"]) > 1e-3
    for name in ("loss", "kl_ref", "entropy", "ppo_kl"):
        assert abs(one[name] - two[name]) <= 1e-4 * max(1.0, abs(one[name])), (name, one[name], two[name])


def test_collectives_wait_for_a_late_rank_as_long_as_configured(tiny_world, reference, tmp_path, asked_process_group):
    """Rollouts have no collectives, so ranks reach the next one minutes apart: the process group
    waits 2 hours by default (NCCL's own default, 10 minutes, aborts a long rollout), or as asked."""
    for extra, minutes in (((), 120), (("--dist-timeout-minutes", "45"), 45)):
        with pytest.raises(ProcessGroupAsked):
            train_grpo.main(grpo_args(tiny_world, reference, tmp_path, *extra))
        assert asked_process_group["timeout"] == datetime.timedelta(minutes=minutes)


def test_hsdp_on_2x2_ranks_gives_the_one_rank_step(tiny_world, reference, tmp_path, monkeypatch):
    """Two nodes of 2 ranks on one machine: 4 gloo ranks on a 2 x 2 HSDP mesh (policy and
    reference) take the 1-rank run's first step: same samples, loss and KL."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    args = ("--stages", "12x4x1", "--prompts-per-update", "4")
    train_grpo.main(grpo_args(tiny_world, reference, tmp_path / "one", *args))
    log = torchrun("train_grpo.py", *grpo_args(tiny_world, reference, tmp_path / "four", *args,
                                               "--replicate-degree", "2"), nproc=4, timeout=300)
    assert "world 4 (HSDP: 2 replicas x 2 shards)" in log
    one, four = metrics(tmp_path / "one")[0], metrics(tmp_path / "four")[0]
    assert one["response_length"] == four["response_length"] and one["kl_ref"] > 0.01
    for name in ("loss", "kl_ref", "entropy", "grad_norm"):
        assert abs(one[name] - four[name]) <= 1e-4 * max(1.0, abs(one[name])), (name, one[name], four[name])


def run(args):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return scripts.start("train_grpo.py", args, env=env)


def test_kill_and_resume_continues_with_the_same_data_and_weights(tiny_world, reference, tmp_path):
    straight = run(grpo_args(tiny_world, reference, tmp_path / "straight"))  # on the other core
    args = grpo_args(tiny_world, reference, tmp_path / "x")
    proc = run(args)
    state = tmp_path / "x" / "vision-r1" / "stage1" / "state"
    deadline = time.time() + 300
    while not (state / "step_1").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert (state / "latest").read_text() in ("step_1", "step_2")  # 3 steps in all: killed mid-run

    resumed = run(args + ["--resume"])
    assert resumed.wait() == 0, resumed.stderr
    assert straight.wait() == 0, straight.stderr
    a = M.load_model(tmp_path / "straight" / "vision-r1" / "stage1" / "final").state_dict()
    b = M.load_model(tmp_path / "x" / "vision-r1" / "stage1" / "final").state_dict()
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 1e-5, name
    # the resumed run logged the same rewards and lengths for the steps it redid
    done = {row["step"]: row for row in metrics(tmp_path / "straight")}
    for row in metrics(tmp_path / "x"):
        assert row["response_length"] == done[row["step"]]["response_length"]
        assert abs(row["loss"] - done[row["step"]]["loss"]) <= 1e-5


def color_problems(tiny_world, seed=0):
    """Held-out-able problems whose answer is in the question: "I see 7 circles, all red. Which color
    are they?" -> red, each with one of the tiny world's images (the vision tower runs, the answer does
    not depend on it). 28 counts x 3 shapes x 4 colors = 336 problems: 48 held out, 288 for training."""
    import random

    import synthetic

    images = sorted(os.listdir(os.path.join(tiny_world, "data", "images")))
    problems = [{"id": f"color-{i}", "question": f"I see {count} {shape}s, all {color}. Which color are they?",
                 "answer": color, "answer_type": "text",
                 "images": [os.path.join(tiny_world, "data", "images", images[i % len(images)])]}
                for i, (count, shape, color) in enumerate((n, s, c) for n in range(2, 30) for s in synthetic.SHAPES
                                                          for c in synthetic.COLORS)]
    random.Random(seed).shuffle(problems)
    return problems[48:], problems[:48]


def test_grpo_raises_held_out_reward_over_the_sft_checkpoint(tiny_world, tmp_path, monkeypatch):
    """SFT teaches the tiny model to copy the color from the question, but closes half of its answers
    in a format the hard reward scores 0 ("The answer is red." instead of the <answer> block): its
    held-out reward is 50-65% (3 epochs: the loss is near its floor, the entropy of the two
    closings). 20 GRPO steps (8 prompts x 8 samples) on the training problems raise it on 48 held-out
    problems (4 samples each at temperature 0.6) by at least 25 points (measured 64 -> 100 and, with
    the problems shuffled by seed 1, 52 -> 100): the policy learns the rewarded format from its own
    samples. (The pipeline shows the same on the synthetic world's questions, at minutes per stage:
    README, Table 4.)"""
    import random

    import evaluate
    import train_sft

    monkeypatch.setenv("WANDB_MODE", "disabled")
    train, held_out = color_problems(tiny_world)
    rng = random.Random(0)
    with open(tmp_path / "sft.jsonl", "w") as f:
        for i in range(800):
            problem, color = train[i % len(train)], train[i % len(train)]["answer"]
            closing = f"<answer> Final Answer:{color} </answer>" if rng.random() < 0.5 else f" The answer is {color}."
            f.write(json.dumps({"images": problem["images"], "conversations": [
                {"from": "human", "value": "<image>" + problem["question"]},
                {"from": "gpt", "value": f"<think> They are {color}. </think>{closing}"}]}) + "\n")
    for name, rows in (("rl", train), ("test", held_out)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    ci = str(tmp_path / "ci" / "final")
    train_sft.main(["--preset", "toy", "--model", os.path.join(tiny_world, "model"), "--data", str(tmp_path / "sft.jsonl"),
                    "--out", str(tmp_path / "ci"), "--epochs", "3", "--lr", "2e-3", "--schedule", "constant",
                    "--eval-holdout", "0", "--save-every", "0"])
    train_grpo.main(["--preset", "toy", "--init", ci, "--ref", ci, "--data", str(tmp_path / "rl.jsonl"), "--lr", "3e-4",
                     "--out-root", str(tmp_path / "grpo"), "--stages", "48x8x20", "--length-scale", "1",
                     "--prompts-per-rollout", "8", "--prompts-per-update", "8", "--save-every", "0", "--table-every", "0"])
    assert [row["step"] for row in metrics(tmp_path / "grpo")] == list(range(1, 21))
    before, after = evaluate.main(["--model", ci, "--model", str(tmp_path / "grpo" / "vision-r1" / "stage1" / "final"),
                                   "--bench", "synthetic", "--data", str(tmp_path / "test.jsonl"),
                                   "--out", str(tmp_path / "eval"), "--n", "4", "--max-new-tokens", "48"])
    assert before["prompts"] == after["prompts"] == 48
    assert after["accuracy"] >= before["accuracy"] + 0.25, (before["accuracy"], after["accuracy"])