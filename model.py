"""Qwen2.5-VL in plain PyTorch: vision tower + language model, checkpoint I/O, packed forward,
memory-lean token log-probs and an FSDP2 helper.

Read top to bottom:
  1. config          ModelConfig parsed from a Hugging Face config.json (Qwen2.5-VL or plain Qwen2)
  2. attention       one varlen attention used by the vision windows and the causal decoder
  3. vision tower    patch embed -> 2-D RoPE -> window/full attention blocks -> 2x2 patch merger
  4. language model  multimodal RoPE (t/h/w) positions, GQA decoder layers
  5. the model       forward_packed (padding-free training), forward (HF-style padded batch)
  6. log-probs       token_logprobs: chunked head + log-softmax, recomputed in backward
  7. checkpoints     load_model, load_sharded (FSDP2, each rank reads its shard) / save_model; a config.json
                     of model_type "mllama" builds model_mllama.py's Llama 3.2 Vision instead
  8. FSDP2           apply_fsdp, gathered_params

Parameter names equal the released Qwen2.5-VL checkpoints (`model.layers.*`, `visual.*`,
`lm_head.*`), so a state dict maps 1:1 onto the files on the Hub.
"""

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from train_utils import InputError, is_dtensor

try:  # GPU-only kernels; every code path has an SDPA twin that the CPU tests exercise.
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None


# -----------------------------------------------------------------------------
# 1. config

MODEL_TYPES = ("qwen2_5_vl", "qwen2")  # qwen2_vl's vision tower differs (LayerNorm, no window attention)
ROPE_TYPES = ("default", "mrope")  # released Qwen2.5-VL configs say "mrope", transformers >= 4.50 "default"
ROPE_KEYS = ("rope_type", "type", "rope_theta", "mrope_section")  # any other key rescales the frequencies
VISION_ROPE_THETA = 10000.0  # VisionTower.rope_cos_sin's base
TEXT_VALUES = {"hidden_act": "silu", "attention_dropout": 0.0}  # the only values the decoder implements
VISION_VALUES = {"hidden_act": "silu"}


