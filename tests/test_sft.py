"""train_sft.py: packing, the released Vision-R1-cold layout, kill-and-resume, 2 ranks = 1 rank."""

import datetime
import json
import os
import shutil
import time

import pytest
import torch

import data
import model as M
import train_sft
import train_utils
from tests import scripts
from tests.test_fsdp import ProcessGroupAsked, asked_process_group, torchrun  # noqa: F401

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


def cold_record(problem, looks=1):
    """A record in the exact layout of the released Vision-R1-cold JSON: `image` as one path string,
    human/gpt turns, the response in the Vision-R1 format, its thinking `looks` sentences long."""
    return {"image": problem["images"][0],
            "conversations": [{"from": "human", "value": "<image>" + problem["question"]},
                              {"from": "gpt", "value": "<think> " + "Let me look at the image. " * looks +
                               f"The answer is {problem['answer']}. </think>"
                               f"<answer> Final Answer:{problem['answer']} </answer>"}]}


@pytest.fixture(scope="module")
def cold_file(tiny_world, tmp_path_factory):
    """The tiny world's training problems as a Vision-R1-cold JSON array (`cold_record`)."""
    problems = data.load_problems(os.path.join(tiny_world, "data", "train.jsonl"))[:40]
    path = tmp_path_factory.mktemp("cold") / "vision_r1_cold.json"
    path.write_text(json.dumps([cold_record(p) for p in problems], indent=2))
    return str(path)


def sft_args(tiny_world, cold_file, out, *extra):
    return ["--preset", "toy", "--model", os.path.join(tiny_world, "model"), "--data", cold_file, "--out", str(out), "--lr", "1e-3",
            "--global-batch", "8", "--epochs", "1", "--max-tokens", "1024", "--warmup-ratio", "0.2",
            "--eval-holdout", "0", *extra]


def final_state(out):
    return M.load_model(os.path.join(out, "final")).state_dict()


def metric(out, name):
    """Every logged value of `name` in <out>/metrics.jsonl, in order."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [row[name] for row in map(json.loads, f) if name in row]


def test_collectives_wait_for_a_late_rank_as_long_as_configured(tiny_world, cold_file, tmp_path, asked_process_group):
    """Rank 0 writes the weights alone while the others wait at the next collective: the process
    group waits 2 hours by default (NCCL's own default, 10 minutes, aborts a 7B save), or as asked."""
    for extra, minutes in (((), 120), (("--dist-timeout-minutes", "45"), 45)):
        with pytest.raises(ProcessGroupAsked):
            train_sft.main(sft_args(tiny_world, cold_file, tmp_path, *extra))
        assert asked_process_group["timeout"] == datetime.timedelta(minutes=minutes)


def test_packed_loss_is_token_weighted_mean_of_sequence_losses(tiny_world, cold_file):
    processor = data.ChatProcessor(os.path.join(tiny_world, "model"))
    model = M.load_model(os.path.join(tiny_world, "model"))
    records = data.load_conversations(cold_file)[:5]
    (batch,), _ = train_sft.microbatches(records, range(5), processor, max_tokens=10_000)
    assert len(batch["cu_seqlens"]) == 6
    with torch.no_grad():
        packed_sum, packed_tokens = train_sft.microbatch_loss(model, batch, "cpu")
        singles = [train_sft.microbatch_loss(model, train_sft.microbatches(records, [i], processor, 10_000)[0][0], "cpu")
                   for i in range(5)]
    per_sequence_mean = [s / n for s, n in singles]
    weights = [n for _, n in singles]
    expected = sum(m * w for m, w in zip(per_sequence_mean, weights)) / sum(weights)
    assert packed_tokens == sum(weights)
    assert abs(packed_sum / packed_tokens - expected) <= 1e-5


def test_shifted_targets_only_supervise_the_reply(tiny_world, cold_file):
    processor = data.ChatProcessor(os.path.join(tiny_world, "model"))
    records = data.load_conversations(cold_file)[:2]
    (batch,), _ = train_sft.microbatches(records, [0, 1], processor, max_tokens=10_000)
    targets = train_sft.shifted_targets(batch)
    supervised = processor.tokenizer.decode(targets[targets != -100])
    reply = records[0]["messages"][1]["content"]
    assert supervised.startswith(reply) and supervised.count("<|im_end|>") == 2
    assert "<|image_pad|>" not in supervised and records[0]["messages"][0]["content"][7:] not in supervised
    # the last token of each packed sequence predicts nothing across the boundary
    assert (targets[batch["cu_seqlens"][1:].long() - 1] == -100).all()


def test_trains_on_released_cold_layout_and_loss_falls(tiny_world, cold_file, tmp_path):
    train_sft.main(sft_args(tiny_world, cold_file, tmp_path, "--epochs", "5", "--global-batch", "4", "--lr", "3e-3",
                            "--eval-holdout", "8"))
    with open(tmp_path / "metrics.jsonl") as f:
        evals = [row["eval_loss"] for row in map(json.loads, f) if "eval_loss" in row]
    assert evals[-1] < 0.5 * evals[0]
    assert os.path.exists(tmp_path / "final" / "tokenizer.json")
    assert os.path.exists(tmp_path / "state" / "latest")


def run(args):
    """train_sft.py in its own single-threaded process, so every run sums in the same order."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return scripts.start("train_sft.py", args, env=env)


def test_kill_and_resume_ends_with_the_same_weights(tiny_world, cold_file, tmp_path):
    args = sft_args(tiny_world, cold_file, tmp_path / "x", "--save-every", "1", "--epochs", "2")
    straight = run(sft_args(tiny_world, cold_file, tmp_path / "straight", "--epochs", "2"))  # on the other core
    proc = run(args)
    deadline = time.time() + 240
    while not os.path.exists(tmp_path / "x" / "state" / "step_2") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    with open(tmp_path / "x" / "state" / "latest") as f:
        killed_at = int(f.read().split("_")[1])
    assert 2 <= killed_at < 4  # 4 steps in all (20 records, batch 8, 2 epochs): the kill landed mid-run

    resumed = run(args + ["--resume"])
    assert resumed.wait() == 0, resumed.stderr
    assert straight.wait() == 0, straight.stderr
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "x")
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 1e-6, name


def test_only_the_last_checkpoints_stay(tiny_world, cold_file, tmp_path):
    """3 steps saved every step, keep_last 1: of the weights, step 2's and `final` stay (step 3's are
    `final`); of the training states, step 3's, which `latest` points to."""
    train_sft.main(sft_args(tiny_world, cold_file, tmp_path, "--epochs", "1.5", "--save-every", "1",
                            "--keep-last", "1"))
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(("step_", "final"))) == ["final", "step_2"]
    assert sorted(os.listdir(tmp_path / "state")) == ["latest", "step_3"]
    assert (tmp_path / "state" / "latest").read_text() == "step_3"


