"""FSDP2 on CPU with gloo: two processes equal one (loss and updated weights); ranks with uneven work;
the process group a GPU run asks for."""

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist

import train_utils
from tests import scripts


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TEARDOWN_ABORT = "terminate called without an active exception"


def torchrun(script, *args, nproc=2, timeout=300, rerun_on_teardown_abort=False):
    """stdout of `script` run on `nproc` CPU ranks (rank 0's first), each process started as
    `torchrun --nproc_per_node nproc` starts it (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
    MASTER_ADDR and MASTER_PORT for the env:// rendezvous: all our scripts read), by tests/scripts.py
    instead of torchrun's launcher (whose own torch import cost ~5 s a launch here). As torchrun does, a
    rank that fails stops the others (they would wait on its collectives); a run past `timeout` seconds is
    killed and fails the test. With `rerun_on_teardown_abort`, a run in which a rank aborts with
    TEARDOWN_ABORT is run once more: torch 2.13's gloo does that now and then (a few runs in a hundred
    here) after the workers' results are out and the process group destroyed. Only for scripts that
    write nothing a second run would find."""
    for _ in range(2 if rerun_on_teardown_abort else 1):
        port, ranks = free_port(), []
        for rank in range(nproc):
            env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "RANK": str(rank),
                   "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            ranks.append(scripts.start(script, args, env=env))
        deadline, timed_out = time.monotonic() + timeout, False
        while any(rank.poll() is None for rank in ranks) and not any(rank.poll() for rank in ranks):
            timed_out = time.monotonic() > deadline
            if timed_out:
                break
            time.sleep(0.05)
        for rank in ranks:  # a failed rank's peers wait on its collectives: stop them
            if rank.poll() is None:
                rank.kill()
            rank.wait()
        stdout, stderr = "".join(rank.stdout for rank in ranks), "".join(rank.stderr for rank in ranks)
        if timed_out:
            raise AssertionError(f"{script} ran past {timeout} s\n{stdout[-3000:]}{stderr[-3000:]}")
        if all(rank.returncode == 0 for rank in ranks) or TEARDOWN_ABORT not in stderr:
            break
    assert all(rank.returncode == 0 for rank in ranks), stdout[-3000:] + stderr[-3000:]
    return stdout


def test_fsdp2_step_equals_single_process(fsdp_checks):
    result = fsdp_checks["step"][0]
    assert abs(result["loss"] - result["ref_loss"]) <= 1e-5, result
    assert result["max_update"] > 5e-4  # the step moved the weights ...
    assert result["max_weight_diff"] <= 1e-5, result  # ... identically in both runs


def test_ranks_with_1_and_4_micro_batches_equal_one_rank(fsdp_checks):
    """Frozen log-probs (old policy, reference) and an accumulated gradient when one rank has 1
    packed micro-batch and the other 4: every rank runs 4 passes (train_utils.aligned_passes)."""
    results = fsdp_checks["uneven"]
    assert [r["micro_batches"] for r in results] == [1, 4]
    for r in results:
        assert r["frozen_abs"] > 1.0 and r["frozen_diff"] <= 1e-5, r
        assert r["same_params"] and r["grad_scale"] > 1e-3 and r["grad_diff"] <= 1e-6, r


class ProcessGroupAsked(Exception):
    """Raised by `asked_process_group` in place of init_process_group."""


@pytest.fixture
def asked_process_group(monkeypatch):
    """What a training script asks of init_process_group as rank 0 of 2: the call is recorded in the
    returned dict and raises ProcessGroupAsked, so the script stops there."""
    asked = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")

    def recorded_init(backend, **kwargs):
        asked.update(backend=backend, **kwargs)
        raise ProcessGroupAsked

    monkeypatch.setattr(dist, "init_process_group", recorded_init)
    return asked


def served_device_types(backend):
    """Device types whose tensors a process group made with `backend` can reduce: NCCL serves CUDA
    tensors only, gloo both; "cpu:gloo,cuda:nccl" names a backend per device type."""
    if ":" in backend:
        return {pair.split(":")[0] for pair in backend.split(",")}
    return {"nccl": {"cuda"}, "gloo": {"cpu", "cuda"}}[backend]


