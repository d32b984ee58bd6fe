"""One of tests/fsdp_checks.py's 2-rank checks: generation from the FSDP2-wrapped model, each rank with its
own prompts (so the ranks decode different numbers of steps) and a cache budget smaller than its
rows: greedy against the unsharded model on the same prompts, sampled (prompt ids global) against
one unsharded process sampling every prompt; FSDP hook calls counted during generation; then one
training forward, which must still work after generation came first."""

import contextlib
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

sys.path.insert(0, ".")
import generate as G  # noqa: E402
import model as M  # noqa: E402
from tests import tiny  # noqa: E402
from train_utils import is_dtensor  # noqa: E402

SEQS = [((23,), []), ((5, 9), [(1, 8, 6)]), ((3, 4, 6), [(1, 4, 4), (1, 6, 8)]), ((11, 2), [(1, 4, 4)])]


@contextlib.contextmanager
def count_calls(module, name):
    """module.name wrapped so that every call in the with block is counted: yields the list the calls
    are appended to; the original is back after the block."""
    calls, original = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    setattr(module, name, counted)
    try:
        yield calls
    finally:
        setattr(module, name, original)


def greedy(model, prompts, eos_ids):
    return [c.token_ids for c in G.generate(model, prompts, eos_ids=eos_ids, n=2, max_new_tokens=16, greedy=True,
                                            kv_budget=147, check_every=2)]  # 3 slots for 4 rows


def sampled(model, prompts, prompt_ids, kv_budget=None):
    return [c.token_ids for c in G.generate(model, prompts, eos_ids=(7, 11, 13), n=3, max_new_tokens=12, seed=3,
                                            prompt_ids=prompt_ids, kv_budget=kv_budget)]


def count_hooks(modules):
    """A forward pre-hook on each module (it runs exactly when FSDP's own pre-forward hook would)."""
    calls = []
    return calls, [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in modules]


def check(path):
    rank, world = dist.get_rank(), dist.get_world_size()
    everyone = [dict(zip(("input_ids", "pixel_values", "image_grid_thw"), tiny.sample(lens, grids, seed=i)))
                for i, (lens, grids) in enumerate(SEQS)]
    prompts, prompt_ids = everyone[rank::world], list(range(len(SEQS)))[rank::world]
    reference = M.load_model(path).eval()
    every_sample = sampled(reference, everyone, range(len(SEQS)))  # 3 rows per prompt, prompt-major
    sampled_expected = [row for p in prompt_ids for row in every_sample[3 * p:3 * p + 3]]
    # an EOS id taken from the unsharded output of this rank's first prompt, so that rows stop early
    eos_ids = [greedy(reference, prompts, ())[0][4 + rank]]
    expected = greedy(reference, prompts, eos_ids)

    sharded = M.apply_fsdp(M.load_model(path), activation_checkpointing=False)
    layer_hooks, layer_handles = count_hooks(sharded.model.layers)
    vision_hooks, vision_handles = count_hooks(sharded.visual.blocks)
    with count_calls(dist, "all_gather_single") as all_gathers:  # FSDP2's parameter all-gather (torch 2.13)
        got = greedy(sharded, prompts, eos_ids)
    for handle in layer_handles + vision_handles:
        handle.remove()
    got_sampled = sampled(sharded, prompts, prompt_ids, kv_budget=110)  # 2 slots for 6 rows
    fsdp_modules = sum(isinstance(m, FSDPModule) for m in sharded.modules())
    resharded = all(is_dtensor(p) for p in sharded.parameters())

    ids, pixels, grid = tiny.sample(*SEQS[1], seed=1)
    cu = torch.tensor([0, len(ids)], dtype=torch.int32)
    with torch.no_grad():
        loss = sharded.packed_logprobs(ids, cu, torch.roll(ids, -1), pixels, grid).sum()
        ref_loss = reference.packed_logprobs(ids, cu, torch.roll(ids, -1), pixels, grid).sum()

    return {"got": got, "expected": expected, "all_gathers": len(all_gathers), "sampled": got_sampled,
            "sampled_expected": sampled_expected, "layer_hooks": len(layer_hooks), "vision_hooks": len(vision_hooks),
            "vision_blocks": len(sharded.visual.blocks), "fsdp_modules": fsdp_modules, "resharded": resharded,
            "loss_diff": abs(loss - ref_loss).item()}
