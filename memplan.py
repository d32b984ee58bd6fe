"""The memory plan: the bytes one GPU holds in each phase of a training step, from the sizes the code
allocates, for a checkpoint's config.json alone (no weights, data, tokenizer or process group).

    python train_grpo.py --stage 1 --plan --init configs/Qwen2.5-VL-7B-Instruct --world-size 8 --gpu-memory-gib 80
    python train_sft.py --plan --model configs/Qwen2.5-VL-7B-Instruct --world-size 8 --gpu-memory-gib 80

Phases, each the most that is held at once while it runs:
  resident   between steps: fp32 parameter shards, AdamW's two fp32 states of the trainable ones,
             GRPO's frozen reference in the compute dtype (none on the GPU with ref_cpu_offload).
             Gradients do not outlive a step (zero_grad(set_to_none=True)): they count in the update.
  rollout    resident + every weight gathered in the compute dtype (generate gathers the whole model
             once: model.gathered_params) + the KV slot pool (generate.new_slot_pool) + the larger of
             a prefill's and a decode step's working set
  update     resident + fp32 gradient shards + the largest moment of one packed micro-batch's forward
             and backward (`update_moments`)
  optimizer  resident + gradient shards + foreach AdamW's temporary (the second moment's square root)
The old and reference log-prob passes run the update's forward without gradients, below it.
Not counted: the CUDA context and NCCL's buffers (1-2 GiB), the caching allocator's fragmentation.

Read top to bottom: the parameters as FSDP2 units, the byte counts of each piece (one small function
each, the code they follow named), the phases, the table.
"""

import math
import os
from dataclasses import dataclass

import generate as gen
import model as M

GIB = 2**30
FP32 = 4
PROMPT_TEXT_TOKENS = 512  # a GRPO prompt's tokens besides its image (template, system turn, question): an allowance
PIXELS_PER_TOKEN = 28 * 28  # patch 14 x 14, merged 2 x 2: one image token per 28 x 28 pixels


# -----------------------------------------------------------------------------
# 1. parameters, as FSDP2 holds them

