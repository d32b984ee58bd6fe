"""Run under `torchrun --nproc_per_node 2 tests/mllama_fsdp_worker.py DIR`: forward + backward of the
tiny Llama 3.2 Vision in DIR, loaded shard by shard with FSDP2 and activation checkpointing, rank 0
on the text-only sequences of DIR/inputs.pt (its cross-attention layers and vision layers still join
every collective) and rank 1 on those with images, against the unsharded model on all of them in
one process. Prints one JSON line from rank 0."""

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, ".")
import model as M  # noqa: E402
from tests import tiny_mllama  # noqa: E402


def loss_of(model, sequences, total_tokens, world_size):
    """Next-token loss summed over `sequences` / the global batch's token count, backward run (scaled
    by the world size: FSDP averages gradients over ranks)."""
    ids, cu, images = tiny_mllama.pack(sequences)
    targets = torch.roll(ids, -1)
    mask = targets != tiny_mllama.IMAGE  # <|image|> is no row of the head: never a target
    mask[cu[1:] - 1] = False  # the last token of every sequence has no target
    loss = -(model.packed_logprobs(ids, cu, targets * mask, **images) * mask).sum() / total_tokens
    (loss * world_size).backward()
    return loss.detach()


def main():
    path = sys.argv[1]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))  # a mismatch fails, not hangs
    rank, world = dist.get_rank(), dist.get_world_size()
    sequences = torch.load(os.path.join(path, "inputs.pt"), weights_only=True)
    total_tokens = sum(len(s["input_ids"]) - 1 for s in sequences)
    text_only = [s for s in sequences if "pixel_values" not in s]
    with_images = [s for s in sequences if "pixel_values" in s]

    sharded = M.load_sharded(path, "cpu", activation_checkpointing=True)
    loss = loss_of(sharded, [text_only, with_images][rank], total_tokens, world)
    dist.all_reduce(loss)
    grads = {name: p.grad.full_tensor() for name, p in sharded.named_parameters()}
    if rank == 0:
        reference = M.load_model(path)
        ref_loss = loss_of(reference, sequences, total_tokens, 1)
        # each parameter's gradient difference relative to its largest entry (vision gradients are ~1e-6)
        diffs = {name: ((grads[name] - p.grad).abs().max() / p.grad.abs().max()).item()
                 for name, p in reference.named_parameters()}
        print(json.dumps({"loss": loss.item(), "ref_loss": ref_loss.item(), "sharded": sharded.sharded,
                          "max_relative_grad_diff": max(diffs.values()), "worst": max(diffs, key=diffs.get)}),
              flush=True)
    dist.barrier()  # no rank tears gloo down while another still reads from it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
