"""What train_sft.py and train_grpo.py share: process group, logging, learning rate, checkpoints
of the training state (exact resume), and the guard against non-finite steps; and how every
script's command line ends on bad input (`command_line`)."""

import argparse
import datetime
import functools
import json
import math
import os
import random
import re
import resource
import shutil
import sys
import time
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist

# torch.distributed.tensor (DTensor, and the distributed checkpoint built on it) is imported where it is
# used, not here: it costs ~1.5 s a process on a slow CPU, which every script of an unsharded run and
# every data or evaluation command would pay for nothing.


# -----------------------------------------------------------------------------
# bad input: one message, no traceback

class InputError(Exception):
    """Input the user must fix (a data file, a checkpoint, a flag), not a bug: `command_line` ends
    the script with its message. data.DataError and model.CheckpointError are ones."""


def launch_rank():
    """This process's rank in the launch (torchrun's RANK; 0 alone), known before any process group."""
    return int(os.environ.get("RANK", "0"))


def command_line(main):
    """Decorates a script's `main(argv=None)`: the project's expected errors (InputError, and
    SystemExit with a message) end it as sys.exit(message) does, the message on stderr and exit
    code 1, said once under torchrun (rank 0; the other ranks exit 1 silently). argparse's usage
    errors keep their exit code 2, and any other exception (a bug) its traceback.
    Example: a bad line in --data -> "cold.jsonl:5: missing image: ..." and exit code 1."""
    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except InputError as e:
            message = str(e)
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                raise
            message = str(e.code)
        finally:
            leave_process_group_of_one()
        raise SystemExit(message if launch_rank() == 0 else 1) from None
    return run


def leave_process_group_of_one():
    """Destroy the process group a plain process made for itself (`init_distributed`), however its
    main ended: a later main in the same process (a notebook, a test) must make its own, with its own
    timeout, not find this one. Under torchrun the process ends with the job; a rank that failed must
    not wait here for the others."""
    if dist.is_initialized() and dist.get_world_size() == 1:
        dist.destroy_process_group()


