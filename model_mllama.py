"""Llama 3.2 Vision (Mllama) in plain PyTorch: tiled vision encoder + Llama 3.1 decoder with gated
cross-attention layers, packed forward and the checkpoint names of the released models.

Read top to bottom:
  1. config          MllamaConfig parsed from a Hugging Face config.json (released or transformers 5)
  2. vision encoder  tiles -> patches + class token -> gated position / aspect-ratio embeddings ->
                     local layers -> gated global layers -> final + intermediate features
  3. language model  Llama 3.1 self-attention layers (model.DecoderLayer, `llama3` RoPE) interleaved
                     with tanh-gated cross-attention layers that read the projected image features
  4. the model       forward_packed (padding-free training), forward (transformers-style padded batch)

Everything else is model.py's: `load_model` / `load_sharded` / `save_model` build this model for
a config.json of model_type "mllama", `apply_fsdp` shards it, `token_logprobs` is its head.
Parameter names equal the released checkpoints (`language_model.model.*`, `language_model.lm_head.*`,
`vision_model.*`, `multi_modal_projector.*`); transformers 5's names are mapped onto them on load.

Inputs are the image processor's (MllamaImageProcessor): every image is `max_num_tiles` tiles of
image_size^2 pixels (zero tiles past its own), an aspect-ratio id (1-based index of its tile grid
in `supported_aspect_ratios`, 0 for a padding image), an aspect-ratio mask (1 for its real tiles),
and per text token a cross-attention mask over the tiles of its sequence's images.
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import (Attention, DecoderLayer, GatedMLP, RMSNorm, _not_implemented, _padded_slots, _refuse_other_rope,
                   _refuse_other_values, _required, _rope_dict, _spans, padded_logits, sequence_sdpa, token_logprobs,
                   unpadded, varlen_attention)

# -----------------------------------------------------------------------------
# 1. config

ROPE_TYPES = ("default", "llama3")
ROPE_KEYS = ("rope_type", "type", "rope_theta")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
DEFAULT_ROPE_THETA = 500000.0  # MllamaTextConfig's default in transformers 4.x and 5
TEXT_VALUES = {"hidden_act": "silu", "dropout": 0.0, "tie_word_embeddings": False}  # the only values implemented
VISION_VALUES = {"hidden_act": "gelu"}
VISION_FIELDS = ("hidden_size", "num_hidden_layers", "num_global_layers", "attention_heads", "intermediate_size",
                 "image_size", "patch_size", "num_channels", "norm_eps", "max_num_tiles",
                 "intermediate_layers_indices", "supported_aspect_ratios", "vision_output_dim")


@dataclass
class VisionConfig:
    hidden_size: int  # width of every vision layer (1280 in the released models)
    num_hidden_layers: int  # local encoder layers (32)
    num_global_layers: int  # gated global encoder layers after them (8)
    attention_heads: int
    intermediate_size: int  # the layers' GELU MLP width
    image_size: int  # a tile's side in pixels (560)
    patch_size: int  # a patch's side in pixels (14)
    num_channels: int
    norm_eps: float  # the layers' LayerNorm eps (layernorm_pre/post take nn.LayerNorm's 1e-5, as in transformers)
    max_num_tiles: int  # tiles per image, padding tiles included (4)
    num_aspect_ratios: int  # len(supported_aspect_ratios): aspect-ratio ids 1..this, 0 for a padding image
    intermediate_layers_indices: list  # local layers (0-based) whose outputs join the features ([3, 7, 15, 23, 30])

    @property
    def num_patches(self):
        """Vectors per tile: its patches and the class token (1601 for 560 / 14)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def output_dim(self):
        """Width of a feature: the global encoder's output, then every intermediate layer's (7680)."""
        return self.hidden_size * (1 + len(self.intermediate_layers_indices))


@dataclass
class TextConfig:
    vocab_size: int  # rows of lm_head; embed_tokens has 8 more (the <|image|> token's among them)
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int  # self- and cross-attention layers together (40 at 11B)
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    cross_attention_layers: list  # indices of the layers that cross-attend to the images ([3, 8, ..., 38])
    rope_theta: float
    llama3_scaling: dict | None  # factor, low/high_freq_factor, original_max_position_embeddings; None: plain RoPE
    pad_token_id: int | None  # embed_tokens' padding_idx: its row gets no gradient, as in transformers

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads


@dataclass
class MllamaConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int | None  # <|image|>: where a sequence's images stand in its text

    @staticmethod
    def from_hf(raw: dict) -> "MllamaConfig":
        """Parse a Llama 3.2 Vision config.json in the layouts transformers reads:

          released (4.x)    text_config.rope_scaling {"rope_type": "llama3", "factor", ...} and
                            text_config.rope_theta
          transformers 5    text_config.rope_parameters {"rope_type", "rope_theta", "factor", ...}

        What this model does not implement is refused with one line naming the key, e.g.
        `config.json: text_config.rope_parameters.rope_type 'yarn' is not implemented (supported:
        default, llama3)`.
        """
        if raw.get("model_type") != "mllama":
            raise _not_implemented("model_type", raw.get("model_type"), ["mllama"])
        text, text_key = _section(raw, "text_config"), "text_config.{}".format
        vision, vision_key = _section(raw, "vision_config"), "vision_config.{}".format
        _refuse_other_values(text, text_key, TEXT_VALUES)
        _refuse_other_values(raw, "{}".format, {"tie_word_embeddings": False})
        _refuse_other_values(vision, vision_key, VISION_VALUES)
        hidden_size, heads = _required(text, text_key, "hidden_size"), _required(text, text_key, "num_attention_heads")
        _refuse_other_values(text, text_key, {"head_dim": hidden_size // heads})
        theta, llama3 = _text_rope(text, text_key)
        return MllamaConfig(
            text=TextConfig(
                vocab_size=_required(text, text_key, "vocab_size"),
                hidden_size=hidden_size,
                intermediate_size=_required(text, text_key, "intermediate_size"),
                num_hidden_layers=_required(text, text_key, "num_hidden_layers"),
                num_attention_heads=heads,
                num_key_value_heads=_required(text, text_key, "num_key_value_heads"),
                rms_norm_eps=_required(text, text_key, "rms_norm_eps"),
                cross_attention_layers=list(_required(text, text_key, "cross_attention_layers")),
                rope_theta=theta,
                llama3_scaling=llama3,
                pad_token_id=text.get("pad_token_id"),
            ),
            vision=_vision_config(vision, vision_key),
            image_token_id=raw.get("image_token_index", raw.get("image_token_id")),
        )


def _section(raw, key):
    if not isinstance(raw.get(key), dict):
        raise ValueError(f"config.json: {key} is missing")
    return raw[key]


def _text_rope(text, path_of):
    """(rope_theta, llama3 scaling dict or None) of the decoder. Theta comes from the RoPE dict,
    else `text_config.rope_theta`, else transformers' default 500000. A `llama3` dict needs its
    four scaling keys; a `default` one may hold none of them."""
    path, rope = _rope_dict(text, path_of)
    kind = rope.get("rope_type", rope.get("type", "default"))
    _refuse_other_rope(path, rope, ROPE_TYPES, ROPE_KEYS + LLAMA3_KEYS if kind == "llama3" else ROPE_KEYS)
    theta = float(rope.get("rope_theta", text.get("rope_theta", DEFAULT_ROPE_THETA)))
    if kind != "llama3":
        return theta, None
    for key in LLAMA3_KEYS:
        if rope.get(key) is None:
            raise ValueError(f"config.json: {path}.{key} is missing (rope_type llama3)")
    return theta, {key: rope[key] for key in LLAMA3_KEYS}


def _vision_config(vision, path_of):
    """VisionConfig of `vision_config`, every field required. Refused: non-square or unsplittable
    tiles (an image_size that is not an int multiple of patch_size), intermediate layers out of
    range, and a vision_output_dim other than the features' width (the projector's input)."""
    v = {key: _required(vision, path_of, key) for key in VISION_FIELDS}
    size, patch = v["image_size"], v["patch_size"]
    if not (isinstance(size, int) and isinstance(patch, int) and size % patch == 0):
        raise ValueError(f"config.json: {path_of('image_size')} {size!r} and {path_of('patch_size')} {patch!r} "
                         f"are not implemented (supported: square tiles of whole patches, two ints)")
    layers = v["num_hidden_layers"]
    for index in v["intermediate_layers_indices"]:
        if not -layers <= index < layers:
            raise ValueError(f"config.json: {path_of('intermediate_layers_indices')} {index} is not a layer of "
                             f"{path_of('num_hidden_layers')} {layers}")
    config = VisionConfig(**{key: v[key] for key in VISION_FIELDS if key in VisionConfig.__dataclass_fields__},
                          num_aspect_ratios=len(v["supported_aspect_ratios"]))
    config.intermediate_layers_indices = [index % layers for index in v["intermediate_layers_indices"]]
    _refuse_other_values(vision, path_of, {"vision_output_dim": config.output_dim})
    return config


# -----------------------------------------------------------------------------
# 2. vision encoder

def run_layer(layer, checkpointing, *args):
    """layer(*args); with `checkpointing` (and autograd recording) its activations are recomputed in
    backward instead of kept."""
    if checkpointing and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


def tile_attention_mask(aspect_ratio_mask, num_patches, padded):
    """Which keys each vector of an image attends to in the vision encoder: [I, 1, S, S] bool over
    the image's S = tiles * padded vectors (each tile's num_patches, then zeros up to `padded`).

    transformers' `_prepare_aspect_ratio_attention_mask` builds this as an outer product of
    "is padding" (a padding tile, or a zero vector past num_patches) with itself, so it masks only
    padding-to-padding pairs: real vectors attend to padding ones too, padding ones to every real
    one. The released checkpoints were trained so; replicated as is. Example: one real tile of
    one patch, padded to 2: real [1, 0] -> allowed [[1, 1], [1, 0]]."""
    real = aspect_ratio_mask.bool()[:, :, None] & (torch.arange(padded, device=aspect_ratio_mask.device) < num_patches)
    real = real.flatten(1)
    return (real[:, :, None] | real[:, None, :])[:, None]


class AspectRatioEmbedding(nn.Module):
    """One vector per tile slot, looked up by the image's aspect-ratio id, added after tanh(gate)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.num_aspect_ratios + 1, cfg.max_num_tiles * cfg.hidden_size)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x, aspect_ratio_ids):
        """x: [I, tiles, n, D]; aspect_ratio_ids: [I]."""
        I, tiles, _, D = x.shape
        return x + self.embedding(aspect_ratio_ids).view(I, tiles, 1, D) * self.gate.tanh()


class PositionEmbedding(nn.Module):
    """Per patch position: (1 - tanh g) * a position embedding shared by every tile, plus tanh g *
    a tile-and-position embedding looked up by the image's aspect-ratio id."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(torch.zeros(cfg.num_patches, cfg.hidden_size))
        self.tile_embedding = nn.Embedding(cfg.num_aspect_ratios + 1,
                                           cfg.max_num_tiles * cfg.num_patches * cfg.hidden_size)

    def forward(self, x, aspect_ratio_ids):
        """x: [I, tiles, num_patches, D]; aspect_ratio_ids: [I]."""
        x = x + (1 - self.gate.tanh()) * self.embedding
        return x + self.gate.tanh() * self.tile_embedding(aspect_ratio_ids).view(x.shape)


class TileAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
                                                              for _ in range(4))

    def forward(self, x, allowed):
        """x: [I, S, D]; allowed: [I, 1, S, S] (tile_attention_mask)."""
        I, S, D = x.shape
        q, k, v = (proj(x).view(I, S, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.o_proj(out.transpose(1, 2).reshape(I, S, D))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    """Pre-LayerNorm attention + GELU MLP; a global layer scales both branches by tanh(gate)."""

    def __init__(self, cfg: VisionConfig, gated):
        super().__init__()
        self.self_attn = TileAttention(cfg)
        self.mlp = VisionMLP(cfg)
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        if gated:
            self.gate_attn = nn.Parameter(torch.full((1,), math.pi / 4))
            self.gate_ffn = nn.Parameter(torch.full((1,), math.pi / 4))
        self.gated = gated

    def forward(self, x, allowed):
        h = self.self_attn(self.input_layernorm(x), allowed)
        x = x + (self.gate_attn.tanh() * h if self.gated else h)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * h if self.gated else h)


class VisionEncoder(nn.Module):
    """A stack of VisionLayers (the checkpoints' `transformer` and `global_transformer`); the
    vision model runs them, keeping the intermediate outputs it needs."""

    def __init__(self, cfg: VisionConfig, depth, gated):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg, gated) for _ in range(depth))


class VisionModel(nn.Module):
    """The tiled ViT. Input: pixel_values [I, tiles, C, H, W], aspect_ratio_ids [I],
    aspect_ratio_mask [I, tiles]; output: [I, tiles, num_patches, output_dim] features.

    Both encoders attend over all tiles of an image at once (the "local" one differs from the
    global one by its missing gates and its place before the post-tile embedding, not by its
    reach), each tile padded from num_patches to a multiple of 8 vectors as in transformers."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size,
                                         bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.gated_positional_embedding = PositionEmbedding(cfg)
        self.pre_tile_positional_embedding = AspectRatioEmbedding(cfg)
        self.post_tile_positional_embedding = AspectRatioEmbedding(cfg)
        self.layernorm_pre = nn.LayerNorm(cfg.hidden_size)
        self.layernorm_post = nn.LayerNorm(cfg.hidden_size)
        self.transformer = VisionEncoder(cfg, cfg.num_hidden_layers, gated=False)
        self.global_transformer = VisionEncoder(cfg, cfg.num_global_layers, gated=True)

    def forward(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask, checkpointing=False):
        cfg = self.cfg
        I, tiles = pixel_values.shape[:2]
        if tiles != cfg.max_num_tiles:
            raise ValueError(f"pixel_values has {tiles} tiles per image, the model max_num_tiles {cfg.max_num_tiles}")
        weight = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.flatten(0, 1).to(weight.dtype)).flatten(2).transpose(1, 2)
        x = self.pre_tile_positional_embedding(x.reshape(I, tiles, -1, cfg.hidden_size), aspect_ratio_ids)
        x = torch.cat([self.class_embedding.expand(I, tiles, 1, -1), x], dim=2)
        x = self.layernorm_pre(self.gated_positional_embedding(x, aspect_ratio_ids))
        padded = -(-cfg.num_patches // 8) * 8
        x = F.pad(x, (0, 0, 0, padded - cfg.num_patches)).flatten(1, 2)  # [I, tiles * padded, D]
        allowed = tile_attention_mask(aspect_ratio_mask, cfg.num_patches, padded)
        kept = {}
        for i, layer in enumerate(self.transformer.layers):
            x = run_layer(layer, checkpointing, x, allowed)
            if i in cfg.intermediate_layers_indices:
                kept[i] = x
        x = self.layernorm_post(x).view(I, tiles, padded, -1)
        x = self.post_tile_positional_embedding(x, aspect_ratio_ids).flatten(1, 2)
        for layer in self.global_transformer.layers:
            x = run_layer(layer, checkpointing, x, allowed)
        # transformers stacks the intermediate outputs on a last axis and flattens it: feature d of
        # intermediate k lands at column d * K + k (interleaved, not concatenated)
        intermediate = torch.stack([kept[i] for i in cfg.intermediate_layers_indices], dim=-1).flatten(-2)
        features = torch.cat([x, intermediate], dim=-1).view(I, tiles, padded, -1)
        return features[:, :, :cfg.num_patches]


# -----------------------------------------------------------------------------
# 3. language model

def rope_inv_freq(cfg: TextConfig):
    """RoPE inverse frequencies [head_dim / 2]: theta^(-2i / head_dim), rescaled by Llama 3.1's
    `llama3` rule when set (transformers' ROPE_INIT_FUNCTIONS["llama3"] is the oracle). With
    wavelength w = 2 pi / f and context L = original_max_position_embeddings:
      w < L / high_freq_factor (high frequencies)   f unchanged
      w > L / low_freq_factor  (low frequencies)    f / factor
      in between                                    (1 - s) f / factor + s f,
                                                    s = (L / w - low_freq_factor) / (high - low)
    Example (theta 500000, head_dim 16, factor 8, low 1, high 4, L 64): f = 1, 0.1939, 0.0376, ...
    have w = 6.3 (< 16: stays 1), 32.4 (s = (64 / 32.4 - 1) / 3 = 0.325: 0.0794), 167 (> 64: 0.0047)."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
    if cfg.llama3_scaling is None:
        return inv_freq
    factor, low, high, context = (cfg.llama3_scaling[key] for key in LLAMA3_KEYS)
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    medium = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


@dataclass
class CrossInputs:
    """What every cross-attention layer of one forward reads, computed once per forward."""
    states: torch.Tensor  # [images * tiles * num_patches, hidden]: the projected features, image by image
    spans: list  # (query start, query end, key start, key end) of every sequence that has images
    allowed: list  # per span, bool [queries, keys]: the keys each of its tokens attends to
    sees_image: torch.Tensor  # [T, 1]: 1 for a token that sees a tile, else 0 (its MLP output is dropped)
    attention_scale: float = 1.0  # 0 for the FSDP stand-in image of a batch without images


@dataclass
class ImageCache:
    """Generation's cross-attention inputs of each prompt of a generate call, computed once at its
    prefill and read by every sample of it (`Mllama.prefill_hidden`, `Mllama.decode_hidden`).
    Every response token of a prompt sees the keys its last prompt token sees (transformers'
    generate repeats the mask's last row), so only those are kept, first in their row: a response
    token attends to the first lengths[p] keys, with no mask. A prompt without images keeps one
    zero key and value: its cross-attention output is exactly 0 and its MLP branch is dropped, so
    the layer passes it unchanged, as transformers skips the layer for it."""
    kv: torch.Tensor  # [cross layers, 2 (keys, values), prompts, keys, Hkv, D]: k_norm applied to the keys
    lengths: torch.Tensor  # [prompts] int64 >= 1: how many keys of its row a response token of the prompt reads
    sees_image: torch.Tensor  # [prompts, 1]: 1 where its response tokens see a tile (their MLP branch counts)


class CrossAttention(Attention):
    """Queries from the text, keys and values from the image features: model.Attention's bias-free
    projections (Llama's), plus RMSNorm on each head's queries and keys, no RoPE. `cross_idx`: the
    layer's place among the cross-attention layers (its row of generation's per-prompt cache, `ImageCache`)."""

    def __init__(self, cfg: TextConfig, cross_idx):
        super().__init__(cfg, cross_idx, bias=False)
        self.cross_idx = cross_idx
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def key_values(self, states):
        """Keys (k_norm applied) and values [N, Hkv, head_dim] of image states [N, hidden]."""
        k = self.k_norm(self.k_proj(states).view(states.shape[0], self.num_kv_heads, -1))
        return k, self.v_proj(states).view(states.shape[0], self.num_kv_heads, -1)

    def attend_spans(self, q, k, v, cross: CrossInputs):
        """Each sequence's tokens attend to its own images' keys (`cross.spans`); the tokens of a
        sequence without images get zeros. q [T, Hq, D]; k, v [N, Hkv, D] over cross.states."""
        # query head h reads key head h // groups; expanded here, not by SDPA's enable_gqa, which
        # can send a masked call on CUDA to the math kernel (O(queries x keys) memory per head)
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = torch.zeros_like(q)
        for (qs, qe, ks, ke), allowed in zip(cross.spans, cross.allowed):
            out[qs:qe] = sequence_sdpa(q[qs:qe], k[ks:ke], v[ks:ke], attn_mask=allowed)
        return out

    def forward(self, x, cross: CrossInputs, attend=None):
        """`attend(self, q, cross)` -> [T, Hq, D] replaces the attention over cross.states' keys
        (`attend_spans`): generation's, over keys cached once per prompt."""
        T = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(T, self.num_heads, -1))
        out = self.attend_spans(q, *self.key_values(cross.states), cross) if attend is None else attend(self, q, cross)
        return self.o_proj(out.reshape(T, -1))


