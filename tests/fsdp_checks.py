"""Run under `torchrun --nproc_per_node 2 tests/fsdp_checks.py DIR`: every 2-rank FSDP2 check on
tests/tiny.py's model saved in DIR, in one launch (a launch costs seconds of process starts and
imports, a check about one). Prints one JSON line from rank 0: {check: [rank 0's result, rank 1's]}."""

import datetime
import json
import sys

import torch.distributed as dist

sys.path.insert(0, ".")
from tests import fsdp_worker, generate_fsdp_worker, regather_worker, uneven_worker  # noqa: E402

CHECKS = {"step": fsdp_worker.check, "uneven": uneven_worker.check, "regather": regather_worker.check,
          "generate": generate_fsdp_worker.check}


def main():
    path = sys.argv[1]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))  # a mismatch fails, not hangs
    results = {}
    for name, check in CHECKS.items():
        results[name] = [None] * dist.get_world_size()
        dist.all_gather_object(results[name], check(path))
    if dist.get_rank() == 0:
        print(json.dumps(results), flush=True)
    dist.barrier()  # no rank tears gloo down while another still reads from it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
