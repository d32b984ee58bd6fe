"""One of tests/fsdp_checks.py's 2-rank checks: ranks with 1 and 4 packed micro-batches. The FSDP2 model's
frozen log-probs (train_grpo.frozen_logprobs) must equal the unsharded model's, and the gradient of a
token-mean loss accumulated through train_utils.aligned_passes must equal the unsharded gradient of
the whole batch."""

import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, ".")
import data  # noqa: E402
import model as M  # noqa: E402
import train_grpo  # noqa: E402
from tests import tiny  # noqa: E402
from train_utils import aligned_passes, full_value  # noqa: E402

CFG = SimpleNamespace(micro_batch_tokens=64, temperature=1.0)
MAX_LEN = 24


def group(seed, prompt, response_lengths, first_row):
    """A GRPO group: a prompt (tiny.sample's text lengths and image grids) and random responses."""
    ids, pixels, grid = tiny.sample(*prompt, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    return {"input_ids": ids.tolist(), "pixel_values": pixels, "image_grid_thw": grid,
            "continuations": [torch.randint(0, 300, (n,), generator=g).tolist() for n in response_lengths],
            "rows": list(range(first_row, first_row + len(response_lengths)))}


# rank 0: one short group (1 micro-batch); rank 1: four groups, each filling a micro-batch of 64 tokens
RANK_GROUPS = [[group(0, ((3, 2), [(1, 4, 4)]), [3, 5], 0)],
               [group(1 + k, ((4, 3), [(1, 4, 4)]), [MAX_LEN, 20], 2 * k) for k in range(4)]]


def token_mean_loss_backward(model, groups, global_tokens, world):
    """Backward of -sum(log p) / global_tokens over `groups`, one micro-batch per pass, scaled by the
    world size because FSDP averages gradients over ranks."""
    for batch, weight in aligned_passes(data.pack_shared_prompts(groups, CFG.micro_batch_tokens)):
        _, logp, _, mask = train_grpo.response_logprobs(model, batch, MAX_LEN, CFG.temperature, "cpu")
        (-(logp * mask).sum() / global_tokens * weight * world).backward()


def full_grads(model):
    return {name: full_value(p.grad)
            for name, p in model.named_parameters() if p.grad is not None}


def check(path):
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = RANK_GROUPS[rank]
    micro_batches = len(data.pack_shared_prompts(mine, CFG.micro_batch_tokens))

    unsharded = M.load_model(path)
    sharded = M.apply_fsdp(M.load_model(path), activation_checkpointing=False)
    frozen = train_grpo.frozen_logprobs(sharded, mine, MAX_LEN, CFG, "cpu")
    expected = train_grpo.frozen_logprobs(unsharded, mine, MAX_LEN, CFG, "cpu")
    frozen_diff = (frozen - expected).abs().max().item()

    all_groups = RANK_GROUPS[0] + RANK_GROUPS[1]  # the 1-rank run holds every group
    global_tokens = sum(len(c) for g in all_groups for c in g["continuations"])
    token_mean_loss_backward(sharded, mine, global_tokens, world)
    grads = full_grads(sharded)
    token_mean_loss_backward(unsharded, all_groups, global_tokens, 1)
    expected_grads = full_grads(unsharded)
    grad_diff = max((grads[n] - g).abs().max().item() for n, g in expected_grads.items())
    grad_scale = max(g.abs().max().item() for g in expected_grads.values())

    return {"micro_batches": micro_batches, "frozen_diff": frozen_diff, "frozen_abs": expected.abs().max().item(),
            "grad_diff": grad_diff, "grad_scale": grad_scale, "same_params": sorted(grads) == sorted(expected_grads)}
