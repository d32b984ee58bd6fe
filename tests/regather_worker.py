"""One of tests/fsdp_checks.py's 2-rank checks: FSDP2's parameter all-gathers in one training forward +
backward, before and after a `model.gathered_params` block (a rollout), and every FSDP module's
reshard-after-forward setting before and after it."""

import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

sys.path.insert(0, ".")
import model as M  # noqa: E402
from tests import tiny  # noqa: E402
from tests.generate_fsdp_worker import count_calls  # noqa: E402


def reshards_after_forward(model):
    """Per FSDP module: does it free its gathered parameters after forward (FSDP2 keeps no getter)."""
    return [any(g.post_forward_mesh_info is not None for g in m._get_fsdp_state()._fsdp_param_groups)
            for m in model.modules() if isinstance(m, FSDPModule)]


def check(path):
    ids, pixels, grid = tiny.sample((5, 9), [(1, 8, 6)], seed=dist.get_rank())
    cu = torch.tensor([0, len(ids)], dtype=torch.int32)
    model = M.apply_fsdp(M.load_model(path), activation_checkpointing=False)
    with count_calls(dist, "all_gather_single") as all_gathers:  # FSDP2's parameter all-gather (torch 2.13)

        def gathers_in_a_training_step():
            before = len(all_gathers)
            model.packed_logprobs(ids, cu, torch.roll(ids, -1), pixels, grid).sum().backward()
            return len(all_gathers) - before

        gathers_in_a_training_step()  # the first one initialises FSDP (the root and its settings)
        settings = reshards_after_forward(model)
        plain = gathers_in_a_training_step()
        with M.gathered_params(model), torch.no_grad():
            model.packed_logprobs(ids, cu, torch.roll(ids, -1), pixels, grid)  # a rollout's forward
        after_rollout = gathers_in_a_training_step()

    return {"plain": plain, "after_rollout": after_rollout, "settings": settings,
            "settings_after_rollout": reshards_after_forward(model)}