@dataclass
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: list = field(default_factory=lambda: [7, 15, 23, 31])
    out_hidden_size: int = 3584
    tokens_per_second: int = 2


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: list | None = None  # None: plain 1-D RoPE (Qwen2 text checkpoints)
    tie_word_embeddings: bool = False
    vision: VisionConfig | None = None
    image_token_id: int | None = None
    vision_start_token_id: int | None = None

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @staticmethod
    def from_hf(raw: dict) -> "ModelConfig":
        """Parse a Hugging Face config.json in any layout transformers reads for Qwen2.5-VL or Qwen2:

          released Qwen2.5-VL      text fields at the top, `rope_scaling` {"type": "mrope",
                                   "mrope_section"} and `rope_theta`
          transformers 4.52-4.57   text fields under `text_config`, the same RoPE keys
          transformers 5           `text_config.rope_parameters` {"rope_type", "rope_theta", "mrope_section"}

        What this model does not implement is refused with one line naming the key, never read
        as a default, e.g. `config.json: text_config.rope_parameters.rope_type 'yarn' is not
        implemented (supported: default, mrope)`.
        """
        model_type = _model_type(raw)
        text = {**raw, **raw.get("text_config", {})}
        text_key = _text_paths(raw)
        _refuse_sliding_window(text, text_key)
        _refuse_other_values(text, text_key, TEXT_VALUES)
        hidden_size, heads = _required(text, text_key, "hidden_size"), _required(text, text_key, "num_attention_heads")
        _refuse_other_values(text, text_key, {"head_dim": hidden_size // heads})
        rope_theta, mrope_section = _text_rope(text, text_key, model_type, hidden_size // heads)
        return ModelConfig(
            vocab_size=_required(text, text_key, "vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=_required(text, text_key, "intermediate_size"),
            num_hidden_layers=_required(text, text_key, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=text.get("num_key_value_heads") or heads,
            rms_norm_eps=_required(text, text_key, "rms_norm_eps"),
            rope_theta=rope_theta,
            mrope_section=mrope_section,
            tie_word_embeddings=_tied_embeddings(raw),
            vision=_vision_config(raw),
            image_token_id=raw.get("image_token_id"),
            vision_start_token_id=raw.get("vision_start_token_id"),
        )


def _not_implemented(key, value, supported):
    return ValueError(f"config.json: {key} {value!r} is not implemented (supported: {', '.join(map(str, supported))})")


def _text_paths(raw):
    """path_of(key): a text field's path in config.json, for messages. Under `text_config`
    (transformers >= 4.52) unless only the top level has it (released configs)."""
    def path_of(key):
        nested = "text_config" in raw and (key in raw["text_config"] or key not in raw)
        return f"text_config.{key}" if nested else key
    return path_of


def _required(fields, path_of, key):
    if fields.get(key) is None:
        raise ValueError(f"config.json: {path_of(key)} is missing")
    return fields[key]


def _model_type(raw):
    if raw.get("model_type") not in MODEL_TYPES:
        raise _not_implemented("model_type", raw.get("model_type"), MODEL_TYPES)
    return raw["model_type"]


def _refuse_other_values(fields, path_of, implemented):
    """A field present with another value than the one implemented (absent ones take it)."""
    for key, value in implemented.items():
        if fields.get(key, value) != value:
            raise _not_implemented(path_of(key), fields[key], [value])


def _refuse_sliding_window(text, path_of):
    """Qwen2's sliding-window attention (`use_sliding_window`, or a sliding entry in transformers'
    `layer_types`) would hide keys our causal attention attends to. `sliding_window` alone is
    only the unused window size (32768 in the released configs)."""
    if text.get("use_sliding_window"):
        raise _not_implemented(path_of("use_sliding_window"), text["use_sliding_window"], [False])
    for kind in text.get("layer_types") or []:
        if kind != "full_attention":
            raise _not_implemented(path_of("layer_types"), kind, ["full_attention"])


def _rope_dict(text, path_of):
    """(path, dict) of the decoder's RoPE settings: transformers 5's `rope_parameters` or the
    older `rope_scaling`; an empty dict when neither is set (plain Qwen2, default RoPE)."""
    present = [key for key in ("rope_parameters", "rope_scaling") if text.get(key)]
    if len(present) == 2:
        raise ValueError(f"config.json: both {path_of('rope_parameters')} and {path_of('rope_scaling')} are set")
    key = present[0] if present else "rope_parameters"
    return path_of(key), text.get(key) or {}


def _refuse_other_rope(path, rope, types, keys):
    """A RoPE dict of another type, or with another key (a scaling `factor`,
    `original_max_position_embeddings`, `mrope_interleaved`, ...), rotates by other frequencies."""
    for name in ("rope_type", "type"):
        if name in rope and rope[name] not in types:
            raise _not_implemented(f"{path}.{name}", rope[name], types)
    for name in rope:
        if name not in keys:
            raise ValueError(f"config.json: {path}.{name} is not implemented (RoPE keys read: {', '.join(keys)})")


def _text_rope(text, path_of, model_type, head_dim):
    """(rope_theta, mrope_section) of the decoder. Theta comes from the RoPE dict, else the older
    top-level `rope_theta` (transformers 5's order). Qwen2.5-VL needs an mrope_section whose
    (t, h, w) bands split head_dim / 2, e.g. [16, 24, 24] for head_dim 128; plain Qwen2 has none
    (and ignores one: its positions are text positions, equal in the three channels)."""
    path, rope = _rope_dict(text, path_of)
    _refuse_other_rope(path, rope, ROPE_TYPES, ROPE_KEYS)
    theta = rope.get("rope_theta", text.get("rope_theta"))
    if theta is None:
        raise ValueError(f"config.json: {path}.rope_theta is missing, and so is {path_of('rope_theta')}")
    if model_type == "qwen2":
        return float(theta), None
    section = rope.get("mrope_section")
    if section is None or len(section) != 3 or sum(section) != head_dim // 2:
        raise ValueError(f"config.json: {path}.mrope_section {section!r} does not split head_dim / 2 = "
                         f"{head_dim // 2} into (t, h, w) bands")
    return float(theta), list(section)


def _tied_embeddings(raw):
    """`tie_word_embeddings` sits at the top (released, transformers 5) or under `text_config`
    (4.52-4.57); transformers 5 ties when either says so, 4.x reads text_config: refused when
    both are present and disagree."""
    top, nested = raw.get("tie_word_embeddings"), raw.get("text_config", {}).get("tie_word_embeddings")
    if top is not None and nested is not None and top != nested:
        raise ValueError(f"config.json: tie_word_embeddings {top!r} and text_config.tie_word_embeddings "
                         f"{nested!r} disagree")
    return bool(top if top is not None else nested)


def _vision_config(raw):
    """VisionConfig from `vision_config` (None for plain Qwen2). Its 2-D RoPE is the axial one at
    theta 10000; transformers 5 writes that as `vision_config.rope_parameters`."""
    if "vision_config" not in raw:
        return None
    v = raw["vision_config"]
    _refuse_other_values(v, "vision_config.{}".format, VISION_VALUES)
    rope = v.get("rope_parameters") or {}
    _refuse_other_rope("vision_config.rope_parameters", rope, ("axial", "default"), ("rope_type", "type", "rope_theta"))
    _refuse_other_values(rope, "vision_config.rope_parameters.{}".format, {"rope_theta": VISION_ROPE_THETA})
    vision = VisionConfig(**{k: v[k] for k in VisionConfig.__dataclass_fields__ if k in v})
    vision.patch_size = v.get("patch_size", v.get("spatial_patch_size", vision.patch_size))
    return vision


# -----------------------------------------------------------------------------
# 2. attention over packed sequences

PADDED_ATTENTION_MAX_SCORES = 2**26  # B * Hq * Lmax^2 beyond which SDPA runs sequence by sequence
ATTENTION_BACKENDS = ("flash", "sdpa")
attention_backend = "flash"  # this process's choice (set_attention): "sdpa" keeps flash-attn out even on CUDA
FLASH_ATTN_MISSING = ("flash-attn is not installed, and on CUDA attention without it runs SDPA over padded "
                      "batches (more time and memory; a masked call takes the math kernel, O(L^2) memory): "
                      "pip install -r requirements-gpu.txt --no-build-isolation, or pass --attention sdpa to run "
                      "without it")


def set_attention(requested, device):
    """Choose this process's attention kernels and return the backend in use on `device`: "flash"
    (flash-attn's varlen and KV-cache kernels) on CUDA, "sdpa" on CPU or when asked for. "flash" on
    CUDA without flash-attn installed exits with FLASH_ATTN_MISSING: falling back silently would
    trade the varlen kernel for SDPA over padded batches. Example: ("flash", cpu) -> "sdpa"."""
    global attention_backend
    if requested not in ATTENTION_BACKENDS:
        raise SystemExit(f"attention must be one of {ATTENTION_BACKENDS}, got {requested!r}")
    cuda = torch.device(device).type == "cuda"
    if requested == "flash" and cuda and flash_attn_varlen_func is None:
        raise SystemExit(FLASH_ATTN_MISSING)
    attention_backend = requested
    return "flash" if requested == "flash" and cuda else "sdpa"


def use_flash(q):
    """Whether attention over `q` runs flash-attn's kernels: CUDA tensors, flash-attn installed, and
    not turned off by `set_attention("sdpa", ...)`. The one gate of every flash branch, so that the
    tests' flash-attn stand-in (tests/flash_attn_standin.py) runs those branches on CPU."""
    return q.is_cuda and flash_attn_varlen_func is not None and attention_backend == "flash"


def varlen_attention(q, k, v, cu_seqlens, causal, cu_seqlens_k=None):
    """Attention over sequences packed along dim 0 that never crosses a `cu_seqlens` boundary.

    q: [T, Hq, D], k/v: [Tk, Hkv, D] (grouped-query when Hkv < Hq); returns [T, Hq, D]. Keys and
    values share the queries' boundaries, or have their own `cu_seqlens_k` (a response's queries
    after the keys of its shared prompt and its own): a sequence's queries are then its last keys,
    and the causal mask aligns at the bottom right, as flash-attn's does.
    CUDA with flash-attn uses its varlen kernel (`use_flash`). Otherwise SDPA over the sequences
    padded into [B, Lmax] batches, one per group of similar lengths (`length_groups`; one kernel
    call per group beats a Python loop of small ones, in backward above all), or one call per
    sequence when a group's padded score matrix would be too large. A call passes no mask where
    none is needed: a group without padding, or causal with the queries at their own key positions
    (`_causal_without_mask`).
    """
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    q_lengths, k_lengths = ((cu[1:] - cu[:-1]).long() for cu in (cu_seqlens, cu_k))
    if use_flash(q):
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_k, int(q_lengths.max()), int(k_lengths.max()),
                                      causal=causal)
    gqa = k.shape[1] != q.shape[1]
    out = torch.empty_like(q)
    q_spans, k_spans = _spans(cu_seqlens), _spans(cu_k)
    q_list, k_list = q_lengths.tolist(), k_lengths.tolist()  # the groups' sizes on the host, read once
    for group in length_groups(k_list):
        members = torch.tensor(group, device=q.device)
        offsets = (k_lengths - q_lengths)[members]  # query i of sequence b sits at key position i + offsets[b]
        unmasked = _causal_without_mask(q, causal, any(k_list[i] != q_list[i] for i in group))
        max_k = max(k_list[i] for i in group)
        max_q = max_k if unmasked else max(q_list[i] for i in group)
        if len(group) * q.shape[1] * max_q * max_k > PADDED_ATTENTION_MAX_SCORES:
            for i in group:
                _sequence_attention(out, q, k, v, q_spans[i], k_spans[i], causal, gqa)
            continue
        q_token, q_slot, q_pos = _group_slots(cu_seqlens, q_lengths, members)
        if unmasked:  # each query at its key position; the rows before a response's first are its prompt's
            q_pos = q_pos + offsets[q_slot]
        k_token, k_slot, k_pos = _group_slots(cu_k, k_lengths, members)
        padded = [x.new_zeros(len(members), length, *x.shape[1:]).index_put_((slot, pos), x.index_select(0, token))
                  .transpose(1, 2)
                  for x, length, token, slot, pos in ((q, max_q, q_token, q_slot, q_pos),
                                                      (k, max_k, k_token, k_slot, k_pos),
                                                      (v, max_k, k_token, k_slot, k_pos))]
        mask = None  # unmasked, or neither causal nor padded
        if not unmasked and (causal or any(k_list[i] < max_k for i in group)):
            keys = torch.arange(max_k, device=q.device)
            mask = (keys < k_lengths[members, None])[:, None, None, :]  # [G, 1, 1, Lk]: real keys only
            if causal:
                last_key = torch.arange(max_q, device=q.device) + offsets[:, None]
                mask = mask & (keys <= last_key[:, :, None])[:, None]
        out[q_token] = F.scaled_dot_product_attention(*padded, attn_mask=mask, is_causal=unmasked,
                                                      enable_gqa=gqa).transpose(1, 2)[q_slot, q_pos]
    return out


CAUSAL_WITHOUT_MASK_DEVICES = ("cuda",)


def _causal_without_mask(q, causal, offset):
    """Whether a causal SDPA call over `q`'s sequences runs SDPA's own causal mask, with each query
    placed at its key position, instead of a materialised mask: always where queries and keys are one
    sequence (`offset` False; no real query reaches the padding after its sequence; on CPU the same
    bits as the mask, torch 2.13); for a response after its prompt (`offset` True) on
    CAUSAL_WITHOUT_MASK_DEVICES, its prompt's positions then holding zero queries whose outputs are
    dropped. On CUDA a mask keeps SDPA off its flash kernel (a masked grouped-query call can take the
    math kernel: a [B, H, Lq, Lk] score matrix, out of memory at the paper's lengths); on CPU its
    fused kernel takes the mask, and the prompt's rows would cost more than they save."""
    return causal and (not offset or q.device.type in CAUSAL_WITHOUT_MASK_DEVICES)


def _sequence_attention(out, q, k, v, q_span, k_span, causal, gqa):
    """One sequence's SDPA, written into out[q_span]: its queries are its last keys when it has
    more keys than queries (a response after its shared prompt; `_causal_without_mask` decides
    between a bottom-right mask and zero queries before the sequence's own)."""
    (qs, qe), (ks, ke) = q_span, k_span
    offset = (ke - ks) - (qe - qs)
    query, mask = q[qs:qe], None
    if _causal_without_mask(q, causal, offset > 0):
        if offset:
            query = F.pad(query, (0, 0, 0, 0, offset, 0))  # [Lk, Hq, D]: the prompt's rows zero
    elif causal:
        mask = torch.ones(qe - qs, ke - ks, dtype=torch.bool, device=q.device).tril(offset)
    out[qs:qe] = sequence_sdpa(query, k[ks:ke], v[ks:ke], attn_mask=mask, is_causal=mask is None and causal,
                               enable_gqa=gqa)[len(query) - (qe - qs):]


def sequence_sdpa(q, k, v, **kwargs):
    """SDPA over one sequence in the packed layout: q [Lq, Hq, D], k/v [Lk, Hkv, D] -> [Lq, Hq, D];
    `kwargs` as F.scaled_dot_product_attention's. Called as a batch of one: SDPA's fused kernels take
    4-d inputs only, and 3-d ones go to its math kernel (the whole score matrix) on every device."""
    return F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                          **kwargs)[0].transpose(0, 1)


SIMILAR_LENGTH = 0.75  # a padded attention group holds sequences at least this share of its longest


def length_groups(lengths, similar=SIMILAR_LENGTH):
    """Sequence indices grouped for padded attention, longest first (varlen_attention passes key
    lengths): a group takes the sequences at least `similar` times as long as its first, so where
    queries and keys are one sequence padding wastes at most 1 - similar^2 of a group's score
    matrix. One padded batch of SFT's cold CoTs (16 sequences of 64-390 tokens) is
    three quarters padding; grouped, about a fifth.
    Example: lengths [100, 20, 90, 30, 16] -> [[0, 2], [3], [1, 4]] (75 <= 90; 22.5 > 20; 15 <= 16).
    """
    groups = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups and lengths[i] >= similar * lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _group_slots(cu_seqlens, lengths, members):
    """For the sequences `members` of a packed batch, in that order: the packed index of each of
    their tokens and its (slot, position) in a padded [len(members), Lmax] layout."""
    member_lengths = lengths[members]
    slot = torch.repeat_interleave(torch.arange(len(members), device=lengths.device), member_lengths)
    pos = torch.arange(len(slot), device=lengths.device) - (torch.cumsum(member_lengths, 0) - member_lengths)[slot]
    return cu_seqlens[:-1].long()[members][slot] + pos, slot, pos


def _padded_slots(cu_seqlens, lengths):
    """(sequence, position) of every packed token in the padded [B, Lmax] layout."""
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    return seq, torch.arange(len(seq), device=lengths.device) - cu_seqlens[:-1].long()[seq]


def _spans(cu_seqlens):
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def shared_prefix_keys(cu_seqlens, prefix_of):
    """Key layout of a packed batch in which some sequences continue another: sequence i with
    prefix_of[i] = j >= 0 (a response after its prompt j, packed once for all its responses) sees
    sequence j's tokens, then its own. Returns key_index [Tk] (the packed token behind each key) and
    cu_seqlens_k [B+1], for `varlen_attention(q, k.index_select(0, key_index), v.index_select(0, key_index),
    cu_seqlens, causal, cu_seqlens_k)`. Example: cu_seqlens [0, 3, 5, 6], prefix_of [-1, 0, 0] ->
    key_index [0 1 2 | 0 1 2 3 4 | 0 1 2 5], cu_seqlens_k [0, 3, 8, 12].
    """
    spans = _spans(cu_seqlens)
    pieces = []
    for i, j in enumerate(prefix_of):
        if j >= 0 and not (j < i and prefix_of[j] < 0):
            raise ValueError(f"sequence {i} continues sequence {j}, which is not an earlier sequence without a prefix")
        pieces.append(torch.cat([torch.arange(*spans[j])] * (j >= 0) + [torch.arange(*spans[i])]))
    lengths = torch.tensor([len(p) for p in pieces])
    return torch.cat(pieces).to(cu_seqlens.device), F.pad(lengths.cumsum(0), (1, 0)).to(cu_seqlens)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x: [T, H, D]; cos/sin: [T, D]."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalise in fp32 like the reference implementation, so bf16 runs round identically
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class GatedMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The vision tower's copy has biases."""

    def __init__(self, dim, hidden, bias):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# -----------------------------------------------------------------------------
# 3. vision tower

class VisionAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x, cos, sin, cu_seqlens):
        T = x.shape[0]
        q, k, v = self.qkv(x).view(T, 3, self.num_heads, -1).unbind(1)
        # the reference rotates in fp32 whatever the activation dtype
        q = apply_rope(q.float(), cos, sin).to(v.dtype)
        k = apply_rope(k.float(), cos, sin).to(v.dtype)
        return self.proj(varlen_attention(q, k, v, cu_seqlens, causal=False).reshape(T, -1))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, 1e-6)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.norm2 = RMSNorm(cfg.hidden_size, 1e-6)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=True)

    def forward(self, x, cos, sin, cu_seqlens):
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Concatenates each 2x2 group of neighbouring patches and projects it to the LLM width."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        merged = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6)
        self.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, cfg.out_hidden_size))

    def forward(self, x):
        return self.mlp(self.ln_q(x).view(-1, self.mlp[0].in_features))


