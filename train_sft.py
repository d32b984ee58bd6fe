"""Cold-start supervised fine-tuning: the base model learns the long, self-checking CoT format
from the modality-bridged data and becomes Vision-R1-CI (docs/method.md §2).

    torchrun --nproc_per_node 8 train_sft.py --model Qwen2.5-VL-7B-Instruct \\
        --data vision_r1_cold.json --out runs/vision-r1-ci   # the defaults: the paper's run
    python train_sft.py --preset toy                     # the synthetic world's tiny model, on CPU
    torchrun --nproc_per_node 8 train_sft.py --preset paper-llamav   # Vision-R1-LlamaV-CI

Either architecture, chosen from the checkpoint's config.json: Qwen2.5-VL (model.py) or Llama 3.2
Vision (model_type mllama, model_mllama.py: its images are tiles read by cross-attention).

Loss on assistant tokens only, sequences packed without attention between them, per-token loss
normalised by the global batch's token count (exact across micro-batches and ranks), FSDP2 with
bf16 compute and fp32 master weights on any number of GPUs (one included; the model loaded shard
by shard), HF-format checkpoints plus a torch.distributed.checkpoint training state for --resume.
"""

import math
import sys
from dataclasses import dataclass

import torch

import data
import memplan
import model as M
from train_utils import (InputError, Logger, NonFiniteGuard, Timer, aligned_passes, all_reduce, command_line,
                         exit_if_missing, full_value, image_inputs, lr_at, parse_config, peak_memory_gib,
                         refuse_bad_flags, resumed_step, save_checkpoint, sharding_of, start_run)


@dataclass
class SFTConfig:
    # data and model
    model: str = "checkpoints/Qwen2.5-VL-7B-Instruct"  # HF checkpoint directory to start from
    data: str = "vision_r1_cold.json"           # conversations: sharegpt `conversations` or `messages`
    out: str = "runs/vision-r1-ci"              # output folder: metrics.jsonl, config.json, step_N/, state/, final/
    skip_bad: bool = False                      # skip and count bad records instead of failing
    eval_holdout: int = 0                       # last N records held out for the eval loss
    min_pixels: int = 0                         # 0: the checkpoint's preprocessor config
    max_pixels: int = 0                         # 0: the checkpoint's preprocessor config
    # optimisation (paper: lr 5e-6 cosine, 5% warmup, no weight decay, 2 epochs, batch 32, 16K context)
    lr: float = 5e-6                            # peak learning rate
    schedule: str = "cosine"                    # cosine (decay to 0 after warmup) or constant
    warmup_ratio: float = 0.05                  # linear warmup over this fraction of the steps
    weight_decay: float = 0.0                   # AdamW's decoupled weight decay
    adam_beta1: float = 0.9                     # AdamW beta1
    adam_beta2: float = 0.999                   # AdamW beta2
    epochs: float = 2.0                         # passes over the data (fractions allowed)
    global_batch: int = 32                      # sequences per optimizer step, over all ranks
    max_tokens: int = 16384                     # context and packed micro-batch size; longer samples are cut
    grad_clip: float = 1.0                      # max global gradient norm
    train_vision: bool = False                  # paper: vision tower and projector frozen
    activation_checkpointing: bool = True       # keep layer inputs only; recompute in backward
    replicate_degree: int = 1                   # HSDP: N replicas, each sharded over world/N ranks (a node); 1: FSDP
    param_dtype: str = "bfloat16"               # compute dtype at any world size (FSDP2); fp32 master weights and reduction
    attention: str = "flash"                    # flash: flash-attn's kernels on CUDA (refused if not installed); sdpa: PyTorch's
    seed: int = 0                               # python, numpy and torch seeds; the data order
    # the memory plan (memplan.py): config.json alone, no weights, data or processes
    plan: bool = False                          # print each phase's memory per GPU for this config and exit
    world_size: int = 0                         # GPUs the plan is for (0: this launch's WORLD_SIZE)
    gpu_memory_gib: float = 80.0                # memory of one GPU: the plan warns of a phase that needs more
    # operations
    log_every: int = 1                          # steps between metrics lines (metrics.jsonl, stdout, wandb)
    eval_every: int = 0                         # 0: only at start and end
    save_every: int = 0                         # HF checkpoint + training state every K steps (0: end only)
    keep_last: int = 2                          # step checkpoints kept (weights and state; final always); 0: all
    dist_timeout_minutes: int = 120             # a collective's wait for a late rank before abort: rank 0 writes
                                                # the weights alone while the others wait; NCCL's default: 10
    max_nonfinite: int = 3                      # non-finite steps in a row (each skipped) that stop the run
    resume: bool = False                        # continue exactly from the output folder's latest training state
    peak_tflops: float = 989.0                  # per-device peak for MFU (H100 bf16 dense)
    wandb_project: str = "vision-r1"            # wandb project (WANDB_MODE=offline/disabled as usual)
    wandb_group: str = ""                       # wandb group: the runs to compare side by side
    run_name: str = "sft"                       # wandb run name

    def __post_init__(self):
        """Refuse values the run cannot use, naming the flag (parse_config: a usage error)."""
        refuse_bad_flags(self, positive=("global_batch", "max_tokens", "epochs", "grad_clip", "log_every",
                                         "max_nonfinite", "replicate_degree", "dist_timeout_minutes"),
                         non_negative=("lr", "warmup_ratio", "weight_decay", "eval_holdout", "min_pixels", "max_pixels",
                                       "eval_every", "save_every", "keep_last"),
                         world_multiples=("global_batch",))


