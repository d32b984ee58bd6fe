"""Run under `torchrun --nproc_per_node 2`: greedy generation from the FSDP2-wrapped model, each rank
with its own prompts (so the ranks decode different numbers of steps), against the unsharded model;
then one training forward, which must still work after generation came first. Prints one JSON
line from rank 0."""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

sys.path.insert(0, ".")
import generate as G  # noqa: E402
import model as M  # noqa: E402
from tests import tiny  # noqa: E402

SEQS = [((23,), []), ((5, 9), [(1, 8, 6)]), ((3, 4, 6), [(1, 4, 4), (1, 6, 8)]), ((11, 2), [(1, 4, 4)])]


def count_calls(module, name):
    """Wrap module.name so that every call is counted; returns the list the calls are appended to."""
    calls, original = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    setattr(module, name, counted)
    return calls


def greedy(model, prompts, eos_ids):
    return [c.token_ids for c in G.generate(model, prompts, eos_ids=eos_ids, n=2, max_new_tokens=16, greedy=True)]


def main():
    path = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    prompts = [dict(zip(("input_ids", "pixel_values", "image_grid_thw"), tiny.sample(lens, grids, seed=i)))
               for i, (lens, grids) in enumerate(SEQS)][rank::world]
    reference = M.load_model(path).eval()
    # an EOS id taken from the unsharded output of this rank's first prompt, so that rows stop early
    eos_ids = [greedy(reference, prompts, ())[0][4 + rank]]
    expected = greedy(reference, prompts, eos_ids)

    sharded = M.apply_fsdp(M.load_model(path), activation_checkpointing=False)
    all_gathers = count_calls(dist, "all_gather_single")  # FSDP2's parameter all-gather (torch 2.13)
    got = greedy(sharded, prompts, eos_ids)
    gathers_in_generation = len(all_gathers)
    fsdp_modules = sum(isinstance(m, FSDPModule) for m in sharded.modules())
    resharded = all(isinstance(p, torch.distributed.tensor.DTensor) for p in sharded.parameters())

    ids, pixels, grid = tiny.sample(*SEQS[1], seed=1)
    cu = torch.tensor([0, len(ids)], dtype=torch.int32)
    with torch.no_grad():
        loss = sharded.packed_logprobs(ids, cu, torch.roll(ids, -1), pixels, grid).sum()
        ref_loss = reference.packed_logprobs(ids, cu, torch.roll(ids, -1), pixels, grid).sum()

    results = [None] * world
    dist.all_gather_object(results, {"got": got, "expected": expected, "all_gathers": gathers_in_generation,
                                     "fsdp_modules": fsdp_modules, "resharded": resharded,
                                     "loss_diff": abs(loss - ref_loss).item()})
    if rank == 0:
        print(json.dumps(results), flush=True)
    dist.barrier()  # no rank tears gloo down while another still reads from it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