class PatchEmbed(nn.Module):
    """The checkpoint's Conv3d (kernel = stride = 2x14x14) applied to already-cut patches, which
    is one matrix product: far faster than a strided convolution, in backward above all."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel, stride=kernel, bias=False)

    def forward(self, patches):
        weight = self.proj.weight
        return F.linear(patches.to(weight.dtype), weight.view(weight.shape[0], -1))


class VisionTower(nn.Module):
    """The Qwen2.5-VL ViT. Input: the image processor's flattened patches [P, C*2*14*14], already
    ordered so that every 2x2 merge group is contiguous; output: one vector per merged patch."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def rope_cos_sin(self, grid_thw):
        """2-D RoPE: half of each head's rotary dims encode the patch row, half the column.
        Patches are enumerated merge-group by merge-group, as the image processor lays them out."""
        m = self.cfg.spatial_merge_size
        coords = []
        for t, h, w in grid_thw.tolist():
            rows = torch.arange(h).view(h // m, m, 1, 1).expand(-1, -1, w // m, m)
            cols = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, -1, -1)
            # reorder (h/m, m, w/m, m) -> (h/m, w/m, m, m): the merge group is the inner block
            rc = torch.stack([rows.permute(0, 2, 1, 3).flatten(), cols.permute(0, 2, 1, 3).flatten()], dim=-1)
            coords.append(rc.repeat(t, 1))
        coords = torch.cat(coords)
        rot_dim = self.cfg.hidden_size // self.cfg.num_heads // 2
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rot_dim, 2, dtype=torch.float) / rot_dim))
        freqs = (coords[..., None].float() * inv_freq).flatten(1)  # [P, rot_dim]: row freqs, col freqs
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def window_index(self, grid_thw):
        """Window attention groups merged patches into windows of (window_size / 28)^2 per frame.
        Returns the permutation that makes each window contiguous and the windows' cu_seqlens (in
        patches). Edge windows are smaller when the grid is not a multiple of the window."""
        m = self.cfg.spatial_merge_size
        win = self.cfg.window_size // m // self.cfg.patch_size
        order, seqlens, offset = [], [], 0
        for t, h, w in grid_thw.tolist():
            gh, gw = h // m, w // m
            idx = torch.arange(t * gh * gw).view(t, gh, gw)
            for frame in range(t):
                for r in range(0, gh, win):
                    for c in range(0, gw, win):
                        block = idx[frame, r:r + win, c:c + win].flatten()
                        order.append(block + offset)
                        seqlens.append(block.numel() * m * m)
            offset += t * gh * gw
        cu = F.pad(torch.tensor(seqlens).cumsum(0), (1, 0)).to(torch.int32)
        return torch.cat(order), cu

    def forward(self, pixel_values, grid_thw):
        cfg, unit = self.cfg, self.cfg.spatial_merge_size**2
        x = self.patch_embed(pixel_values)
        cos, sin = self.rope_cos_sin(grid_thw)
        order, cu_windows = self.window_index(grid_thw)
        # permute whole merge groups into window order; the merger runs in that order, undone at the end
        x = x.view(-1, unit, cfg.hidden_size)[order].view(-1, cfg.hidden_size)
        cos = cos.view(-1, unit, cos.shape[-1])[order].view(-1, cos.shape[-1]).to(x.device)
        sin = sin.view(-1, unit, sin.shape[-1])[order].view(-1, sin.shape[-1]).to(x.device)
        frame_sizes = (grid_thw[:, 1] * grid_thw[:, 2]).repeat_interleave(grid_thw[:, 0])
        cu_frames = F.pad(frame_sizes.cumsum(0), (1, 0)).to(torch.int32).to(x.device)
        cu_windows = cu_windows.to(x.device)
        for i, block in enumerate(self.blocks):
            cu = cu_frames if i in cfg.fullatt_block_indexes else cu_windows
            x = block(x, cos, sin, cu)
        return self.merger(x)[torch.argsort(order.to(x.device))]


