"""Run under `torchrun --nproc_per_node 1` or `2` on a checkpoint stored in bf16, as the released ones
are: the bf16 precision policy under FSDP2 against unsharded references. Prints one JSON line from
rank 0 with
  load    model.load_sharded against loading whole then sharding (load_model + apply_fsdp): largest
          parameter difference, and the peak bytes of the tensors alive on this rank while each loads
          (`LiveBytes`), beside the bytes of one full fp32 copy of the model
  vision  the sharded bf16 model against the unsharded bf16 model (the evaluation model): largest
          difference of the packed forward's hidden states (vision features included) and of the
          embeddings under gathered_params (generation's prefill)
  sft     one SFT step (next-token loss) under the bf16 policy against the same step of the unsharded
  grpo    fp32 model in one process, and one GRPO step (shared-prompt packing, clipped loss, k3 KL to a
          reference loaded in bf16): loss, relative error of the gradient and of the update, and the
          dtypes of master weights, gradients and optimizer state
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, ".")
import data  # noqa: E402
import model as M  # noqa: E402
import train_grpo  # noqa: E402
from tests import tiny  # noqa: E402
from train_utils import full_value  # noqa: E402

BF16 = torch.bfloat16
SEQS = [((23,), []), ((5, 9), [(1, 8, 6)]), ((3, 4, 6), [(1, 4, 4), (1, 6, 8)]), ((11, 2), [(1, 4, 4)])]
LR = 1e-3


class LiveBytes(TorchDispatchMode):
    """Peak bytes of CPU tensor storage alive while the mode is on. Every storage an op returns
    counts from then until it is freed (a weak reference says when): reads from safetensors files
    (their tensors come out of `set_` on a file-mapped storage), dtype copies, FSDP2's shards (a
    DTensor counts its local tensor). Conservative: a file-mapped read counts whole, though only the
    rows sliced from it are ever touched."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            t = t._local_tensor if isinstance(t, DTensor) else t
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.untyped_storage().nbytes():
                storage = t.untyped_storage()
                self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        self.live = {ptr: (ref, n) for ptr, (ref, n) in self.live.items() if not ref.expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def full_params(model):
    return {name: full_value(p).detach().clone()
            for name, p in model.named_parameters()}


def loading(path):
    with LiveBytes() as counter:
        sharded = M.load_sharded(path, "cpu", param_dtype=BF16)
    peak_sharded = counter.peak
    with LiveBytes() as counter:
        whole = M.apply_fsdp(M.load_model(path), param_dtype=BF16)
    full_fp32 = sum(p.numel() * 4 for p in whole.parameters())
    a, b = full_params(sharded), full_params(whole)
    return {"max_diff": max((a[n] - b[n]).abs().max().item() for n in b), "same_names": sorted(a) == sorted(b),
            "peak_sharded": peak_sharded, "peak_whole": counter.peak, "full_fp32": full_fp32,
            "master_dtypes": sorted({str(p.dtype) for p in sharded.parameters()})}


def packed(samples):
    ids = torch.cat([s[0] for s in samples])
    cu = data.cu_seqlens_of([len(s[0]) for s in samples])
    pixels, grids = data.concat_images([{"pixel_values": p, "image_grid_thw": g} for _, p, g in samples])
    return ids, cu, pixels, grids


@torch.no_grad()
def vision(path, samples):
    evaluation = M.load_model(path, dtype=BF16).eval()
    sharded = M.load_sharded(path, "cpu", param_dtype=BF16).eval()
    ids, cu, pixels, grids = packed(samples)
    training = sharded.forward_packed(ids, cu, pixels, grids)
    with M.gathered_params(sharded):
        prefill = sharded.embed(ids, pixels, grids)
    return {"forward": (training - evaluation.forward_packed(ids, cu, pixels, grids)).abs().max().item(),
            "prefill": (prefill - evaluation.embed(ids, pixels, grids)).abs().max().item()}


def sft_loss(model, samples, total_tokens):
    ids, cu, pixels, grids = packed(samples)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[cu[1:].long() - 1] = False  # the last token of every sequence has no target
    logp = model.packed_logprobs(ids, cu, torch.roll(ids, -1), pixels, grids)
    return -(logp * mask).sum() / total_tokens


def grpo_groups(samples):
    """One group per sample: the sample as prompt, three random responses (one empty), advantages."""
    g = torch.Generator().manual_seed(7)
    groups = []
    for i, (ids, pixels, grid) in enumerate(samples):
        responses = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (9, 0, 5)]
        groups.append({"input_ids": ids.tolist(), "pixel_values": pixels, "image_grid_thw": grid,
                       "continuations": responses, "rows": [3 * i + j for j in range(3)],
                       "advantages": torch.randn(3, generator=g)})
    return groups


def grpo_loss(model, reference, groups, global_tokens):
    """train_grpo's loss of one micro-batch holding `groups`: clipped policy loss (on-policy: ratio 1)
    plus the k3 KL term to `reference`, token-mean over the global batch."""
    (batch,) = data.pack_shared_prompts(groups, max_tokens=10_000)
    args = (batch["input_ids"], batch["cu_seqlens"], batch["targets"], batch["pixel_values"], batch["image_grid_thw"])
    extra = dict(temperature=0.7, positions=batch["positions"], prefix_of=batch["prefix_of"])
    logp = model.packed_logprobs(*args, **extra)
    with torch.no_grad():
        ref_logp = reference.packed_logprobs(*args, **extra)
    mask = torch.arange(9) < batch["lengths"][:, None]
    padded = [torch.zeros(mask.shape).masked_scatter(mask, x.float()) for x in (logp, ref_logp)]
    advantage_of = {row: a for g in groups for row, a in zip(g["rows"], g["advantages"])}
    advantages = torch.stack([advantage_of[row] for row in batch["rows"]])
    loss, _ = train_grpo.policy_loss(padded[0], padded[0].detach(), advantages, mask, ref_logp=padded[1],
                                     kl_coef=0.5, global_tokens=global_tokens)
    return loss


def step(model, loss_fn, world):
    """Backward of loss * world (FSDP averages gradients over ranks), one AdamW step. Returns the
    loss summed over ranks, the full gradient of every trained parameter and the updated weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.1)
    loss = loss_fn()
    (loss * world).backward()
    grads = {name: full_value(p.grad).clone()
             for name, p in model.named_parameters() if p.requires_grad}
    grad_dtypes = {str(p.grad.dtype) for p in params}
    optimizer.step()
    state_dtypes = {str(v.dtype) for s in optimizer.state.values() for k, v in s.items() if k != "step"}
    loss = loss.detach().float()
    if world > 1:
        dist.all_reduce(loss)
    return loss.item(), grads, full_params(model), sorted(grad_dtypes | state_dtypes)


def relative(a, b, names):
    """|a - b| / |b| over the concatenation of the named tensors."""
    diff = torch.cat([(a[n].float() - b[n].float()).flatten() for n in names])
    return (diff.norm() / torch.cat([b[n].float().flatten() for n in names]).norm()).item()


def compare(path, make_loss, rank, world, needs_reference):
    """One step of `make_loss(model, reference, share)` under the bf16 policy on this rank's share
    against the unsharded fp32 step on everything (rank 0)."""
    policy = M.load_sharded(path, "cpu", param_dtype=BF16)
    policy.visual.requires_grad_(False)
    reference = M.load_sharded(path, "cpu", dtype=BF16, param_dtype=BF16).eval() if needs_reference else None
    before = full_params(policy)
    loss, grads, after, dtypes = step(policy, lambda: make_loss(policy, reference, rank, world), world)
    if rank != 0:
        return None
    fp32 = M.load_model(path)
    fp32.visual.requires_grad_(False)
    fp32_reference = M.load_model(path).eval() if needs_reference else None
    ref_loss, ref_grads, ref_after, _ = step(fp32, lambda: make_loss(fp32, fp32_reference, 0, 1), 1)
    names = sorted(ref_grads)
    update, ref_update = ({n: w[n] - before[n] for n in names} for w in (after, ref_after))
    return {"loss": loss, "ref_loss": ref_loss, "grad_error": relative(grads, ref_grads, names),
            "update_error": relative(update, ref_update, names), "dtypes": dtypes,
            "max_update": max(ref_update[n].abs().max().item() for n in names)}


def main():
    path = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    samples, total_tokens = tiny.global_batch(SEQS)
    groups = grpo_groups(samples)
    response_tokens = sum(len(r) for g in groups for r in g["continuations"])

    result = {"load": loading(path), "vision": vision(path, samples)}
    result["sft"] = compare(path, lambda model, _, r, w: sft_loss(model, samples[r::w], total_tokens), rank, world,
                            needs_reference=False)
    result["grpo"] = compare(path, lambda model, ref, r, w: grpo_loss(model, ref, groups[r::w], response_tokens),
                             rank, world, needs_reference=True)
    results = [None] * world
    dist.all_gather_object(results, {"load": result["load"], "vision": result["vision"]})
    if rank == 0:
        print(json.dumps({**result, "ranks": results}), flush=True)
    dist.barrier()  # no rank tears gloo down while another still reads from it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