# The defaults above are the paper's run; paper-llamav is its cold start on Llama 3.2 Vision (the
# same recipe, docs/method.md §2); the toy preset is the synthetic world on CPU (pipeline.py, tests).
PRESETS = {
    "paper": dict(),
    "paper-llamav": dict(model="checkpoints/Llama-3.2-11B-Vision-Instruct", out="runs/vision-r1-llamav-ci",
                         run_name="sft-llamav"),
    "toy": dict(model="runs/toy/base/final", data="runs/toy/cold/cold.jsonl", out="runs/toy/ci", lr=1e-3, epochs=3.0,
                global_batch=16, max_tokens=4096, eval_holdout=64, warmup_ratio=0.05,
                activation_checkpointing=False,  # the random vision tower already separates every cell
                param_dtype="float32"),  # CPU: exact, and the tests compare runs to 1e-5
}


# a one-token, unlabelled batch: the pass of a rank that has no micro-batch of its own (all its
# records too long, or fewer held-out records than ranks) costs nothing and adds nothing
IDLE_BATCH = data.collate([{"input_ids": [0], "labels": [-100]}], [])


def shifted_targets(batch):
    """Next-token targets of a packed batch: targets[t] = labels[t + 1] inside each sequence;
    the last token of every sequence and unlabelled positions get -100."""
    targets = torch.roll(batch["labels"], -1)
    targets[batch["cu_seqlens"][1:].long() - 1] = -100
    return targets


def fit_context(sample, max_tokens, image_token_id):
    """Truncate a sample to the context length (Llama 3.2 Vision's per-token cross-attention mask
    with it), or None when the cut would drop an image token (the caller skips and counts it: half
    a Qwen image cannot go through the vision tower, a Llama image without its token has no reader)."""
    if len(sample["input_ids"]) <= max_tokens:
        return sample
    if image_token_id in sample["input_ids"][max_tokens:]:
        return None
    per_token = ("input_ids", "labels", "cross_attention_mask")
    return {**sample, **{key: sample[key][:max_tokens] for key in per_token if key in sample}}


def microbatch_loss(model, batch, device):
    """(sum of -log p over labelled tokens, number of labelled tokens) of one packed micro-batch."""
    targets = shifted_targets(batch).to(device)
    mask = targets != -100
    ids, cu = batch["input_ids"].to(device), batch["cu_seqlens"].to(device)
    logp = model.packed_logprobs(ids, cu, targets.clamp(min=0), **image_inputs(batch, device))
    return -(logp * mask).sum(), mask.sum()


def microbatches(records, indices, processor, max_tokens):
    """Encode the records at `indices` and pack them; also returns how many were too long."""
    encoded = [fit_context(processor.encode_conversation(records[i]["messages"], records[i]["images"]),
                           max_tokens, processor.image_token_id) for i in indices]
    kept = [e for e in encoded if e is not None]
    return data.pack(kept, max_tokens), len(encoded) - len(kept)


@torch.no_grad()
def eval_loss(model, records, processor, cfg, device):
    """Token-mean loss of the held-out records, over all ranks."""
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) \
        if torch.distributed.is_initialized() else (0, 1)
    batches, _ = microbatches(records, range(rank, len(records), world), processor, cfg.max_tokens)
    total = tokens = 0.0
    for batch, weight in aligned_passes(batches, filler=IDLE_BATCH):
        loss_sum, n = microbatch_loss(model, batch, device)
        total, tokens = total + weight * loss_sum.item(), tokens + weight * n.item()
    return float(all_reduce(total) / all_reduce(tokens).clamp(min=1))


def vision_modules(model):
    """What --train-vision trains: Qwen2.5-VL's vision tower with its merger, or Llama 3.2 Vision's
    vision model and projector (LLaMA-Factory's freeze_vision_tower and freeze_multi_modal_projector)."""
    if hasattr(model, "vision_model"):
        return [model.vision_model, model.multi_modal_projector]
    return [model.visual] if model.visual is not None else []


def load_model(cfg, device, mesh, compute):
    """(model, trained parameters, optimizer): the model sharded over `mesh` in training mode, its
    vision side (`vision_modules`) frozen unless --train-vision, and AdamW over what it trains."""
    model = M.load_sharded(cfg.model, device, param_dtype=compute, mesh=mesh,
                           activation_checkpointing=cfg.activation_checkpointing)
    for module in ([] if cfg.train_vision else vision_modules(model)):
        module.requires_grad_(False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, foreach=True)
    return model, params, optimizer