# -----------------------------------------------------------------------------
# 4. language model

def mrope_positions(input_ids, image_grid_thw, image_token_id, merge_size):
    """Multimodal RoPE positions [3, L] (temporal, height, width) of one sequence.

    Text tokens advance all three channels together. An image of merged grid (t, h, w) placed
    when the running position is p gets t-channel p, h-channel p + row, w-channel p + col; the
    text after it resumes at max(image positions) + 1. Equal to transformers' `get_rope_index`
    for images. Example: tokens [a, b, img x 4 (grid 1x2x2), c] ->
      t: 0 1 2 2 2 2 4 ;  h: 0 1 2 2 3 3 4 ;  w: 0 1 2 3 2 3 4
    """
    L = input_ids.shape[0]
    ids = input_ids.tolist()
    segments, cursor, next_pos = [], 0, 0
    grids = [] if image_grid_thw is None else image_grid_thw.tolist()
    for t, h, w in grids:
        if image_token_id not in ids[cursor:]:
            break  # images of the other sequences in a packed batch
        start = ids.index(image_token_id, cursor)
        gh, gw = h // merge_size, w // merge_size
        segments.append(torch.arange(start - cursor).expand(3, -1) + next_pos)
        next_pos += start - cursor
        hh = torch.arange(gh).view(1, -1, 1).expand(t, gh, gw).flatten()
        ww = torch.arange(gw).view(1, 1, -1).expand(t, gh, gw).flatten()
        segments.append(torch.stack([torch.zeros_like(hh), hh, ww]) + next_pos)
        next_pos += max(gh, gw)
        cursor = start + t * gh * gw
    segments.append(torch.arange(L - cursor).expand(3, -1) + next_pos)
    return torch.cat(segments, dim=1)


def image_tokens_per_sequence(input_ids, cu_seqlens, image_token_id, image_grid_thw, merge_size):
    """Split the batch's image grids among its packed sequences (images are in sequence order)."""
    if image_grid_thw is None:
        return [None] * (len(cu_seqlens) - 1)
    per_image = (image_grid_thw.prod(-1) // merge_size**2).tolist()
    grids, i = [], 0
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        n_tokens, first = int((input_ids[start:end] == image_token_id).sum()), i
        while n_tokens > 0:
            n_tokens -= per_image[i]
            i += 1
        grids.append(image_grid_thw[first:i] if i > first else None)
    return grids


class Attention(nn.Module):
    """Grouped-query attention, with q/k/v biases (Qwen2) or without (Llama: `bias=False`). The
    attention itself is a callable passed in by the caller: varlen over a packed batch in
    training, a KV cache in generation."""

    def __init__(self, cfg: ModelConfig, layer_idx, bias=True):
        super().__init__()
        hd = cfg.head_dim
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, attend):
        T = x.shape[0]
        q = apply_rope(self.q_proj(x).view(T, self.num_heads, -1), cos, sin)
        k = apply_rope(self.k_proj(x).view(T, self.num_kv_heads, -1), cos, sin)
        v = self.v_proj(x).view(T, self.num_kv_heads, -1)
        return self.o_proj(attend(self.layer_idx, q, k, v).reshape(T, -1))


class DecoderLayer(nn.Module):
    """Pre-norm self-attention + SwiGLU block of Qwen2 and, with `qkv_bias=False`, of Llama 3."""

    def __init__(self, cfg: ModelConfig, layer_idx, qkv_bias=True):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx, bias=qkv_bias)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=False)

    def forward(self, x, cos, sin, attend):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# -----------------------------------------------------------------------------
# 5. the model

class Qwen25VL(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = TextModel(cfg)
        self.visual = VisionTower(cfg.vision) if cfg.vision is not None else None
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.activation_checkpointing = False
        self.sharded = False  # set by apply_fsdp
        self.hf_config = None  # the raw config.json dict, written back by save_model
        self.source_dir = None  # where tokenizer/processor files are copied from on save

    @property
    def head_weight(self):
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def checkpoint_name(self, key):
        """The parameter a checkpoint tensor fills (`_canonical_key`), None for a tied head's stored copy."""
        name = _canonical_key(key)
        return None if name == "lm_head.weight" and self.cfg.tie_word_embeddings else name

    def sharded_blocks(self):
        """The modules apply_fsdp shards one by one (the root shards the rest): decoder layers, vision blocks."""
        return list(self.model.layers) + (list(self.visual.blocks) if self.visual is not None else [])

    # --- pieces shared by training and generation ---------------------------------------

    def positions(self, input_ids, cu_seqlens, image_grid_thw=None, prefix_of=None):
        """[3, T] RoPE positions of a packed batch, restarting at 0 for every sequence; a sequence
        that continues another (`prefix_of`, see `shared_prefix_keys`) goes on from its last position."""
        merge = self.cfg.vision.spatial_merge_size if self.cfg.vision else 1
        grids = image_tokens_per_sequence(input_ids, cu_seqlens, self.cfg.image_token_id, image_grid_thw, merge)
        per_sequence = [mrope_positions(input_ids[s:e].cpu(), g, self.cfg.image_token_id, merge)
                        for (s, e), g in zip(_spans(cu_seqlens), grids)]
        for i, j in enumerate(prefix_of or []):
            if j >= 0:
                per_sequence[i] = per_sequence[i] + per_sequence[j].max() + 1
        return torch.cat(per_sequence, dim=1).to(input_ids.device)

    def rope_cos_sin(self, positions, dtype):
        """cos/sin [T, head_dim] for positions [3, T]. With `mrope_section` (t, h, w) the rotary
        frequencies are split into three bands, each driven by its own position channel."""
        hd = self.cfg.head_dim
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float, device=positions.device) / hd))
        freqs = positions[..., None].float() * inv_freq  # [3, T, hd/2]
        if self.cfg.mrope_section is None:
            freqs = freqs[0]
        else:
            channel = torch.repeat_interleave(torch.arange(3, device=positions.device),
                                              torch.tensor(self.cfg.mrope_section, device=positions.device))
            freqs = freqs.gather(0, channel.view(1, 1, -1).expand(1, freqs.shape[1], -1))[0]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None):
        """Token embeddings with each image's vision features written over its placeholder tokens."""
        x = self.model.embed_tokens(input_ids)
        if pixel_values is None:
            if self.visual is not None and self.sharded:
                # FSDP: every rank must join the vision blocks' collectives, images or not
                m = self.cfg.vision.spatial_merge_size
                dummy = x.new_zeros(m * m, self.visual.patch_embed.proj.weight[0].numel())
                x = x + 0.0 * self.visual(dummy, torch.tensor([[1, m, m]])).sum()
            return x
        features = self.visual(pixel_values, image_grid_thw).to(x.dtype)
        slots = input_ids == self.cfg.image_token_id
        if int(slots.sum()) != features.shape[0]:
            raise ValueError(f"{int(slots.sum())} image tokens in the text but {features.shape[0]} image features")
        return x.masked_scatter(slots[:, None], features)

    def decode(self, x, cos, sin, attend):
        """Run the decoder stack; returns the final-norm hidden states."""
        for layer in self.model.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, attend, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attend)
        return self.model.norm(x)

    def _trunk(self, input_ids, cu_seqlens, pixel_values, image_grid_thw, prefix_of=None):
        x = self.embed(input_ids, pixel_values, image_grid_thw)
        cos, sin = self.rope_cos_sin(self.positions(input_ids, cu_seqlens, image_grid_thw, prefix_of), x.dtype)
        cu = cu_seqlens.to(device=x.device, dtype=torch.int32)
        if prefix_of is None:
            return self.decode(x, cos, sin, lambda _, q, k, v: varlen_attention(q, k, v, cu, causal=True))
        # index_select, not k[key_index]: its backward adds a shared prompt's repeated key gradients in
        # order, where advanced indexing's adds them with atomics on several CPU threads (a run's
        # GRPO updates then changed from one run to the next)
        key_index, cu_k = shared_prefix_keys(cu, prefix_of)
        return self.decode(x, cos, sin, lambda _, q, k, v: varlen_attention(
            q, k.index_select(0, key_index), v.index_select(0, key_index), cu, causal=True, cu_seqlens_k=cu_k))

    # --- training: padding-free ----------------------------------------------------------

    def forward_packed(self, input_ids, cu_seqlens, pixel_values=None, image_grid_thw=None, prefix_of=None):
        """Hidden states [T, H] of sequences concatenated into `input_ids` [T], split by `cu_seqlens`
        [B+1]; positions restart and attention stops at every boundary, except that a sequence
        i with prefix_of[i] = j >= 0 continues sequence j (`shared_prefix_keys`): it attends to j's
        tokens and its positions go on from j's, as if it were packed after j's tokens alone."""
        return self._trunk(input_ids, cu_seqlens, pixel_values, image_grid_thw, prefix_of)

    def packed_logprobs(self, input_ids, cu_seqlens, targets, pixel_values=None, image_grid_thw=None,
                        temperature=1.0, with_entropy=False, positions=None, prefix_of=None):
        """Log-probs of `targets` under the next-token distributions of a packed batch (as
        `forward_packed`), via the chunked head (`token_logprobs`): at every position (targets [T],
        the next tokens), or only at `positions` (targets one per position). GRPO scores responses
        only, so the head never runs on prompt tokens, and a shared prompt's last position scores
        the first token of each of its responses. A method of the model so FSDP2 gathers the head."""
        hidden = self._trunk(input_ids, cu_seqlens, pixel_values, image_grid_thw, prefix_of)
        if positions is not None:  # a prompt's last position repeats (see _trunk on index_select)
            hidden = hidden.index_select(0, positions)
        return token_logprobs(hidden, self.head_weight, targets, temperature, with_entropy=with_entropy)

    # --- the transformers-style call ----------------------------------------------------

    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None):
        """Logits [B, T, V] of a right-padded batch (padding positions are zero). Runs the
        packed path on the unpadded tokens, so padding costs no compute."""
        keep, cu = unpadded(input_ids, attention_mask)
        hidden = self._trunk(input_ids[keep], cu, pixel_values, image_grid_thw)
        return padded_logits(hidden, self.head_weight, keep)