def test_pruning_keeps_the_state_latest_points_to(tmp_path):
    """keep_last 1 with `latest` at an older state (a run resumed from it before writing a newer
    one): that state stays besides the newest; keep_last 0 deletes nothing."""
    for name in ("step_1", "step_2", "step_3", "final", "state/step_1", "state/step_2", "state/step_3"):
        os.makedirs(tmp_path / name)
    (tmp_path / "state" / "latest").write_text("step_2")
    train_utils.prune_checkpoints(str(tmp_path), 0)
    assert len(os.listdir(tmp_path)) == 5 and len(os.listdir(tmp_path / "state")) == 4
    train_utils.prune_checkpoints(str(tmp_path), 1)
    assert sorted(os.listdir(tmp_path)) == ["final", "state", "step_3"]
    assert sorted(os.listdir(tmp_path / "state")) == ["latest", "step_2", "step_3"]


def test_two_ranks_give_the_one_rank_loss_curve(tiny_world, cold_file, tmp_path):
    args = ("--epochs", "2")
    train_sft.main(sft_args(tiny_world, cold_file, tmp_path / "one", *args))
    torchrun("train_sft.py", *sft_args(tiny_world, cold_file, tmp_path / "two", *args), timeout=600)
    one, two = metric(tmp_path / "one", "loss"), metric(tmp_path / "two", "loss")
    assert len(one) == len(two) == 4
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-4, (one, two)


def test_uneven_ranks_give_the_one_rank_losses(tiny_world, tmp_path):
    """Rank 1's records are 6 times longer than rank 0's: at each of the 2 steps it packs 4
    micro-batches to rank 0's 1, and the one held-out record leaves it none for the eval loss (it
    runs train_sft.IDLE_BATCH). Training and eval losses equal the 1-rank run's."""
    problems = data.load_problems(os.path.join(tiny_world, "data", "train.jsonl"))[:17]
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0)).tolist()  # train_sft's epoch 0, seed 0
    long = set(order[1::2]) | {16}  # rank 1's share of both global batches of 8, and the held-out record
    path = tmp_path / "cold.json"
    path.write_text(json.dumps([cold_record(p, looks=45 if i in long else 1) for i, p in enumerate(problems)]))
    processor = data.ChatProcessor(os.path.join(tiny_world, "model"))
    records = data.load_conversations(str(path))
    assert [len(train_sft.microbatches(records, order[rank:8:2], processor, 512)[0]) for rank in (0, 1)] == [1, 4]

    args = ("--max-tokens", "512", "--eval-holdout", "1", "--warmup-ratio", "0")
    train_sft.main(sft_args(tiny_world, str(path), tmp_path / "one", *args))
    torchrun("train_sft.py", *sft_args(tiny_world, str(path), tmp_path / "two", *args), timeout=300)
    for name in ("loss", "eval_loss"):
        one, two = metric(tmp_path / "one", name), metric(tmp_path / "two", name)
        assert len(one) == len(two) == 2 and max(abs(a - b) for a, b in zip(one, two)) <= 1e-4, (name, one, two)


