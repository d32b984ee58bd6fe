"""One of tests/fsdp_checks.py's 2-rank checks: one AdamW step of the FSDP2-wrapped model on a packed
batch (each rank takes half of the sequences) against the same step of the unsharded model on the
whole batch in one process (rank 0's result; rank 1 returns None)."""

import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, ".")
import model as M  # noqa: E402
from tests import tiny  # noqa: E402

SEQS = [((23,), []), ((5, 9), [(1, 8, 6)]), ((3, 4, 6), [(1, 4, 4), (1, 6, 8)]), ((11, 2), [(1, 4, 4)])]


def packed(samples):
    ids = torch.cat([s[0] for s in samples])
    cu = torch.tensor([0] + [len(s[0]) for s in samples]).cumsum(0).to(torch.int32)
    pixels = [s[1] for s in samples if s[1] is not None]
    grids = [s[2] for s in samples if s[2] is not None]
    return ids, cu, (torch.cat(pixels) if pixels else None), (torch.cat(grids) if grids else None)


def step(model, samples, total_tokens, world_size):
    """Next-token loss summed over this process's tokens / tokens of the whole global batch.
    Scaled by the world size for backward because FSDP averages gradients over ranks."""
    # built before the forward: FSDP2 swaps unsharded tensors into the root module during it
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    ids, cu, pixels, grids = packed(samples)
    targets = torch.roll(ids, -1)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[cu[1:] - 1] = False  # the last token of every sequence has no target
    logp = model.packed_logprobs(ids, cu, targets, pixels, grids)
    loss = -(logp * mask).sum() / total_tokens
    (loss * world_size).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.detach()


def check(path):
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    samples, total_tokens = tiny.global_batch(SEQS)

    sharded = M.apply_fsdp(M.load_model(path), activation_checkpointing=True)
    loss = step(sharded, samples[rank::world], total_tokens, world)
    dist.all_reduce(loss)
    sharded_state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    reference = M.load_model(path)
    ref_loss = step(reference, samples, total_tokens, 1)
    diffs = [(name, (sharded_state[name] - p).abs().max().item()) for name, p in reference.state_dict().items()]
    changed = max((p - q).abs().max().item() for p, q in zip(reference.state_dict().values(),
                                                             M.load_model(path).state_dict().values()))
    return {"loss": loss.item(), "ref_loss": ref_loss.item(), "max_weight_diff": max(d for _, d in diffs),
            "worst": sorted(diffs, key=lambda x: -x[1])[:8], "max_update": changed}