def unpadded(input_ids, attention_mask=None):
    """(keep [B, T] bool, cu_seqlens [B+1] int32) of a right-padded batch: `input_ids[keep]` is its
    tokens packed. ValueError for any other padding. Example: mask [[1, 1, 0], [1, 1, 1]] ->
    cu_seqlens [0, 2, 5]."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    keep = attention_mask.bool()
    lengths = keep.sum(1)
    if not torch.equal(keep, torch.arange(input_ids.shape[1], device=keep.device) < lengths[:, None]):
        raise ValueError("forward expects a right-padded batch")
    return keep, F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def padded_logits(hidden, head_weight, keep):
    """Logits [B, T, V] of packed hidden states [keep.sum(), H] put back in the right-padded batch
    layout of `keep` [B, T] (zeros at padding)."""
    logits = hidden.new_zeros(*keep.shape, head_weight.shape[0])
    logits[keep] = hidden @ head_weight.t()
    return logits


# -----------------------------------------------------------------------------
# 6. memory-lean log-probs

def _block_logits(h, weight, block):
    """h @ W^T in the first len(h) rows of `block`, a [chunk, vocab] buffer in the accumulation dtype
    reused by every chunk: fp32 (fp64) inputs write it in place (a fresh buffer per chunk costs its
    page faults on CPU, ~1/3 of the GEMM's time at vocab 152K); bf16 ones copy their bf16 product in."""
    z = block[:h.shape[0]]
    return torch.mm(h, weight.t(), out=z) if h.dtype == block.dtype else z.copy_(h @ weight.t())


class _ChunkedLogprobs(torch.autograd.Function):
    """log_softmax(h W^T / temperature)[target] (and the entropy) chunk by chunk. Forward keeps
    only h, W and each row's log-sum-exp; backward recomputes each chunk's logits, so the
    [tokens, vocab] fp32 matrix never exists beyond one chunk, whose buffer every chunk rewrites
    in place (forward: logits -> z - max -> exp; backward: logits -> log p -> p -> dloss/dz). The
    softmax math runs in fp32 (fp64 for fp64 inputs); the two GEMMs of backward take the inputs'
    dtype, so bf16 inputs get bf16 tensor-core GEMMs (fp32 accumulation inside each) and W is
    never copied."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk, with_entropy):
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least, even for bf16 inputs
        logp = hidden.new_empty(hidden.shape[0], dtype=acc)
        entropy = hidden.new_zeros(hidden.shape[0] if with_entropy else 0, dtype=acc)
        lse = torch.empty_like(logp)
        block = hidden.new_empty(min(chunk, hidden.shape[0]), weight.shape[0], dtype=acc)
        exp_block = torch.empty_like(block) if with_entropy else block  # entropy needs z and exp(z) at once
        for s in range(0, hidden.shape[0], chunk):
            rows = slice(s, s + chunk)
            z = _block_logits(hidden[rows], weight, block).div_(temperature)
            target_z, top = z.gather(1, targets[rows, None])[:, 0], z.amax(-1)
            z.sub_(top[:, None])  # z - max: exp stays finite (torch.logsumexp's math, without its temporaries)
            p = torch.exp(z, out=exp_block[:len(z)])  # unnormalised probabilities; in place without entropy
            total = p.sum(-1)
            lse[rows] = top + total.log()
            logp[rows] = target_z - lse[rows]
            if with_entropy:  # H = lse - sum_j p_j z_j / total = log(total) - sum_j p_j (z_j - max) / total
                entropy[rows] = total.log() - p.mul_(z).sum(-1) / total
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature, ctx.chunk, ctx.with_entropy = temperature, chunk, with_entropy
        ctx.mark_non_differentiable(targets)
        ctx.set_materialize_grads(False)  # an entropy that is only logged sends no gradient: skip its branch
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        tau = ctx.temperature
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        with_entropy = ctx.with_entropy and grad_entropy is not None
        acc = lse.dtype
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=acc)  # summed over chunks: fp32 at least
        block = hidden.new_empty(min(ctx.chunk, hidden.shape[0]), weight.shape[0], dtype=acc)
        for s in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(s, s + ctx.chunk)
            h, g_logp = hidden[rows], grad_logp[rows, None]
            log_p = _block_logits(h, weight, block).div_(tau).sub_(lse[rows, None])
            if with_entropy:
                # d logp_t / dz = onehot(t) - p ;  d H / dz_j = -p_j (log p_j + H)
                p = log_p.exp()
                gz = p.mul_(log_p.add_(entropy[rows, None]).mul_(grad_entropy[rows, None]).add_(g_logp)).neg_()
            else:
                gz = log_p.exp_().mul_(-g_logp)
            gz = gz.scatter_add_(1, targets[rows, None], g_logp).div_(tau).to(hidden.dtype)
            torch.mm(gz, weight, out=grad_hidden[rows])
            if gz.dtype == acc:
                grad_weight.addmm_(gz.t(), h)  # in place: no [vocab, hidden] product
            else:  # bf16: a bf16 GEMM, its [vocab, hidden] product added to the fp32 sum (no mixed-dtype mm on CPU)
                grad_weight += gz.t() @ h
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None


HEAD_CHUNK = 1024  # most rows of [chunk, vocab] logits token_logprobs computes at once (memplan.py counts them)


def head_chunk(hidden_size):
    """Rows per block of token_logprobs: as many as the hidden size, so a [chunk, vocab] fp32 block
    is no larger than the [vocab, hidden] fp32 weight gradient backward holds anyway (the head's
    peak stays a small multiple of its weight, whatever the token count), and at most HEAD_CHUNK.
    Each block's GEMM still does `hidden` multiply-adds per weight read. Example: 256 -> 256, 3584 -> 1024."""
    return min(HEAD_CHUNK, hidden_size)


def token_logprobs(hidden, lm_head_weight, targets, temperature=1.0, chunk=None, with_entropy=False):
    """Per-token log-probs of `targets` [T] under logits = hidden [T, H] @ W^T / temperature.

    Same values and gradients as `log_softmax(logits.float(), -1).gather(-1, targets)`, at a peak
    of one or two [chunk, vocab] blocks (chunk: `head_chunk(H)` unless given) instead of several
    [T, vocab] ones. Returns `logp` [T], or `(logp, entropy)` when `with_entropy`. Accumulates in
    fp32 (fp64 for fp64 inputs).
    """
    # no shortcut for T = 0: the empty result stays in the graph, so backward still runs through
    # the trunk (FSDP ranks must join every layer's collectives, with or without response tokens)
    chunk = chunk or head_chunk(hidden.shape[-1])
    logp, entropy = _ChunkedLogprobs.apply(hidden, lm_head_weight, targets, float(temperature), chunk, with_entropy)
    return (logp, entropy) if with_entropy else logp


# -----------------------------------------------------------------------------
# 7. checkpoints

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
                   "generation_config.json")


