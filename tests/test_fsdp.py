"""FSDP2 on CPU with gloo: two processes equal one (loss and updated weights)."""

import json
import os
import socket
import subprocess
import sys

from tests import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, *args, nproc=2, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                          "--master_addr", "127.0.0.1", "--master_port", str(free_port()), script, *map(str, args)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_fsdp2_step_equals_single_process(tmp_path):
    tiny.save_vl(tmp_path)
    result = json.loads(torchrun("tests/fsdp_worker.py", tmp_path).strip().splitlines()[-1])
    assert abs(result["loss"] - result["ref_loss"]) <= 1e-5, result
    assert result["max_update"] > 5e-4  # the step moved the weights ...
    assert result["max_weight_diff"] <= 1e-5, result  # ... identically in both runs