def train_step(model, optimizer, params, guard, batches, lr, cfg, device, world):
    """One optimizer step at learning rate `lr` over this rank's micro-batches of the global batch,
    as many passes on every rank (`aligned_passes`), skipped by `guard` when the loss or gradient is
    not finite. The loss is the global batch's token mean: each micro-batch's sum of -log p divided
    by the labelled tokens over all ranks (exact whatever the split). Returns (loss, grad_norm)."""
    global_tokens = all_reduce(sum(int((shifted_targets(b) != -100).sum()) for b in batches))
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = 0.0
    for batch, weight in aligned_passes(batches, filler=IDLE_BATCH):
        micro_loss, _ = microbatch_loss(model, batch, device)
        # FSDP averages gradients over ranks, so scale by world to get the global token mean
        (micro_loss * (weight * world / float(global_tokens))).backward()
        loss_sum += weight * micro_loss.item()
    loss = float(all_reduce(loss_sum) / global_tokens)
    grad_norm = float(full_value(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)))
    if guard.ok(loss, grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


@command_line
def main(argv=None):
    cfg = parse_config(SFTConfig, PRESETS, argv, description=__doc__)
    exit_if_missing(cfg.model, "--model", "checkpoint")
    if cfg.plan:
        data.refuse_mllama(cfg.model, "--plan (memplan.py)")
        return memplan.print_plan(cfg.model, cfg, lambda model, world: memplan.sft_phases(cfg, model, world))
    exit_if_missing(cfg.data, "--data", "file")
    rank, world, device, mesh, compute = start_run(cfg, "--out")

    # ---------------------------------------------------------------- data (checked before step 1)
    records = data.load_conversations(cfg.data, skip_bad=cfg.skip_bad)
    eval_records = records[len(records) - cfg.eval_holdout:] if cfg.eval_holdout else []
    records = records[:len(records) - cfg.eval_holdout] if cfg.eval_holdout else records
    processor = data.ChatProcessor(cfg.model, cfg.min_pixels or None, cfg.max_pixels or None)
    steps_per_epoch = len(records) // cfg.global_batch
    if steps_per_epoch == 0:
        raise InputError(f"{cfg.data}: {len(records)} training records are fewer than one --global-batch of "
                         f"{cfg.global_batch}")
    total_steps = math.ceil(cfg.epochs * steps_per_epoch)

    # ---------------------------------------------------------------- model, optimizer, logs
    model, params, optimizer = load_model(cfg, device, mesh, compute)
    start_step = resumed_step(cfg, model, optimizer)
    logger = Logger(cfg, rank, job_type="sft")
    if rank == 0:
        print(f"{len(records)} train / {len(eval_records)} held-out records, {total_steps} steps, world {world} "
              f"({sharding_of(model)}), start at step {start_step}", flush=True)
    guard = NonFiniteGuard(cfg.max_nonfinite)
    skipped_too_long = 0
    # Llama 3.2 Vision: its decoder's text config (the cross-attention layers counted as self-attention ones)
    flops_per_token = M.flops_per_token(getattr(model.cfg, "text", model.cfg), cfg.max_tokens / 2)
    if eval_records and start_step == 0:
        logger.log(0, {"eval_loss": eval_loss(model, eval_records, processor, cfg, device)})

    # ---------------------------------------------------------------- training loop
    timer, interval_tokens = Timer(), 0.0
    for step in range(start_step, total_steps):
        epoch, within = divmod(step, steps_per_epoch)
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        batch_indices = order[within * cfg.global_batch:(within + 1) * cfg.global_batch].tolist()
        batches, too_long = microbatches(records, batch_indices[rank::world], processor, cfg.max_tokens)
        skipped_too_long += int(all_reduce(too_long))
        lr = lr_at(step, total_steps, cfg.lr, cfg.warmup_ratio, cfg.schedule)
        loss, grad_norm = train_step(model, optimizer, params, guard, batches, lr, cfg, device, world)

        done = step + 1
        interval_tokens += float(all_reduce(sum(len(b["input_ids"]) for b in batches)))
        if done % cfg.log_every == 0 or done == total_steps:
            seconds, tokens, interval_tokens = timer.lap(), interval_tokens, 0.0
            metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "epoch": done / steps_per_epoch,
                       "tokens_per_s": tokens / seconds, "skipped_steps": guard.total,
                       "skipped_too_long": skipped_too_long,
                       "mfu": tokens * flops_per_token / seconds / world / (cfg.peak_tflops * 1e12),
                       "peak_mem_gib": peak_memory_gib(device)}
            if eval_records and cfg.eval_every and done % cfg.eval_every == 0:
                metrics["eval_loss"] = eval_loss(model, eval_records, processor, cfg, device)
            logger.log(done, metrics)
        if cfg.save_every and done % cfg.save_every == 0 and done < total_steps:
            save_checkpoint(cfg.out, done, model, optimizer, {"epoch": epoch}, cfg.keep_last)

    # ---------------------------------------------------------------- end
    if eval_records:
        logger.log(total_steps, {"eval_loss": eval_loss(model, eval_records, processor, cfg, device)})
    save_checkpoint(cfg.out, total_steps, model, optimizer, {"epoch": cfg.epochs}, cfg.keep_last, final=True)
    logger.finish()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