def shard_elements(shape, shards):
    """Elements of one rank's FSDP2 shard of a parameter: dim 0 cut in `shards` chunks of
    ceil(rows / shards) rows, each allocated at that size (the last one padded).
    Example: [10, 4] over 4 ranks -> 3 rows x 4 = 12."""
    return -(-shape[0] // shards) * math.prod(shape[1:])


@dataclass
class Parameters:
    """Element counts of a model's parameters as model.apply_fsdp wraps them: one FSDP unit per decoder
    layer and per vision block, the rest in the root (embedding, head, final norm, the vision tower's
    patch embedding and merger). Trainable: all but the vision tower (both trainers freeze it)."""

    total: int
    trainable: int
    root: int
    root_trainable: int
    layer: int  # one decoder layer
    vision_block: int
    shard: int  # one rank's shards of every parameter
    trainable_shard: int
    root_trainable_shard: int
    head: int  # vocab x hidden: the logits' weight (the embedding when tied)


def count_parameters(model, shards):
    """`Parameters` of a model built on the meta device (model.build_model), sharded over `shards` ranks."""
    named = dict(model.named_parameters())
    unit_names = {name for prefix in ("model.layers.", "visual.blocks.") for name in named if name.startswith(prefix)}
    root = [name for name in named if name not in unit_names]
    trainable = [name for name in named if not name.startswith("visual.")]
    root_trainable = [name for name in root if not name.startswith("visual.")]
    elements = lambda names: sum(named[n].numel() for n in names)  # noqa: E731
    shard = lambda names: sum(shard_elements(named[n].shape, shards) for n in names)  # noqa: E731
    vision_blocks = model.visual.blocks if model.visual is not None else []
    return Parameters(total=elements(named), trainable=elements(trainable), root=elements(root),
                      root_trainable=elements(root_trainable),
                      layer=sum(p.numel() for p in model.model.layers[0].parameters()),
                      vision_block=sum(p.numel() for p in vision_blocks[0].parameters()) if vision_blocks else 0,
                      shard=shard(named), trainable_shard=shard(trainable), root_trainable_shard=shard(root_trainable),
                      head=model.cfg.vocab_size * model.cfg.hidden_size)


# -----------------------------------------------------------------------------
# 2. activations of one packed micro-batch (model.py, compute dtype of `a` bytes, flash-attn's kernels)

def layer_saved_bytes(cfg, tokens, keys, a):
    """Bytes one DecoderLayer saves for backward over `tokens` packed tokens, its input not counted
    (the checkpoint, or the previous layer, holds it); `keys` rows of keys and values reach attention
    (`tokens`, or more when each response also reads its shared prompt: model.shared_prefix_keys).
      2 RMSNorms  an fp32 copy of the input (none in fp32: the input itself), the normalised input,
                  and an fp32 rsqrt per token
      q           the projection, rotate_half's copy and the rotated q that flash-attn keeps
      k, v        k's projection and rotate_half copy; the keys and values flash-attn keeps
      attention   the output and flash-attn's fp32 log-sum-exp per query head
      MLP         gate, silu(gate), up and their product
    Example: 1 token, 1 key, hidden 4, 2 heads of 2 (one kv head), intermediate 8, a = 2 bytes:
    norms 2 x (4 x 6 + 4) + q 24 + k 8 + 4 + v 4 + attention 8 + 8 + MLP 64 = 176."""
    H, I, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    fp32_copy = FP32 if a < FP32 else 0
    norm1 = tokens * H * (fp32_copy + a) + FP32 * tokens
    norm2 = tokens * H * (FP32 + a) + FP32 * tokens  # its fp32 input: a copy, or the residual sum itself
    q = 3 * a * tokens * H
    k = 2 * a * tokens * kv + a * keys * kv
    v = a * keys * kv
    attention = a * tokens * H + FP32 * cfg.num_attention_heads * tokens
    mlp = 4 * a * tokens * I
    return norm1 + norm2 + q + k + v + attention + mlp


def stored_activation_bytes(cfg, tokens, keys, a, checkpointing):
    """Bytes the decoder holds from the end of its forward until its backward reaches them: with
    activation checkpointing each layer's input (torch.utils.checkpoint), without it every layer's
    `layer_saved_bytes` (plus its input in fp32, which the norm keeps as its fp32 copy); and the
    cos/sin tables every layer reads. Example (layer_saved_bytes' sizes, 3 layers, head_dim 2,
    checkpointing): 3 x 1 x 4 x 2 + 2 x 2 x 2 = 32."""
    if checkpointing:
        per_layer = a * tokens * cfg.hidden_size
    else:
        per_layer = layer_saved_bytes(cfg, tokens, keys, a) + (a * tokens * cfg.hidden_size if a == FP32 else 0)
    return cfg.num_hidden_layers * per_layer + 2 * a * tokens * cfg.head_dim


def head_bytes(rows, vocab, hidden, a, with_entropy=False, backward=False, chunk=None):
    """Bytes model.token_logprobs holds at its peak over `rows` rows, beyond its saved input. It works
    on [chunk, vocab] blocks (chunk: model.head_chunk(hidden) unless given) in one fp32 buffer that
    every block rewrites; in bf16 each block's logits are first a bf16 product:
      forward   the buffer, exp(z - max) made in it; with entropy that exponential is a second buffer
      backward  the buffer and, in bf16, the block's bf16 gradient, kept while the next block's
                product is made; also the fp32 gradient of the weight and, in bf16, after each block
                its [vocab, hidden] product (fp32 accumulates in place; no trainer sends a gradient
                through the entropy, which is only logged)
    Example: 3000 rows, vocab 10, hidden 4, bf16, chunk 1024: forward 1024 x 10 x (4 + 2) = 61,440,
    with entropy 1024 x 10 x (8 + 2) = 102,400; backward 160 + 1024 x 10 x (4 + 2 + 2) = 82,080."""
    chunk = chunk or M.head_chunk(hidden)
    first, second = min(rows, chunk), min(max(rows - chunk, 0), chunk)
    product = a if a < FP32 else 0  # a block's logits in the compute dtype before the fp32 copy
    if not backward:
        return vocab * first * (FP32 * (2 if with_entropy else 1) + product)
    weight_grad = FP32 * vocab * hidden
    return weight_grad + vocab * (FP32 + product) * first + max(vocab * product * second, product * vocab * hidden)


def pixel_bytes(vision, patches):
    """The fp32 pixel values of `patches` patches on the device (the image processor's flattened
    patches, 3 x 2 x 14 x 14 each): a micro-batch's are held through its forward and backward
    (train_utils.packed_inputs), a prefill's through the prefill. Example: 2 patches -> 9408."""
    return FP32 * patches * vision.in_channels * vision.temporal_patch_size * vision.patch_size**2


def vision_forward_bytes(vision, patches, a):
    """Bytes the vision tower's forward (no gradient: it is frozen) holds at its peak over `patches`
    patches beyond their pixels: the fp32 cos/sin tables and the larger of one block's two peaks, in
    its attention (block input, normalised input, qkv, rotated q and k, four fp32 temporaries of rope
    over q or k) or in its MLP (block input, residual, normalised input, silu(gate), up and their
    product). Example: hidden 4, intermediate 8, 2 heads, 1 patch, a = 2 ->
    cos/sin 16 + max(attention 4 x (6 x 2 + 16), MLP 3 x 2 x (4 + 8)) = 128."""
    cos_sin = 2 * FP32 * patches * vision.hidden_size // vision.num_heads
    attention = patches * vision.hidden_size * (6 * a + 4 * FP32)
    mlp = 3 * a * patches * (vision.hidden_size + vision.intermediate_size)
    return cos_sin + max(attention, mlp)


# -----------------------------------------------------------------------------
# 3. the phases

def resident_bytes(params, reference_bytes):
    """What stays on a GPU between steps: fp32 parameter shards (the optimizer's masters), AdamW's
    exp_avg and exp_avg_sq of the trainable ones (fp32), and the reference's shards
    (`reference_bytes` per element: the compute dtype, 0 without a reference or with ref_cpu_offload).
    Example: 10 elements per shard, 8 trainable, a bf16 reference -> 40 + 64 + 20 = 124."""
    return {"parameter shards": FP32 * params.shard, "AdamW states": 2 * FP32 * params.trainable_shard,
            "reference shards": reference_bytes * params.shard}


def kv_pool_bytes(cfg, slots, slot_len, max_new_tokens, dtype):
    """generate.new_slot_pool: the cache of `slots` slots of `slot_len` positions (kv_bytes_per_token
    each, in the compute `dtype`) and every slot's sampled tokens (int64) and log-probs (fp32).
    Example: 7B in bf16, 2 slots of 10 positions, 4 new tokens -> 2 x 10 x 57,344 + 2 x 4 x 12 = 1,146,976."""
    return slots * slot_len * gen.kv_bytes_per_token(cfg, dtype) + slots * max_new_tokens * (8 + FP32)


def sampling_bytes(rows, vocab, a):
    """A decode step's sampler over `rows` rows of logits (generate.draw): the logits in the compute
    dtype, then in fp32 the log-softmax, the copy without the banned ids and its exp, and the running
    sum of that in float64 (two fp32's bytes). Example: 2 rows, vocab 10, bf16 -> 2 x 10 x (2 + 20) = 440."""
    return rows * vocab * (a + 5 * FP32)


def layer_forward_bytes(cfg, tokens, a):
    """What a DecoderLayer's forward holds beyond its input when nothing is saved for backward (a
    prefill, or a checkpointed layer): at the MLP, the residual and the normalised input, then
    silu(gate), up and their product. Example: layer_saved_bytes' sizes, 10 tokens, bf16 ->
    2 x 10 x (2 x 4 + 3 x 8) = 640."""
    return a * tokens * (2 * cfg.hidden_size + 3 * cfg.intermediate_size)


def prefill_bytes(cfg, tokens, a):
    """The decoder's working set in a prefill over `tokens` packed prompt tokens (generate.prefill):
    a layer's input and forward (`layer_forward_bytes`), and the cos/sin tables. Example:
    layer_saved_bytes' sizes, 10 tokens, bf16 -> 80 + 640 + 80 = 800."""
    return a * tokens * cfg.hidden_size + layer_forward_bytes(cfg, tokens, a) + 2 * a * tokens * cfg.head_dim


@dataclass
class MicroBatch:
    """One packed forward/backward: `tokens` packed, `keys` rows of keys per layer, `head_tokens`
    scored by the head, `patches` of images through the vision tower."""

    tokens: int
    keys: int
    head_tokens: int
    patches: int
    with_entropy: bool


def update_moments(cfg, params, batch, a, wrapped, checkpointing):
    """Bytes beyond the resident state and the gradient shards at each moment of one micro-batch's
    forward and backward that may hold the most (the phase is their maximum). Under FSDP2 (`wrapped`)
    the root unit stays gathered from forward to backward, a layer is gathered with the next one
    prefetched, its gradients come in the compute dtype and are reduce-scattered from an fp32 copy that
    stays alive until the next unit's (FSDPParamGroup.post_backward); the head's gradient waits in the
    compute dtype for the root's reduce-scatter at the very end.
      vision tower      the frozen tower's forward over the micro-batch's images
      layer forward     all layer inputs and, with checkpointing, the last layer's forward
      head forward      + the final norm's and the head's inputs, and the head's forward
      head backward     the same with the head's backward
      last layer bwd    all layer inputs, the last layer's recomputed activations (checkpointing), the
                        gradient of its output and two [tokens, intermediate] gradients of its MLP
      root reduce       the root's gradients (embedding, head) and their fp32 reduce-scatter copy"""
    T, R, V, H = batch.tokens, batch.head_tokens, cfg.vocab_size, cfg.hidden_size
    pixels = pixel_bytes(cfg.vision, batch.patches) if batch.patches else 0
    root = pixels + (a * params.root if wrapped else 0)  # the micro-batch's pixels; the root unit, gathered
    layer = a * params.layer if wrapped else 0  # one decoder layer gathered, or its gradients
    reduce_copy = FP32 * params.layer if wrapped else 0  # the previous layer's fp32 reduce-scatter input
    head_grad = a * params.head if wrapped else 0  # the head's gradient until the root's reduce-scatter
    stored = stored_activation_bytes(cfg, T, batch.keys, a, checkpointing)
    head_inputs = T * H * (FP32 + a) + a * R * H + 2 * FP32 * R  # the final norm's; the head's rows, lse, entropy
    recompute = layer_saved_bytes(cfg, T, batch.keys, a) if checkpointing else 0
    moments = {
        "layer forward": root + 2 * layer + stored + (layer_forward_bytes(cfg, T, a) if checkpointing else 0),
        "head forward": root + stored + head_inputs + head_bytes(R, V, H, a, batch.with_entropy),
        "head backward": root + layer + stored + head_inputs + a * R * H + head_bytes(R, V, H, a, backward=True),
        "last layer backward": root + head_grad + 3 * layer + reduce_copy + stored + recompute
                               + a * T * H + 2 * a * T * cfg.intermediate_size,
        "root reduce": (a + FP32) * params.root_trainable + FP32 * params.root_trainable_shard if wrapped
                       else FP32 * V * H,
    }
    if batch.patches:
        moments["vision tower"] = root + a * params.vision_block + vision_forward_bytes(cfg.vision, batch.patches, a)
    return moments


@dataclass
class Phase:
    name: str
    parts: dict  # what it holds: name -> bytes
    problem: str = ""  # why it cannot run at all (a KV budget that holds no sample)

    @property
    def total(self):
        return sum(self.parts.values())


def training_phases(resident, params, batch, cfg, a, wrapped, checkpointing):
    """The update and optimizer phases, shared by both trainers: resident + fp32 gradient shards + the
    update's largest moment, or + foreach AdamW's fp32 temporary (torch.optim.adamw's _foreach_sqrt)."""
    grads = FP32 * params.trainable_shard
    moments = update_moments(cfg, params, batch, a, wrapped, checkpointing)
    peak = max(moments, key=moments.get)
    return [Phase("update", {"resident": resident, "gradient shards": grads, peak: moments[peak]}),
            Phase("optimizer", {"resident": resident, "gradient shards": grads, "AdamW temporary": grads})]


# -----------------------------------------------------------------------------
# 4. the trainers' steps

def shard_group(world, replicate_degree):
    """Ranks a model is sharded over: the world, or one HSDP replica (train_utils.data_parallel_mesh)."""
    if replicate_degree < 1 or world % replicate_degree:
        raise SystemExit(f"replicate_degree {replicate_degree} does not divide the world size {world}")
    return world // replicate_degree


def is_wrapped(world, a):
    """model.load_sharded gives one process with nothing to cast (fp32 compute) the plain model."""
    return world > 1 or a < FP32


def image_tokens(model, max_pixels):
    """Tokens of an image at `max_pixels` (data.load_image's smart resize keeps the area within it);
    0 for a text model."""
    return max_pixels // PIXELS_PER_TOKEN if model.visual is not None else 0


def grpo_phases(cfg, stage, model, world):
    """(description lines, phases) of a GRPO step (train_grpo.main) at `world` ranks: prompts with one
    image at max_pixels and PROMPT_TEXT_TOKENS of text, every response at the stage's length cap (the
    longest rollout and micro-batches; short responses pack more prompts per micro-batch, whose keys
    each response reads again). A KV budget of 0 takes half of what the resident state leaves of the
    GPU (generate.kv_budget_tokens reads the free memory before the rollout)."""
    compute, shards = M.compute_dtype(cfg.param_dtype), shard_group(world, cfg.replicate_degree)
    params, mcfg, a = count_parameters(model, shards), model.cfg, compute.itemsize
    wrapped = is_wrapped(world, a)
    G, L = stage.group_size, stage.max_tokens
    image = image_tokens(model, cfg.max_pixels)
    prompt = image + PROMPT_TEXT_TOKENS
    patches = image * mcfg.vision.spatial_merge_size**2 if image else 0
    prompts = -(-cfg.prompts_per_rollout // world)

    reference = 0 if not cfg.kl_coef or cfg.ref_cpu_offload else a
    parts = resident_bytes(params, reference)
    resident = sum(parts.values())
    phases = [Phase("resident", parts)]

    per_token = gen.kv_bytes_per_token(mcfg, compute)
    budget_bytes = cfg.kv_budget_gib * GIB if cfg.kv_budget_gib > 0 else max(cfg.gpu_memory_gib * GIB - resident, 0) / 2
    slot_len = prompt + L
    slots = min(prompts * G, int(budget_bytes) // per_token // slot_len)
    fresh = min(prompts, -(-slots // G))  # prompts prefilled at once: the first admission fills every slot
    images = (pixel_bytes(mcfg.vision, fresh * patches), vision_forward_bytes(mcfg.vision, fresh * patches, a)) \
        if patches else (0, 0)
    working = max(images[0] + max(images[1], prefill_bytes(mcfg, fresh * prompt, a)),
                  sampling_bytes(slots, mcfg.vocab_size, a))
    gathered = a * shards * params.shard if wrapped else 0  # the padded all-gather outputs of every unit
    phases.append(Phase("rollout", {"resident": resident, "gathered weights": gathered,
                                    f"KV pool ({slots} slots x {slot_len} tokens)":
                                        kv_pool_bytes(mcfg, slots, slot_len, L, compute),
                                    "prefill/decode working set": working},
                        problem="" if slots else f"a KV budget of {int(budget_bytes) // per_token} tokens holds no "
                                                 f"sample of {slot_len} tokens (prompt + length cap)"))

    per_batch = max(1, min(G, (cfg.micro_batch_tokens - prompt) // L))  # responses at the cap, packed with their prompt
    batch = MicroBatch(tokens=prompt + per_batch * L, keys=prompt + per_batch * (prompt + L), head_tokens=per_batch * L,
                       patches=patches, with_entropy=True)
    phases += training_phases(resident, params, batch, mcfg, a, wrapped, cfg.activation_checkpointing)
    budget = f"{cfg.kv_budget_gib:g} GiB" if cfg.kv_budget_gib > 0 else "auto (half of what the resident state leaves)"
    lines = [f"stage {cfg.stage}: {L} tokens x {G} samples; per GPU {prompts} prompts of {prompt} tokens "
             f"({image} image tokens at max_pixels + {PROMPT_TEXT_TOKENS} of text), KV budget {budget}; "
             f"micro-batches of {batch.tokens} tokens (a prompt and {per_batch} responses at the cap)"]
    return lines, phases


def sft_phases(cfg, model, world):
    """(description lines, phases) of an SFT step (train_sft.main) at `world` ranks: micro-batches of
    max_tokens packed tokens, the head over all of them; the images of a micro-batch as many patches
    as max_pixels allows, or every token an image token when max_pixels is 0 (the checkpoint's bound)."""
    if cfg.train_vision:
        raise SystemExit("--plan does not count a trained vision tower's activations: plan with --train-vision false")
    shards = shard_group(world, cfg.replicate_degree)
    params, mcfg, a = count_parameters(model, shards), model.cfg, M.compute_dtype(cfg.param_dtype).itemsize
    parts = resident_bytes(params, 0)
    resident = sum(parts.values())
    image = 0 if model.visual is None else min(cfg.max_tokens, image_tokens(model, cfg.max_pixels or 2**62))
    patches = image * mcfg.vision.spatial_merge_size**2 if image else 0
    batch = MicroBatch(tokens=cfg.max_tokens, keys=cfg.max_tokens, head_tokens=cfg.max_tokens, patches=patches,
                       with_entropy=False)
    bound = f"max_pixels {cfg.max_pixels}" if cfg.max_pixels else "max_pixels 0: the whole micro-batch at most"
    lines = [f"micro-batches of {cfg.max_tokens} tokens, {image} of them image tokens ({bound})"]
    return lines, [Phase("resident", parts)] + training_phases(resident, params, batch, mcfg, a, is_wrapped(world, a),
                                                               cfg.activation_checkpointing)


# -----------------------------------------------------------------------------
# 5. the table

def gib(n):
    return f"{n / GIB:.1f}"


def format_plan(path, model, world, replicate_degree, param_dtype, lines, phases, gpu_gib, attention):
    """The printed plan: what is planned, one row per phase (GiB per GPU, whether it fits in
    `gpu_gib`, what it holds), then one warning line per phase that does not fit. Attention is counted as
    flash-attn's (`attention` "sdpa": a line says what that leaves out)."""
    params = count_parameters(model, 1)
    frozen = params.total - params.trainable
    shards = shard_group(world, replicate_degree)
    sharding = f"FSDP over {shards}" if replicate_degree == 1 else \
        f"HSDP: {replicate_degree} replicas x {shards} shards"
    out = [f"memory plan of {path}: {params.total / 1e9:.2f}B parameters, {params.trainable / 1e9:.2f}B trained, "
           f"{frozen / 1e9:.2f}B frozen (vision tower); {world} GPUs of {gpu_gib:g} GiB, {sharding}, "
           f"compute {param_dtype}", *lines,
           f"{'phase':<10} {'GiB/GPU':>8}  fits  holds (GiB)"]
    for phase in phases:
        parts = " + ".join(f"{name} {gib(n)}" for name, n in phase.parts.items() if n)
        fits = "no" if phase.problem or phase.total > gpu_gib * GIB else "yes"
        out.append(f"{phase.name:<10} {gib(phase.total):>8}  {fits:<4}  {parts}")
    for phase in phases:
        if phase.problem:
            out.append(f"warning: {phase.name} cannot run: {phase.problem}")
        elif phase.total > gpu_gib * GIB:
            out.append(f"warning: {phase.name} needs {gib(phase.total)} GiB per GPU, "
                       f"more than --gpu-memory-gib {gpu_gib:g}")
    out.append("not counted: the CUDA context, NCCL buffers and allocator fragmentation (a few GiB)")
    if attention == "sdpa":
        out.append("not counted either: --attention sdpa's padded batches, and the score matrices of calls that "
                   "take SDPA's math kernel, which flash-attn never holds (measured on one H200 while the "
                   "training calls were 3-d and masked: +4.6-5.5 GiB in an update at 1,024-token responses, "
                   "1.24B model; they grow with the square of the length)")
    return "\n".join(out)


def print_plan(path, cfg, phases):
    """Print the plan of the checkpoint at `path` (its config.json alone: the model is built on the
    meta device) under a trainer's config, at cfg.world_size GPUs (0: this launch's WORLD_SIZE);
    phases(model, world) -> (description lines, phases). Returns 0, the exit status."""
    model, world = M.build_model(path), cfg.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    lines, rows = phases(model, world)
    print(format_plan(path, model, world, cfg.replicate_degree, cfg.param_dtype, lines, rows, cfg.gpu_memory_gib,
                      cfg.attention))
    return 0