def _canonical_key(key):
    """transformers 4.52-4.57 save `model.language_model.*` / `model.visual.*`; the released
    checkpoints (and this module) use `model.*` / `visual.*`."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


class CheckpointError(InputError):
    """A checkpoint folder that cannot be loaded: the message names the folder or file, what it
    holds and what is needed."""


PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")  # torch.save files: unpickling them can run code
CONVERT_TO_SAFETENSORS = ("transformers' AutoModelForImageTextToText.from_pretrained(DIR).save_pretrained(NEW_DIR) "
                          "(AutoModelForCausalLM for a text-only Qwen2)")


def _safetensors_files(path):
    """The weight files of a checkpoint folder: model.safetensors, or the shards its
    model.safetensors.index.json names; else CheckpointError saying what the folder holds."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted({os.path.join(path, name) for name in json.load(f)["weight_map"].values()})
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    pickles = sorted(name for name in os.listdir(path) if name.endswith(PICKLE_WEIGHTS))
    if pickles:
        raise CheckpointError(f"{path}: found {', '.join(pickles)}: pickle checkpoints are not loaded; convert to "
                              f"safetensors with {CONVERT_TO_SAFETENSORS}")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _open_safetensors(file):
    """safe_open(file); a file that is missing (a shard the index names) or not safetensors (e.g. a
    pickle renamed model.safetensors) raises CheckpointError naming it."""
    if not os.path.isfile(file):
        raise CheckpointError(f"{file}: no such file, though model.safetensors.index.json names it")
    try:
        return safe_open(file, framework="pt")
    except SafetensorError as e:
        raise CheckpointError(f"not a safetensors file: {file} ({e})") from None


def _architecture(raw):
    """(config parser, model class) of a config.json: Llama 3.2 Vision for model_type "mllama"
    (model_mllama.py, which imports this module, so it is imported here when asked for), else
    Qwen2.5-VL / Qwen2 (ModelConfig.from_hf refuses any other model_type)."""
    if raw.get("model_type") == "mllama":
        import model_mllama
        return model_mllama.MllamaConfig.from_hf, model_mllama.Mllama
    return ModelConfig.from_hf, Qwen25VL


def read_config(path):
    """(config.json as read, parsed config) of a checkpoint folder (`_architecture`); CheckpointError
    naming the folder when there is no config.json or it is one we do not implement."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: no config.json" if os.path.isdir(path) else f"{path}: no such folder")
    with open(file) as f:
        raw = json.load(f)
    try:
        return raw, _architecture(raw)[0](raw)
    except ValueError as e:  # "config.json: model_type 'llava' is not implemented (supported: ...)"
        raise CheckpointError(f"{path}/{e}") from None


def check_checkpoint(path):
    """Refuse, before any work, a checkpoint folder load_model would refuse (CheckpointError):
    read_config's and _safetensors_files' reasons, or a weight file that is not safetensors.
    Reads config.json and the weight files' headers only."""
    read_config(path)
    for file in _safetensors_files(path):
        with _open_safetensors(file):
            pass


def build_model(path):
    """The model of a Hugging Face checkpoint directory on the meta device: config.json parsed, no
    weight read (`load_model` and `load_sharded` fill it in)."""
    raw, config = read_config(path)
    with torch.device("meta"):
        model = _architecture(raw)[1](config)
    model.hf_config, model.source_dir = raw, path
    return model


def _checkpoint_tensors(model, path):
    """(parameter name, safetensors slice) of every tensor in the checkpoint files (single or
    sharded, either key layout: `model.checkpoint_name`; a tied head's stored copy skipped). A slice
    reads only what is indexed: `tensor[:]` the whole tensor, `tensor[a:b]` rows a..b-1."""
    for file in _safetensors_files(path):
        with _open_safetensors(file) as f:
            for key in f.keys():
                name = model.checkpoint_name(key)
                if name is not None:
                    yield name, f.get_slice(key)