def test_hsdp_on_2x2_ranks_gives_the_one_rank_run_and_resumes_on_2(tiny_world, cold_file, tmp_path):
    """Two nodes of 2 ranks on one machine: 4 gloo ranks on a 2 x 2 HSDP mesh (--replicate-degree 2)
    train 2 steps with the 1-rank losses; the training state they save after step 1 resumes on 2
    ranks (plain FSDP) and step 2 ends with the 1-rank loss and weights."""
    args = ("--epochs", "0.8", "--save-every", "1")  # 2 steps of 8 of the 20 records
    train_sft.main(sft_args(tiny_world, cold_file, tmp_path / "one", *args))
    log = torchrun("train_sft.py", *sft_args(tiny_world, cold_file, tmp_path / "four", *args,
                                             "--replicate-degree", "2"), nproc=4, timeout=300)
    assert "world 4 (HSDP: 2 replicas x 2 shards)" in log
    one, four = metric(tmp_path / "one", "loss"), metric(tmp_path / "four", "loss")
    assert len(one) == len(four) == 2 and max(abs(a - b) for a, b in zip(one, four)) <= 1e-4, (one, four)

    shutil.copytree(tmp_path / "four" / "state", tmp_path / "two" / "state")
    (tmp_path / "two" / "state" / "latest").write_text("step_1")
    log = torchrun("train_sft.py", *sft_args(tiny_world, cold_file, tmp_path / "two", *args, "--resume"), timeout=300)
    assert "world 2 (FSDP over 2 ranks), start at step 1" in log
    assert abs(metric(tmp_path / "two", "loss")[-1] - one[1]) <= 1e-4
    a, b = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    assert max((a[name] - b[name]).abs().max().item() for name in a) <= 1e-4


def test_sft_teaches_the_cot_format_on_held_out_problems(tmp_path, monkeypatch):
    """Cold-start SFT on the synthetic cold data: the held-out loss falls far below its start and
    greedy answers to held-out test problems pass rewards.format_ok at least 90% of the time. The
    teacher does not over-think here, nor write the product's careful chain, whose re-counts are
    re-reads too (greedy decoding of a model that learnt to re-read "Wait" loops to the token limit;
    the pipeline samples at temperature 0.6, as the paper evaluates). 448 training records, 6 epochs
    of 16-record steps: 288 records in 8-record steps, enough before the product question, left 82.5%
    of greedy answers well-formed with it (held-out loss 6.72 -> 0.38)."""
    import evaluate
    import make_cold_data
    import synthetic

    monkeypatch.setattr(synthetic, "OVERTHINK_SPARSE", 0.0)
    monkeypatch.setattr(synthetic, "OVERTHINK_PER_OBJECT", 0.0)
    monkeypatch.setattr(synthetic, "CAREFUL_RATE", 0.0)

    world = synthetic.build(str(tmp_path / "world"), synthetic.Preset(n_train=480, n_rl=8, n_test=40), seed=0)
    cold = tmp_path / "cold" / "cold.jsonl"
    make_cold_data.main(["build", "--input", os.path.join(world, "data", "train.jsonl"), "--out", str(cold),
                         "--error-rate", "0", "--seed", "0"])
    out = tmp_path / "ci"
    train_sft.main(["--preset", "toy", "--model", os.path.join(world, "model"), "--data", str(cold), "--out", str(out),
                    "--epochs", "6", "--eval-holdout", "32"])
    with open(out / "metrics.jsonl") as f:
        eval_losses = [row["eval_loss"] for row in map(json.loads, f) if "eval_loss" in row]
    assert eval_losses[-1] < 0.1 * eval_losses[0]
    (summary,) = evaluate.main(["--model", str(out / "final"), "--bench", "synthetic", "--out", str(tmp_path / "eval"),
                                "--data", os.path.join(world, "data", "test.jsonl"), "--greedy", "--max-new-tokens", "160"])
    assert summary["format_rate"] >= 0.9, summary