class CrossAttentionDecoderLayer(nn.Module):
    """x + tanh(g_attn) * cross_attn(norm(x)), then + tanh(g_mlp) * sees_image * mlp(norm(x)):
    the MLP branch is dropped for tokens that see no tile, the attention branch is not."""

    def __init__(self, cfg: TextConfig, cross_idx):
        super().__init__()
        self.cross_attn = CrossAttention(cfg, cross_idx)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x, cross: CrossInputs, attend=None):
        attention = self.cross_attn(self.input_layernorm(x), cross, attend)
        x = x + self.cross_attn_attn_gate.tanh() * cross.attention_scale * attention
        return x + self.cross_attn_mlp_gate.tanh() * (cross.sees_image * self.mlp(self.post_attention_layernorm(x)))


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size + 8, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        cross = cfg.cross_attention_layers
        self.layers = nn.ModuleList(
            CrossAttentionDecoderLayer(cfg, cross.index(i)) if i in cross else DecoderLayer(cfg, i, qkv_bias=False)
            for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LanguageModel(nn.Module):
    """The checkpoints' `language_model`: the decoder and its untied head."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.model = TextModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


# -----------------------------------------------------------------------------
# 4. the model

V5_PREFIXES = {"model.language_model.": "language_model.model.", "model.vision_model.": "vision_model.",
               "model.multi_modal_projector.": "multi_modal_projector.", "lm_head.": "language_model.lm_head."}


class Mllama(nn.Module):
    def __init__(self, cfg: MllamaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionModel(cfg.vision)
        self.multi_modal_projector = nn.Linear(cfg.vision.output_dim, cfg.text.hidden_size)
        self.language_model = LanguageModel(cfg.text)
        self.activation_checkpointing = False
        self.sharded = False  # set by model.apply_fsdp
        self.hf_config = None  # the raw config.json dict, written back by model.save_model
        self.source_dir = None  # where tokenizer/processor files are copied from on save

    @property
    def head_weight(self):
        return self.language_model.lm_head.weight

    @staticmethod
    def checkpoint_name(key):
        """The parameter a checkpoint tensor fills: released names as they are, transformers 5's
        (`model.language_model.*`, `model.vision_model.*`, `model.multi_modal_projector.*`,
        `lm_head.*`) mapped back as its conversion_mapping for mllama maps them forward."""
        for new, released in V5_PREFIXES.items():
            if key.startswith(new):
                return released + key[len(new):]
        return key

    def sharded_blocks(self):
        """The modules model.apply_fsdp shards one by one: decoder layers, local and global vision layers."""
        vision = self.vision_model
        return [*self.language_model.model.layers, *vision.transformer.layers, *vision.global_transformer.layers]

    # --- pieces ---------------------------------------------------------------------------

    def image_states(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
        """Projected features [I * tiles * num_patches, hidden] of the images, image by image: the
        keys and values of every cross-attention layer come from these."""
        features = self.vision_model(pixel_values, aspect_ratio_ids, aspect_ratio_mask, self.activation_checkpointing)
        return self.multi_modal_projector(features).flatten(0, 2)

    def padding_image(self, device):
        """One padding image as the image processor pads a batch: zero tiles, aspect-ratio id 0,
        only its first tile marked real."""
        v = self.cfg.vision
        pixels = torch.zeros(1, v.max_num_tiles, v.num_channels, v.image_size, v.image_size, device=device)
        mask = torch.zeros(1, v.max_num_tiles, dtype=torch.long, device=device)
        mask[:, 0] = 1
        return pixels, torch.zeros(1, dtype=torch.long, device=device), mask

    def cross_inputs(self, cu_seqlens, dtype, pixel_values, aspect_ratio_ids, aspect_ratio_mask,
                     cross_attention_mask, image_counts):
        """CrossInputs of a packed batch whose sequence i owns the next image_counts[i] images, and
        whose token t sees tile j of its sequence's n-th image where cross_attention_mask[t, n, j].
        None without images: the cross-attention layers are then skipped, as transformers skips them.

        A token that sees no tile (one before its sequence's first <|image|>) keeps transformers'
        behaviour: `_prepare_cross_attention_mask` multiplies such a row of the additive mask by
        0, which unmasks it, so the token attends to every key of its sequence (padding tiles,
        and in a padded batch the padding images, included) by its scores; only the MLP branch
        is dropped for it. The released checkpoints were trained so."""
        T = int(cu_seqlens[-1])
        attention_scale = 1.0
        if pixel_values is None:
            if not self.sharded:
                return None
            # FSDP: every rank runs every layer's collectives and gives every parameter a gradient,
            # images or not: the first sequence gets a padding image, and its attention weight 0
            pixel_values, aspect_ratio_ids, aspect_ratio_mask = self.padding_image(cu_seqlens.device)
            image_counts = [1] + [0] * (len(cu_seqlens) - 2)
            cross_attention_mask = torch.zeros(T, 1, self.cfg.vision.max_num_tiles, device=cu_seqlens.device)
            attention_scale = 0.0
        image_counts = [int(n) for n in image_counts]
        if len(image_counts) != len(cu_seqlens) - 1 or sum(image_counts) != pixel_values.shape[0]:
            raise ValueError(f"image_counts {image_counts} do not split {pixel_values.shape[0]} images among "
                             f"{len(cu_seqlens) - 1} sequences")
        if cross_attention_mask.shape[0] != T or cross_attention_mask.shape[1] < max(image_counts):
            raise ValueError(f"cross_attention_mask {tuple(cross_attention_mask.shape)} does not cover {T} tokens "
                             f"and {max(image_counts)} images per sequence")
        states = self.image_states(pixel_values, aspect_ratio_ids, aspect_ratio_mask).to(dtype)
        keys_per_image = self.cfg.vision.max_num_tiles * self.cfg.vision.num_patches
        spans, allowed = [], []
        sees_image = states.new_zeros(T, 1)
        first_image = 0
        for (qs, qe), n in zip(_spans(cu_seqlens), image_counts):
            if n:
                tiles_seen = cross_attention_mask[qs:qe, :n].bool()
                keys_seen = tiles_seen.repeat_interleave(self.cfg.vision.num_patches, dim=2).flatten(1)
                sees_image[qs:qe, 0] = keys_seen.any(1).to(dtype)
                spans.append((qs, qe, first_image * keys_per_image, (first_image + n) * keys_per_image))
                allowed.append(keys_seen | ~keys_seen.any(1, keepdim=True))  # no tile seen: every key, see above
            first_image += n
        return CrossInputs(states, spans, allowed, sees_image, attention_scale)

    def rope_cos_sin(self, cu_seqlens, dtype):
        """cos/sin [T, head_dim] of positions restarting at 0 in every packed sequence."""
        _, positions = _padded_slots(cu_seqlens, (cu_seqlens[1:] - cu_seqlens[:-1]).long())
        freqs = positions[:, None].float() * rope_inv_freq(self.cfg.text).to(positions.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _trunk(self, input_ids, cu_seqlens, pixel_values=None, aspect_ratio_ids=None, aspect_ratio_mask=None,
               cross_attention_mask=None, image_counts=None):
        text = self.language_model.model
        x = text.embed_tokens(input_ids)
        cu = cu_seqlens.to(device=x.device, dtype=torch.int32)
        cross = self.cross_inputs(cu, x.dtype, pixel_values, aspect_ratio_ids, aspect_ratio_mask,
                                  cross_attention_mask, image_counts)
        cos, sin = self.rope_cos_sin(cu, x.dtype)

        def attend(_, q, k, v):
            return varlen_attention(q, k, v, cu, causal=True)

        for layer in text.layers:
            if not isinstance(layer, CrossAttentionDecoderLayer):
                x = run_layer(layer, self.activation_checkpointing, x, cos, sin, attend)
            elif cross is not None:
                x = run_layer(layer, self.activation_checkpointing, x, cross)
        return text.norm(x)

    # --- training: padding-free ----------------------------------------------------------

    def forward_packed(self, input_ids, cu_seqlens, pixel_values=None, aspect_ratio_ids=None, aspect_ratio_mask=None,
                       cross_attention_mask=None, image_counts=None):
        """Hidden states [T, H] of sequences concatenated into `input_ids` [T], split by
        `cu_seqlens` [B+1]; positions restart and self-attention stops at every boundary.
        Images: pixel_values [I, tiles, C, H, W], aspect_ratio_ids [I], aspect_ratio_mask
        [I, tiles], all sequences' images in sequence order; image_counts [B]: how many belong to
        each sequence; cross_attention_mask [T, N, tiles] (N >= max image_counts): the tiles of its
        own sequence's n-th image each token sees. A sequence cross-attends to its own images
        only, and one without images passes the cross-attention layers unchanged: each sequence
        gets what transformers gives it run alone."""
        return self._trunk(input_ids, cu_seqlens, pixel_values, aspect_ratio_ids, aspect_ratio_mask,
                           cross_attention_mask, image_counts)

    def packed_logprobs(self, input_ids, cu_seqlens, targets, pixel_values=None, aspect_ratio_ids=None,
                        aspect_ratio_mask=None, cross_attention_mask=None, image_counts=None, temperature=1.0,
                        with_entropy=False, positions=None):
        """Log-probs of `targets` under the next-token distributions of a packed batch (as
        `forward_packed`) via the chunked head (model.token_logprobs): at every position, or only
        at `positions`. A method of the model so FSDP2 gathers the head."""
        hidden = self._trunk(input_ids, cu_seqlens, pixel_values, aspect_ratio_ids, aspect_ratio_mask,
                             cross_attention_mask, image_counts)
        if positions is not None:
            hidden = hidden.index_select(0, positions)
        return token_logprobs(hidden, self.head_weight, targets, temperature, with_entropy=with_entropy)

    # --- generation: generate.py's engine ------------------------------------------------

    def new_image_cache(self, prompts, dtype, device):
        """An empty ImageCache for the prompts of one generate call (`data.ChatProcessor.encode_prompt`
        dicts), as wide as the prompt with the most images; None when none has an image."""
        counts = [len(p.get("aspect_ratio_ids", ())) for p in prompts]
        if not any(counts):
            return None
        text, keys_per_image = self.cfg.text, self.cfg.vision.max_num_tiles * self.cfg.vision.num_patches
        keys = max(counts) * keys_per_image
        return ImageCache(
            kv=torch.zeros(len(text.cross_attention_layers), 2, len(prompts), keys, text.num_key_value_heads,
                           text.head_dim, dtype=dtype, device=device),
            lengths=torch.ones(len(prompts), dtype=torch.long, device=device),
            sees_image=torch.zeros(len(prompts), 1, dtype=dtype, device=device))

    def slot_cache_config(self):
        """The text config as generate.py's slot cache sees it: the self-attention layers alone (the
        cross-attention layers' keys/values are per prompt, ImageCache). 11B: 32 of 40 layers."""
        text = self.cfg.text
        return dataclasses.replace(text, num_hidden_layers=text.num_hidden_layers - len(text.cross_attention_layers),
                                   cross_attention_layers=[])

    def _generation_layers(self, x, cos, sin, attend, cross, cross_attend):
        """The decoder as plain calls of the layers' forward (no FSDP hook per call, as generate.py's
        run_decoder); `attend` gets the self-attention layers numbered 0, 1, ... among themselves
        (their slot-cache index, `slot_cache_config`); the cross-attention layers are skipped when
        `cross` is None, as in `_trunk`."""
        text = self.language_model.model
        cached = 0
        for layer in text.layers:
            if not isinstance(layer, CrossAttentionDecoderLayer):
                x = DecoderLayer.forward(layer, x, cos, sin, lambda _, q, k, v, index=cached: attend(index, q, k, v))
                cached += 1
            elif cross is not None:
                x = CrossAttentionDecoderLayer.forward(layer, x, cross, cross_attend)
        return text.norm(x)

    def prefill_hidden(self, input_ids, cu_seqlens, tiles, attend, cache, rows):
        """Final-norm hidden states [T, H] of prompts packed as in `forward_packed` (`tiles`: their
        data.concat_tiles inputs), self-attention through `attend` (generate.py's fan-out into the
        slots). Each cross-attention layer's keys and values of prompt i's images are computed
        here, once, and the ones its response tokens see stored in row rows[i] of `cache`."""
        x = self.language_model.model.embed_tokens(input_ids)
        cos, sin = self.rope_cos_sin(cu_seqlens, x.dtype)
        if not tiles:
            return self._generation_layers(x, cos, sin, attend, None, None)
        tiles = {key: value.to(x.device) if torch.is_tensor(value) else value for key, value in tiles.items()}
        cross = self.cross_inputs(cu_seqlens, x.dtype, **tiles)
        with_images = [row for row, n in zip(rows, tiles["image_counts"]) if n]
        seen = [allowed[-1].nonzero()[:, 0] + ks for (_, _, ks, _), allowed in zip(cross.spans, cross.allowed)]
        for row, (_, qe, _, _), keys in zip(with_images, cross.spans, seen):
            cache.lengths[row], cache.sees_image[row] = len(keys), cross.sees_image[qe - 1]

        def store_and_attend(module, q, cross):
            k, v = module.key_values(cross.states)
            for row, keys in zip(with_images, seen):
                cache.kv[module.cross_idx, 0, row, :len(keys)] = k[keys]
                cache.kv[module.cross_idx, 1, row, :len(keys)] = v[keys]
            return module.attend_spans(q, k, v, cross)
        return self._generation_layers(x, cos, sin, attend, cross, store_and_attend)

    def decode_hidden(self, tokens, cos, sin, attend, cache, rows, attend_images):
        """Final-norm hidden states [R, H] of one new token per row (`tokens` [R], rope cos/sin [R,
        head_dim]) of the prompts rows [R] of `cache`: self-attention through `attend` (the slots'
        KV cache), cross-attention through `attend_images(q, k_cache, v_cache, lengths, rows)`
        over the cached image keys and values of each row's prompt (generate.cached_image_attention)."""
        x = self.language_model.model.embed_tokens(tokens)
        if cache is None:
            return self._generation_layers(x, cos, sin, attend, None, None)
        cross, lengths = CrossInputs(None, None, None, cache.sees_image[rows]), cache.lengths[rows]

        def cached(module, q, cross):
            return attend_images(q, cache.kv[module.cross_idx, 0], cache.kv[module.cross_idx, 1], lengths, rows)
        return self._generation_layers(x, cos, sin, attend, cross, cached)

    # --- the transformers-style call ----------------------------------------------------

    def forward(self, input_ids, attention_mask=None, pixel_values=None, aspect_ratio_ids=None,
                aspect_ratio_mask=None, cross_attention_mask=None):
        """Logits [B, T, V] of a right-padded batch in the image processor's layout: pixel_values
        [B, N, tiles, C, H, W], aspect_ratio_ids [B, N], aspect_ratio_mask [B, N, tiles],
        cross_attention_mask [B, T, N, tiles]. As in transformers every sample owns all N image
        slots, its padding images included (what its tokens that see no tile attend to)."""
        keep, cu = unpadded(input_ids, attention_mask)
        images = ()
        if pixel_values is not None:
            if cross_attention_mask is None:
                raise ValueError("pixel_values need a cross_attention_mask")
            B, N = pixel_values.shape[:2]
            images = (pixel_values.flatten(0, 1), aspect_ratio_ids.flatten(), aspect_ratio_mask.flatten(0, 1),
                      cross_attention_mask[keep], [N] * B)
        hidden = self._trunk(input_ids[keep], cu, *images)
        return padded_logits(hidden, self.head_weight, keep)