def load_model(path, dtype=torch.float32, device="cpu"):
    """Build the model from a Hugging Face checkpoint directory (config.json + single or sharded
    safetensors, either key layout), its weights in `dtype` on `device`, whole on this process."""
    model = build_model(path)
    state = {name: tensor[:].to(device=device, dtype=dtype) for name, tensor in _checkpoint_tensors(model, path)}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def load_sharded(path, device, dtype=torch.float32, param_dtype=None, mesh=None, activation_checkpointing=True,
                 cpu_offload=False):
    """The model for training: `load_model`'s weights, FSDP2-wrapped by `apply_fsdp` (its arguments
    after `dtype`), loaded shard by shard. The model is built on the meta device and wrapped, then
    every rank reads from each checkpoint tensor only the rows of its own shard, into `dtype` on
    `device` (host memory with cpu_offload). No rank ever holds the whole model: loading it whole
    and sharding it after cost every GPU a full fp32 copy of policy and reference at start (~66 GB
    at 7B). A frozen model (GRPO's reference) loads with dtype = param_dtype: it takes no optimizer
    step, so fp32 master weights would buy it nothing.
    One process with nothing to cast (param_dtype None or `dtype`, no offload) gets the plain model:
    FSDP2 would shard nothing and cast nothing there, so the numbers are the same (measured bit for
    bit on the toy runs) without its per-layer hooks, which double the CPU toy's generation time."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world == 1 and param_dtype in (None, dtype) and not cpu_offload:
        model = load_model(path, dtype, device)
        model.activation_checkpointing = activation_checkpointing
        return model
    model = build_model(path).to(dtype)
    apply_fsdp(model, mesh, activation_checkpointing, cpu_offload, param_dtype)
    model.to_empty(device="cpu" if cpu_offload else device)
    unfilled = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in _checkpoint_tensors(model, path):
            if name not in unfilled:
                raise CheckpointError(f"{path}: {name} is not a parameter of the model, or is stored twice")
            param = unfilled.pop(name)
            start, end = _local_rows(param)
            shard, rows = param.to_local(), tensor[start:end]
            if shard.shape != rows.shape:
                raise CheckpointError(f"{path}: {name} rows {start}:{end} have shape {tuple(rows.shape)}, "
                                      f"the shard {tuple(shard.shape)}")
            shard.copy_(rows)
    if unfilled:
        raise CheckpointError(f"{path}: no tensor for {sorted(unfilled)}")
    return model


def _local_rows(param):
    """Rows [start, end) of dim 0 in this rank's shard of an FSDP2 parameter: every mesh dimension
    that shards dim 0 (Shard(0)) cuts it as torch.chunk does, the others replicate it.
    Example: 10 rows over 4 ranks -> chunks of 3: rank 2 holds rows [6, 9), rank 3 rows [9, 10)."""
    start, rows = 0, param.shape[0]
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_shard(0):
            chunk = -(-rows // param.device_mesh.size(mesh_dim))
            first = min(param.device_mesh.get_local_rank(mesh_dim) * chunk, rows)
            start, rows = start + first, min(chunk, rows - first)
    return start, start + rows


def save_model(model, path, max_shard_bytes=5 * 2**30, dtype=None):
    """Write config.json + safetensors shards (+ index) in the released key layout, which
    transformers and vLLM load, and copy the tokenizer/processor files from the source checkpoint.
    Under FSDP2 every rank must call it; rank 0 writes."""
    state = model.state_dict()
    if any(is_dtensor(t) for t in state.values()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if torch.distributed.get_rank() != 0:
            return
    os.makedirs(path, exist_ok=True)
    state = {k: (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k, v in state.items()}
    shards, current, size = [], {}, 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key], size = tensor, size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config = dict(model.hf_config)
    config["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    config.pop("dtype", None)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if model.source_dir and os.path.abspath(model.source_dir) != os.path.abspath(path):
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(model.source_dir, name)):
                shutil.copy(os.path.join(model.source_dir, name), os.path.join(path, name))


# -----------------------------------------------------------------------------
# 8. FSDP2

PARAM_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def compute_dtype(name):
    """The torch dtype of a trainer's `param_dtype` setting (the dtype layers compute in). float16
    is refused: without loss scaling its gradients underflow."""
    if name not in PARAM_DTYPES:
        raise SystemExit(f"param_dtype must be one of {sorted(PARAM_DTYPES)}, got {name!r}")
    return PARAM_DTYPES[name]


def apply_fsdp(model, mesh=None, activation_checkpointing=True, cpu_offload=False, param_dtype=None):
    """Shard every vision block, every decoder layer (`model.sharded_blocks()`, either architecture) and
    the root with FSDP2 `fully_shard` over `mesh` (None: every rank; or HSDP's 2-D mesh,
    `train_utils.data_parallel_mesh`), under one precision policy whatever the world size (one rank
    included): layers compute in `param_dtype` (None: the parameters' own dtype), the fp32 master
    shards are what the optimizer steps, and gradients are reduced in fp32. Qwen2.5-VL's vision
    blocks keep their inputs' dtypes: their RoPE cos/sin stay fp32, as in the unsharded bf16 model
    (FSDP2 would cast them to bf16 with the activations, which already come in `param_dtype` from
    the patch embedding). `cpu_offload` keeps the shards in
    host memory between uses (the frozen reference model in GRPO).
    Build the optimizer from `model.parameters()` after this call and outside any forward.
    FSDP averages gradients over ranks (all of a 2-D mesh's): a loss normalised by the global
    token count is scaled by the world size before backward so that the averaged gradient is the
    global batch's."""
    from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                        register_fsdp_forward_method)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    vision_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for block in model.sharded_blocks() + [model]:
        fully_shard(block, mesh=mesh, mp_policy=vision_policy if isinstance(block, VisionBlock) else policy,
                    offload_policy=offload)
    for method in ("forward_packed", "packed_logprobs"):
        register_fsdp_forward_method(model, method)
    model.activation_checkpointing = activation_checkpointing
    model.sharded = True
    return model


@contextlib.contextmanager
def gathered_params(model):
    """Inside: every FSDP2 module holds its full parameters, so many forward calls (a whole
    generation) pay for one all-gather. After: each module is resharded and gets back its own
    reshard-after-forward setting; FSDP2 keeps the root's parameters gathered from forward to
    backward (one all-gather per step for them), and a root left resharding after forward would
    all-gather them again in every backward. No-op for an unsharded model."""
    from torch.distributed.fsdp import FSDPModule
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if fsdp_modules:
        # FSDP2 makes the first module to run forward the root; generation calls the layers
        # directly, so make the model the root before they run (a no-op once initialised)
        model._get_fsdp_state()._lazy_init()
    # FSDP2 has no getter: a module reshards after forward when its groups have a post-forward mesh
    reshards = [any(g.post_forward_mesh_info is not None for g in _fsdp_param_groups(m)) for m in fsdp_modules]
    for m in fsdp_modules:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m, reshard_after_forward in zip(fsdp_modules, reshards):
            m.set_reshard_after_forward(reshard_after_forward, recurse=False)
            m.reshard()


def _fsdp_param_groups(module):
    """An FSDP2 module's parameter groups: a list in torch 2.13 (`_fsdp_param_groups`), one group
    or None in torch 2.11 (`_fsdp_param_group`), the version GPU images often hold."""
    state = module._get_fsdp_state()
    if hasattr(state, "_fsdp_param_groups"):
        return state._fsdp_param_groups
    return [state._fsdp_param_group] if state._fsdp_param_group is not None else []


def flops_per_token(cfg: ModelConfig, seq_len):
    """Training FLOPs per token of the language model (6N + attention), for MFU."""
    kv_dim = cfg.num_key_value_heads * cfg.head_dim
    attn = 2 * cfg.hidden_size**2 + 2 * cfg.hidden_size * kv_dim
    n = cfg.num_hidden_layers * (attn + 3 * cfg.hidden_size * cfg.intermediate_size)
    n += cfg.vocab_size * cfg.hidden_size
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len