@pytest.fixture
def simulated_gpu_rank(monkeypatch):
    """Rank 0 of 2 on a machine with GPUs, as far as train_utils can tell: torch.cuda reports a
    device, init_process_group records what it is asked for and opens a 1-process gloo group in its
    place, and every all_reduce checks that the group asked for serves its tensor's device."""
    asked = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    init, all_reduce = dist.init_process_group, dist.all_reduce

    def recorded_init(backend, **kwargs):
        asked.update(backend=backend, **kwargs)
        init("gloo", store=dist.HashStore(), rank=0, world_size=1)

    def checked_all_reduce(tensor, *args, **kwargs):
        assert tensor.device.type in served_device_types(asked["backend"]), \
            f"a {asked['backend']} group cannot reduce a {tensor.device.type} tensor"
        return all_reduce(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "init_process_group", recorded_init)
    monkeypatch.setattr(dist, "all_reduce", checked_all_reduce)
    yield asked
    dist.destroy_process_group()


def test_collectives_on_gpus_use_a_backend_that_serves_their_tensors(simulated_gpu_rank):
    rank, world, device = train_utils.init_distributed()
    assert (rank, world, device.type) == (0, 2, "cuda")
    assert simulated_gpu_rank["timeout"] > datetime.timedelta(minutes=10)  # NCCL's default aborts a long rollout
    assert float(train_utils.all_reduce(3)) == 3.0  # token counts and losses: CPU numbers
    assert train_utils.ranks_max(4) == 4
    assert list(train_utils.aligned_passes(["a"])) == [("a", 1.0)]


def test_a_rollout_leaves_training_with_as_many_all_gathers(fsdp_checks):
    """After model.gathered_params (a rollout), a training forward + backward all-gathers as often as
    before it: every FSDP module gets back its reshard-after-forward setting (the root: keep its
    parameters from forward to backward)."""
    for r in fsdp_checks["regather"]:
        assert r["settings"][0] is False and all(r["settings"][1:]), r  # the root (first) keeps its parameters
        assert r["settings_after_rollout"] == r["settings"], r
        assert r["plain"] > 0 and r["after_rollout"] == r["plain"], r


def test_param_groups_are_read_in_both_torch_layouts():
    """gathered_params reads each FSDP2 module's parameter groups from a private attribute: a list in
    torch 2.13, one group or None in torch 2.11 (the first GPU run, on a 2.11 image, stopped at its first
    rollout on the missing list). Stand-ins of both states; the real 2.13 modules run in the test above."""
    import types

    import model as M

    group = object()
    for state, groups in ((types.SimpleNamespace(_fsdp_param_group=group), [group]),
                          (types.SimpleNamespace(_fsdp_param_group=None), []),
                          (types.SimpleNamespace(_fsdp_param_groups=[group, group]), [group, group])):
        assert M._fsdp_param_groups(types.SimpleNamespace(_get_fsdp_state=lambda state=state: state)) == groups


def test_aligned_passes_pads_to_the_busiest_rank(monkeypatch):
    """As rank 0 of a run whose busiest rank has 3 micro-batches (train_utils.ranks_max stands in)."""
    monkeypatch.setattr(train_utils, "ranks_max", lambda count: 3)
    assert list(train_utils.aligned_passes(["a", "b"])) == [("a", 1.0), ("b", 1.0), ("a", 0.0)]
    assert list(train_utils.aligned_passes([], filler="idle")) == [("idle", 0.0)] * 3


def test_replicate_degree_must_divide_the_world():
    assert train_utils.data_parallel_mesh(8, 1, torch.device("cpu")) is None  # plain FSDP: no mesh to build
    for world, degree in ((8, 3), (1, 2), (8, 0)):
        with pytest.raises(ValueError, match=f"replicate_degree {degree} does not divide the world size {world}"):
            train_utils.data_parallel_mesh(world, degree, torch.device("cpu"))