def at_least(low, kind=int):
    """An argparse type: the flag's value as `kind`, refused below `low` as a usage error naming
    the flag. `type=at_least(1)` with `--n 0` -> "error: argument --n: 0 is not >= 1", exit code 2."""
    def parse(text):
        value = kind(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is not >= {low}")
        return value
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


def flag_of(field):
    """The command-line flag of a config field: "global_batch" -> "--global-batch"."""
    return "--" + field.replace("_", "-")


def refuse_bad_flags(cfg, positive=(), non_negative=(), world_multiples=()):
    """Raise ValueError naming the flag (parse_config makes it a usage error) of the first field of
    a trainer's config that is not > 0 (`positive`), is < 0 (`non_negative`) or is not a multiple
    of the launch's world size (`world_multiples`), or a replicate_degree that does not divide it.
    Example: global_batch 0 in `positive` -> "--global-batch 0: must be > 0"."""
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise ValueError(f"{flag_of(name)} {getattr(cfg, name)}: must be > 0")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ValueError(f"{flag_of(name)} {getattr(cfg, name)}: must be >= 0")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for name in world_multiples:
        if getattr(cfg, name) % world:
            raise ValueError(f"{flag_of(name)} {getattr(cfg, name)}: must be a multiple of the world size {world}")
    if world % cfg.replicate_degree:
        raise ValueError(f"--replicate-degree {cfg.replicate_degree}: must divide the world size {world}")


# -----------------------------------------------------------------------------
# config from the command line

def parse_config(config_cls, presets, argv=None, description=None):
    """argparse over a dataclass: every field becomes a `--flag` (bools take true/false); a preset
    fills in its values first and explicit flags win. Returns the filled dataclass. `--help` lists
    the fields under their section comments, each with its comment (`field_comments`), its default
    (the paper's run) and the value of every preset that changes it. Values the config refuses (a
    ValueError from its __post_init__) are a usage error: one line, exit code 2, said by rank 0."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(presets), default=next(iter(presets)),
                        help="a named set of values applied before the flags (default: %(default)s)")
    sections, comments = field_comments(config_cls)
    group = parser
    for f in fields(config_cls):
        if f.name in sections:
            group = parser.add_argument_group(sections[f.name])
        kind = type(f.default) if f.default is not None else str
        changed = "".join(f"; {name}: {preset[f.name]!r}" for name, preset in presets.items() if f.name in preset)
        text = f"{comments.get(f.name, '')} (default: {f.default!r}{changed})".lstrip().replace("%", "%%")
        if kind is bool:
            group.add_argument(flag_of(f.name), type=lambda v: v.lower() in ("1", "true", "yes"),
                               nargs="?", const=True, default=None, metavar="BOOL", help=text)
        else:
            group.add_argument(flag_of(f.name), type=kind, default=None, metavar=kind.__name__.upper(),
                               help=text)
    args = vars(parser.parse_args(argv))
    values = {**presets[args.pop("preset")], **{k: v for k, v in args.items() if v is not None}}
    try:
        return config_cls(**values)
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n" if launch_rank() == 0 else None)


def field_comments(config_cls):
    """The comments of a config dataclass's source, as ({first field: section title}, {field: help}):
    a comment line at field indentation titles the fields below it; the comment after a field, with
    the comment-only lines aligned under it, is that field's help. Example: for
        # optimisation
        lr: float = 5e-6    # peak learning rate
                            # (cosine decay)
    -> ({"lr": "optimisation"}, {"lr": "peak learning rate (cosine decay)"})."""
    import inspect
    import tokenize
    sections, comments, title, field, field_indent = {}, {}, None, None, None
    lines = inspect.getsource(config_cls).splitlines(keepends=True)
    for tok in tokenize.generate_tokens(iter(lines).__next__):
        text = tok.string.lstrip("#").strip()
        starts_line = tok.line[:tok.start[1]].strip() == ""
        if tok.type == tokenize.NAME and starts_line and tok.string == "def" and field is not None:
            break  # the fields end where the methods begin
        if tok.type == tokenize.NAME and starts_line and tok.line[tok.end[1]:].lstrip().startswith(":"):
            field, field_indent = tok.string, tok.start[1]
            if title:
                sections[field], title = title, None
        elif tok.type == tokenize.COMMENT and not starts_line:  # after a field, on its line
            comments[field] = text
        elif tok.type == tokenize.COMMENT and field_indent is not None and tok.start[1] > field_indent and field in comments:
            comments[field] += " " + text  # a continuation, aligned under the field's comment
        elif tok.type == tokenize.COMMENT:
            title = text
    return sections, comments


def exit_if_missing(path, flag, kind):
    """Stop before any work when an input is not there, with one line naming the flag and the
    path; under torchrun only rank 0 prints it (8 ranks, one line). `kind` is "checkpoint" (a
    Hugging Face folder with config.json) or "file". Example: exit_if_missing("vision_r1_rl.parquet",
    "--data", "file") -> "--data vision_r1_rl.parquet: no such file"."""
    found = os.path.isfile(os.path.join(path, "config.json")) if kind == "checkpoint" else os.path.exists(path)
    if not found:
        what = "no checkpoint (config.json) in that folder" if kind == "checkpoint" else "no such file"
        sys.exit(f"{flag} {path}: {what}" if launch_rank() == 0 else 1)


# -----------------------------------------------------------------------------
# processes

def init_distributed(timeout_minutes=120):
    """(rank, world_size, device) under torchrun, or (0, 1, device) in a plain process, which gets a
    process group of its own: the model is FSDP2-wrapped at every world size, so one GPU runs the
    same precision policy as many (model.apply_fsdp).

    The group is `process_group_backend(device)`: gloo on CPU; on CUDA, NCCL for CUDA tensors (FSDP's
    collectives) and gloo for CPU ones (`all_reduce`'s numbers, barriers, the checkpoint's metadata),
    because NCCL serves CUDA tensors only. `timeout_minutes`: how long a collective waits for a late
    rank before the job aborts. Generation has no collectives, so ranks finish their rollouts (and
    evaluation shards) minutes apart and meet at the next one; NCCL's default of 10 minutes would
    abort a long one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        alone = {} if "MASTER_ADDR" in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group(process_group_backend(device), timeout=datetime.timedelta(minutes=timeout_minutes),
                                **alone)
    return dist.get_rank(), world, device


def start_run(cfg, out_flag):
    """What a trainer does once its inputs are found: refuse a run folder that holds a run unless
    --resume (`check_run_folder`, on every rank before any rank writes), join the process group
    (`init_distributed`), build the mesh FSDP shards over (`data_parallel_mesh`), choose the attention
    kernels and the compute dtype and say which (rank 0; `cfg.attention` becomes the backend in use, so
    config.json and wandb record it), create the run folder, seed every generator. Nothing is written
    into the folder until the Logger starts, after the data and checkpoints have been read.
    Returns (rank, world, device, mesh, compute dtype)."""
    import model as M
    check_run_folder(cfg.out, cfg.resume, out_flag)
    rank, world, device = init_distributed(cfg.dist_timeout_minutes)
    if world > 1:
        dist.barrier()  # every rank has looked at the folder before rank 0 writes into it
    mesh = data_parallel_mesh(world, cfg.replicate_degree, device)
    cfg.attention = M.set_attention(cfg.attention, device)
    compute = M.compute_dtype(cfg.param_dtype)
    os.makedirs(cfg.out, exist_ok=True)
    if rank == 0:
        print(f"world {world} on {device.type}, attention {cfg.attention}, compute {cfg.param_dtype}", flush=True)
    seed_everything(cfg.seed)
    return rank, world, device, mesh, compute


def check_run_folder(path, resume, out_flag):
    """One rule for every script that writes a run (trainers, evaluate.py, make_cold_data.py build):
    a folder that holds files, or an output file that is not empty, is another run's, and only
    --resume may write into it (to continue that run). Raises InputError naming it. Example:
    runs/toy/ci holding final/ -> "runs/toy/ci holds a run already: --resume continues it, another
    --out starts a new one"."""
    taken = os.listdir(path) if os.path.isdir(path) else os.path.isfile(path) and os.path.getsize(path) > 0
    if taken and not resume:
        raise InputError(f"{path} holds a run already: --resume continues it, another {out_flag} starts a new one")


def git_state():
    """(commit, uncommitted diff) of the checkout this code runs from: the commit's hash, or None
    outside a git checkout; the diff of tracked files against it ("" when clean)."""
    import subprocess
    root = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        diff = subprocess.run(["git", "diff", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None, ""
    return commit.stdout.strip(), diff.stdout


def write_run_config(cfg):
    """<out>/config.json: the resolved config (presets and defaults applied, paths filled in), the
    git commit the run was made with and torch's CPU threads (float sums split over another number
    of threads round otherwise, so a CPU run's numbers depend on them); with uncommitted changes to
    tracked files (a fork's ablation diff) also <out>/uncommitted.diff. A resumed run keeps the config.json its first start wrote."""
    path = os.path.join(cfg.out, "config.json")
    if cfg.resume and os.path.exists(path):
        return
    commit, diff = git_state()
    with open(path, "w") as f:
        json.dump({"git_commit": commit, "uncommitted_changes": bool(diff), "torch_threads": torch.get_num_threads(),
                   "config": asdict(cfg)}, f, indent=2)
    if diff:
        with open(os.path.join(cfg.out, "uncommitted.diff"), "w") as f:
            f.write(diff)


def resumed_step(cfg, model, optimizer):
    """The step a trainer starts at: under --resume, that of the latest training state in its run
    folder (loaded into `model` and `optimizer`; 0 when there is none yet), else 0."""
    progress = load_training_state(cfg.out, model, optimizer) if cfg.resume else None
    return progress["step"] if progress else 0


def process_group_backend(device):
    """The backend of each device type's collectives: "gloo" on CPU; "cpu:gloo,cuda:nccl" on CUDA,
    so that a collective on a CPU tensor (which NCCL refuses) runs on gloo instead of failing."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def data_parallel_mesh(world, replicate_degree, device):
    """The mesh FSDP shards over: None (every rank, FSDP's default) for `replicate_degree` 1; else
    HSDP's 2-D mesh ("replicate", "shard") of shape (replicate_degree, world // replicate_degree),
    as torchtitan builds it: each model is sharded within a group of world // replicate_degree ranks,
    so the per-layer all-gathers and reduce-scatters stay inside it, and replicated across the
    groups, which all-reduce the gradients once per backward. torchrun numbers ranks node by node,
    so with replicate_degree = nodes each shard group is one node. Example: 2 nodes x 8 GPUs,
    replicate_degree 2 -> shard groups {0..7} and {8..15}; rank 3's replica is rank 11.
    Gradients are still averaged over all world ranks (the loss scaling of `apply_fsdp` holds)."""
    if replicate_degree < 1 or world % replicate_degree:
        raise ValueError(f"replicate_degree {replicate_degree} does not divide the world size {world}")
    if replicate_degree == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device.type, (replicate_degree, world // replicate_degree),
                            mesh_dim_names=("replicate", "shard"))


def sharding_of(model):
    """How FSDP laid out the model's parameters, read from the parameters themselves: "unsharded",
    "FSDP over 8 ranks" or "HSDP: 2 replicas x 8 shards"."""
    param = next(model.parameters())
    if not is_dtensor(param):
        return "unsharded"
    mesh = param.device_mesh
    if mesh.ndim == 1:
        return f"FSDP over {mesh.size()} ranks"
    return f"HSDP: {mesh.size(0)} replicas x {mesh.size(1)} shards"


def all_reduce(value, op=dist.ReduceOp.SUM):
    """Sum (or max) of a number or tensor over ranks, as a CPU float64 tensor (reduced by gloo, see
    `init_distributed`); identity on one process."""
    tensor = torch.as_tensor(value, dtype=torch.float64, device="cpu").clone()
    if dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor


def ranks_max(count):
    """The largest count over ranks."""
    return int(all_reduce(count, dist.ReduceOp.MAX))


def aligned_passes(items, filler=None):
    """Yield (item, weight) the same number of times on every rank: this rank's items with weight
    1.0, then `filler` (by default its first item again) with weight 0.0 until it has made as many
    passes as the rank with the most items. The caller multiplies what a pass contributes (loss,
    gradient, counts) by its weight and discards a zero-weight pass's outputs.

    Why: under FSDP every forward all-gathers each layer's weights together with the other ranks
    (and every backward reduce-scatters its gradients), so ranks must run the same passes in the
    same order; a rank with fewer micro-batches would otherwise leave the others waiting, or pair
    their all-gathers with the wrong layer's. A rank that may hold no items passes a `filler`.
    Example: rank 0 holds [a], rank 1 holds [x, y, z] -> rank 0 yields (a, 1.), (a, 0.), (a, 0.);
    rank 1 yields (x, 1.), (y, 1.), (z, 1.).
    """
    for k in range(ranks_max(len(items))):
        yield (items[k], 1.0) if k < len(items) else (items[0] if items else filler, 0.0)


def packed_inputs(batch, device):
    """(input_ids, cu_seqlens, pixel_values, image_grid_thw) of a `data.pack` batch on `device`."""
    return tuple(None if batch[k] is None else batch[k].to(device)
                 for k in ("input_ids", "cu_seqlens", "pixel_values", "image_grid_thw"))


IMAGE_INPUTS = ("pixel_values", "image_grid_thw",  # Qwen2.5-VL
                "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask", "image_counts")  # Llama 3.2 Vision


def image_inputs(batch, device):
    """The image keywords of a `data.pack` batch for its model's packed_logprobs, tensors on
    `device`: Qwen2.5-VL's pixel_values and image_grid_thw, or Llama 3.2 Vision's tiles
    (data.concat_tiles); {} for a batch without images."""
    return {key: batch[key].to(device) if torch.is_tensor(batch[key]) else batch[key]
            for key in IMAGE_INPUTS if batch.get(key) is not None}


def is_dtensor(tensor):
    """Is `tensor` a DTensor (an FSDP2 shard)? None can exist before torch.distributed.tensor is
    imported, so this does not import it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def full_value(tensor):
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# -----------------------------------------------------------------------------
# logging

class Logger:
    """The run's records, on rank 0: config.json (`write_run_config`) when it starts, then one line
    per log step in metrics.jsonl and on stdout, and the same numbers to wandb. wandb runs offline
    unless WANDB_MODE says otherwise, so nothing reaches the network by default."""

    def __init__(self, cfg, rank, job_type):
        self.rank, self.run = rank, None
        if rank == 0:
            write_run_config(cfg)
        if rank == 0 and os.environ.get("WANDB_MODE", "offline") != "disabled":
            import wandb
            self.run = wandb.init(project=cfg.wandb_project, group=cfg.wandb_group or None, name=cfg.run_name or None,
                                  job_type=job_type, config={**asdict(cfg), "torch_threads": torch.get_num_threads()},
                                  dir=cfg.out, mode=os.environ.get("WANDB_MODE", "offline"))
        self.history = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if rank == 0 else None

    def log(self, step, metrics, echo=True):
        if self.rank != 0:
            return
        metrics = {k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}
        self.history.write(json.dumps({"step": step, **metrics}) + "\n")
        self.history.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)
        if echo:
            print(f"step {step:5d} | " + " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in metrics.items()), flush=True)

    def table(self, step, name, columns, rows):
        if self.run is not None:
            import wandb
            self.run.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def finish(self):
        if self.run is not None:
            self.run.finish()
        if self.history is not None:
            self.history.close()


# -----------------------------------------------------------------------------
# learning rate

def lr_at(step, total_steps, peak_lr, warmup_ratio=0.0, schedule="cosine", min_ratio=0.0):
    """Linear warmup over `warmup_ratio * total_steps`, then cosine decay to `min_ratio * peak_lr`
    (or constant). Example: total 100, warmup 0.05 -> steps 0..4 ramp 0.2..1.0 x peak, step 100 -> min."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    if schedule == "constant":
        return peak_lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# -----------------------------------------------------------------------------
# training state: model + optimizer shards (torch.distributed.checkpoint) + step, data position, RNG

def _rng_state():
    """Every generator's state as tensors and ints, so it loads with weights_only=True."""
    _, keys, pos, _, _ = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": torch.tensor(keys.astype(np.int64)), "numpy_pos": int(pos),
            "python": torch.tensor(random.getstate()[1])}


def _set_rng_state(rng):
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), rng["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(rng["python"].tolist()), None))


def save_checkpoint(out, step, model, optimizer, extra, keep_last, final=False):
    """Everything a save point writes: the weights in Hugging Face format (out/step_N, or out/final),
    the training state --resume continues from (`save_training_state`), then the step checkpoints
    beyond the newest `keep_last` pruned (`prune_checkpoints`). Under FSDP2 every rank calls it."""
    import model as M
    M.save_model(model, os.path.join(out, "final" if final else f"step_{step}"))
    save_training_state(out, step, model, optimizer, extra)
    prune_checkpoints(out, keep_last)


def save_training_state(out, step, model, optimizer, progress):
    """Write <out>/state/step_<N> atomically (a temp folder renamed at the end) and point
    <out>/state/latest at it. `progress` is a small JSON-able dict (data position etc.)."""
    root = os.path.join(out, "state")
    final, tmp = os.path.join(root, f"step_{step}"), os.path.join(root, f"tmp_step_{step}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if dist.is_initialized():
        dist.barrier()
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        with open(os.path.join(tmp, "progress.json"), "w") as f:
            json.dump({"step": step, **progress}, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(f"step_{step}")
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
    if dist.is_initialized():
        dist.barrier()


def prune_checkpoints(out, keep_last):
    """Delete all but the newest `keep_last` step checkpoints, both the weights (<out>/step_N) and
    the training states (<out>/state/step_N); 0 keeps them all. `final` and the state that
    <out>/state/latest points to always stay. Rank 0 deletes; call it after a save has finished.
    Example: step_1..step_3 and state/step_1..state/step_4 (latest), keep_last 2 -> step_2, step_3,
    state/step_3, state/step_4. (A 7B step checkpoint with its training state is ~125 GB.)"""
    if keep_last < 1 or (dist.get_rank() if dist.is_initialized() else 0) != 0:
        return
    state = os.path.join(out, "state")
    latest = None
    if os.path.exists(os.path.join(state, "latest")):
        with open(os.path.join(state, "latest")) as f:
            latest = f.read().strip()
    for folder, kept in ((out, None), (state, latest)):
        steps = sorted(int(m.group(1)) for name in (os.listdir(folder) if os.path.isdir(folder) else [])
                       if (m := re.fullmatch(r"step_(\d+)", name)))
        for name in [f"step_{step}" for step in steps[:-keep_last]]:
            if name != kept:
                shutil.rmtree(os.path.join(folder, name))


def load_training_state(out, model, optimizer):
    """Restore the newest complete state under <out>/state; returns its progress dict (with
    `step`), or None when there is none."""
    root = os.path.join(out, "state")
    if not os.path.exists(os.path.join(root, "latest")):
        return None
    with open(os.path.join(root, "latest")) as f:
        path = os.path.join(root, f.read().strip())
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    _set_rng_state(torch.load(os.path.join(path, f"rng_rank{rank}.pt"), weights_only=True))
    with open(os.path.join(path, "progress.json")) as f:
        return json.load(f)


# -----------------------------------------------------------------------------
# non-finite steps

class NonFiniteGuard:
    """A non-finite loss or gradient norm skips the step; `limit` of them in a row stop the run
    before anything corrupt is written."""

    def __init__(self, limit):
        self.limit, self.in_a_row, self.total = limit, 0, 0

    def ok(self, *values):
        if all(math.isfinite(float(v)) for v in values):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.limit:
            raise FloatingPointError(f"{self.in_a_row} steps in a row had a non-finite loss or gradient; "
                                     "stopping without saving (last good checkpoint is intact)")
        return False


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def lap(self):
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed
