"""Sampling from our Qwen2.5-VL and Llama 3.2 Vision: a rollout engine with a bounded KV cache, continuous batching, a decode
step without host synchronisation, and samples that do not depend on the schedule.

    python generate.py --model DIR --prompts FILE.jsonl --out FILE.jsonl [--greedy] [--n K]
        [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K] [--seed S] [--system TEXT]

A prompt line is a problem record (`id`, `images` relative to the file, `question`); the prompt is
the checkpoint's chat template over one user turn (the images, then the question) plus the
generation prompt. Each output line is {"id", "sample", "token_ids", "text", "finish_reason"}.

How `generate` runs P prompts x n samples (GRPO's groups) within a budget of cached tokens:
  slots      the cache is one tensor of S slots of (longest prompt + max_new_tokens) positions,
             S = budget // slot length; it is allocated once and never grows or shrinks
  admission  waiting samples take free slots, in prompt order. A prompt's first admission prefills it
             (vision tower + decoder, prompts packed) and writes its keys/values into every slot
             its samples took; a later sample of the same prompt copies them from a sibling's slot
  decode     one token per live slot per step, live slots kept at 0 .. B-1 (a finished row's slot
             takes the next waiting sample, or the last live row when none waits), so a step is a
             fixed-shape function of the slots' state, capturable as a CUDA graph
  check      every `check_every` steps the host reads which rows finished (an EOS id, "stop", or
             max_new_tokens, "length"); a row stops advancing on the device when it finishes, so
             steps between two checks waste compute, never tokens
  images     Llama 3.2 Vision (model_mllama.py): a prompt's first prefill also runs the vision encoder
             and each cross-attention layer's key/value projections over its images, once, into a
             per-prompt cache (model_mllama.ImageCache, beside the budget) that every sample of it reads
  noise      sample j of prompt i draws decode position t from a counter-based stream keyed by
             (seed, prompt id i, j, t), hashed on the device: its tokens do not depend on its slot,
             the budget, the check interval, the other prompts or the number of ranks

Under FSDP2 the language model's parameters are gathered once per call and the decoder runs as plain
calls of the layers' forward: no FSDP hook and no vision work in a decode step.
"""

import argparse
import functools
import json
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import data
import model as M
from model_mllama import Mllama
from train_utils import at_least, command_line

try:  # GPU-only kernel; the SDPA path below is its CPU twin
    from flash_attn import flash_attn_with_kvcache
except ImportError:
    flash_attn_with_kvcache = None

VISION_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
CPU_KV_BUDGET = 2**18  # cached tokens on CPU: every rollout of the toy runs fits at once


# -----------------------------------------------------------------------------
# 1. sampling

def sample_next(logits, temperature=1.0, top_p=1.0, top_k=0, greedy=False, banned=None, uniform=None):
    """Next token of every row of `logits` [R, V] and its log-prob; returns (tokens [R], logprobs [R]).

    The token is drawn from softmax(logits / temperature) with the `banned` ids removed, cut to the
    top_k most likely tokens (0: no cut), then to the smallest most-likely set whose mass reaches
    top_p (1.0: no cut), renormalised: transformers' order (temperature, top-k, top-p). `greedy`
    takes the argmax instead. The returned log-prob is log_softmax(logits / temperature)[token], the
    full tempered distribution before the ban and the cuts: the quantity GRPO's ratio uses and that
    `Qwen25VL.packed_logprobs(..., temperature)` recomputes in training. `uniform` [R] float64 in
    (0, 1) is each row's noise (`stream_uniform`); greedy needs none.

    The draw inverts the cumulative distribution: the first token whose running mass reaches u times
    the kept mass. One number per row, where a race over the vocabulary needs one per token; the sums
    run in float64, so at vocab 152K no token's share is lost to rounding.

    Example: logits [2, 1, 0, -1], temperature 1 -> p = [.64, .24, .09, .03]; top_p 0.8 keeps
    tokens 0 and 1 (the mass before token 1 is .64 < .8, before token 2 it is .88), whose running
    mass is [.64, .88]: u < .64 / .88 = .73 draws token 0, a larger u token 1.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (use greedy for argmax decoding)")
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    scores = logprobs if banned is None else logprobs.index_fill(-1, banned, float("-inf"))
    # max(-1).indices, not argmax: the same first-maximum index, several times faster on CPU
    if greedy:
        tokens = scores.max(-1).indices
    else:
        if top_k > 0:
            kth_best = scores.topk(min(top_k, scores.shape[-1])).values[:, -1:]
            scores = scores.masked_fill(scores < kth_best, float("-inf"))
        if top_p < 1.0:
            ranked, order = scores.sort(-1, descending=True)
            probs = ranked.softmax(-1)
            mass_before = probs.cumsum(-1) - probs
            scores = scores.scatter(-1, order, ranked.masked_fill(mass_before >= top_p, float("-inf")))
        # a cut token adds 0 to the running mass, so the first index reaching u * kept (> 0) is a kept
        # token; searchsorted needs no host sync, as CUDA graphs need
        running = scores.exp().double().cumsum_(-1)  # exp in float32: float64's is twice as slow on CPU
        tokens = torch.searchsorted(running, uniform[:, None] * running[:, -1:])[:, 0]
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


MASK32, MASK64 = 2**32 - 1, 2**64 - 1


def _mix32(x):
    """A bijective 32-bit integer hash (xorshift-multiply, two rounds), in place, of an int64 tensor
    holding values below 2^32. The odd multipliers are below 2^31, so no product overflows int64 and
    the same bits come out on every device and under torch.compile."""
    x ^= x >> 16
    x.mul_(0x21F0AAAD).bitwise_and_(MASK32)
    x ^= x >> 15
    x.mul_(0x735A2D97).bitwise_and_(MASK32)
    x ^= x >> 15
    return x


def stream_key(seed, prompt_id, sample):
    """The 63-bit key of one sample's noise stream: splitmix64 over (seed, prompt id, sample index),
    on the host. Example: stream_key(0, 3, 1) != stream_key(0, 1, 3); any ints, negative ones too."""
    h = 0
    for value in (seed, prompt_id, sample):
        h = (h ^ (value & MASK64)) + 0x9E3779B97F4A7C15 & MASK64
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & MASK64
        h ^= h >> 31
    return h >> 1


def stream_uniform(keys, counts):
    """Uniform noise [R] float64 in (0, 1) for decode position counts[r] of the streams keys[r]: a
    pure function of (key, position), hashed on the device. Two differently salted 32-bit hashes of
    (position, key) give 26 bits each; the draw is one of the 2^52 midpoints (k + 0.5) / 2^52, exact
    in float64, so never 0 or 1. keys, counts: int64 [R]."""
    low, high = keys & MASK32, keys >> 32

    def word(salt):
        return _mix32(_mix32(_mix32((counts ^ salt) & MASK32) ^ low) ^ high) >> 6
    bits = word(0) << 26 | word(0x9E3779B9)
    return bits.double().add_(0.5).mul_(2.0**-52)


def draw(logits, keys, counts, *, temperature, top_p, top_k, greedy, banned):
    """`sample_next` with each row's noise from its stream (`stream_uniform`): the sampler of a step."""
    uniform = None if greedy else stream_uniform(keys, counts)
    return sample_next(logits, temperature, top_p, top_k, greedy, banned, uniform)


def vision_token_ids(model):
    """Ids only the processor may place (image/video pads, vision start/end) that the head can
    produce: never sampled. (Llama 3.2 Vision's <|image|> is an embedding row past the head's.)"""
    raw = model.hf_config or {}
    ids = {raw.get(key) for key in VISION_TOKEN_KEYS} | {model.cfg.image_token_id,
                                                         getattr(model.cfg, "vision_start_token_id", None)}
    return sorted(i for i in ids if i is not None and i < model.head_weight.shape[0])


def decoder_config(model):
    """The config of the decoder whose keys/values the slots cache: Qwen's, or Llama 3.2 Vision's
    self-attention layers."""
    return model.slot_cache_config() if isinstance(model, Mllama) else model.cfg


def text_rope(model, length, dtype, device):
    """cos/sin tables [length, head_dim] of text positions 0 .. length - 1: Qwen's mRoPE with its
    three channels equal, or Llama's 1-D RoPE (llama3 scaling)."""
    if isinstance(model, Mllama):
        return model.rope_cos_sin(torch.tensor([0, length], device=device), dtype)
    return model.rope_cos_sin(torch.arange(length, device=device).expand(3, -1), dtype)


# -----------------------------------------------------------------------------
# 2. the slot pool: kv [layers, 2 (keys, values), slots, slot_len, Hkv, head_dim], slot s filled up to lengths[s]

def kv_bytes_per_token(cfg, dtype):
    """Bytes one cached token takes: layers x 2 (K, V) x kv heads x head_dim x dtype bytes.
    Qwen2.5-VL-7B in bf16: 28 x 2 x 4 x 128 x 2 = 57,344 (56 KiB)."""
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * torch.finfo(dtype).bits // 8


def kv_budget_tokens(cfg, dtype, gib=0.0, device="cpu"):
    """A cache budget in tokens: `gib` GiB of K/V in `dtype`; gib 0: half the GPU memory `device`
    has free now, counting as free what PyTorch's allocator holds cached but unused (after an update,
    the freed gradients and activations stay reserved, and `mem_get_info` alone would see the budget
    shrink from the second step on); CPU_KV_BUDGET tokens on CPU.
    Example: 7B in bf16, 32 GiB -> 599,186 tokens."""
    if gib > 0:
        return int(gib * 2**30) // kv_bytes_per_token(cfg, dtype)
    if torch.device(device).type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free // 2 // kv_bytes_per_token(cfg, dtype)
    return CPU_KV_BUDGET


@dataclass
class SlotPool:
    """The decode state of every slot, on the device. A live slot holds one sample: its prompt and the
    tokens fed so far in `kv` positions [0, lengths), the last sampled token in `tokens` (fed at the
    next step, at RoPE position `positions`), its stream key, how many tokens it has sampled
    (`counts`, the decode position of its next draw) and the sampled tokens and log-probs so far.
    A slot that is `done` (finished, or free) no longer advances. Llama 3.2 Vision: `prompt` is the
    slot's row of the call's model_mllama.ImageCache, which holds each prompt's cross-attention
    keys/values once for all its samples."""

    kv: torch.Tensor  # [layers, 2, slots, slot_len, Hkv, D]
    tokens: torch.Tensor  # [slots] int64
    lengths: torch.Tensor  # [slots] int64
    positions: torch.Tensor  # [slots] int64
    keys: torch.Tensor  # [slots] int64
    counts: torch.Tensor  # [slots] int64
    done: torch.Tensor  # [slots] bool
    out_tokens: torch.Tensor  # [slots, max_new_tokens] int64
    out_logprobs: torch.Tensor  # [slots, max_new_tokens] float32
    index: torch.Tensor  # arange(slots): row indices for the step's scatters
    prompt: torch.Tensor  # [slots] int64: the live slot's prompt (its row of the ImageCache)


def new_slot_pool(cfg, slots, slot_len, max_new_tokens, dtype, device):
    """Every slot free. The cache is zeros, not empty: SDPA reads the masked tail of shorter rows, and
    NaN garbage there would leak through the mask (0 * NaN = NaN)."""
    kv = torch.zeros(cfg.num_hidden_layers, 2, slots, slot_len, cfg.num_key_value_heads, cfg.head_dim,
                     dtype=dtype, device=device)
    state = [torch.zeros(slots, dtype=torch.long, device=device) for _ in range(5)]
    return SlotPool(kv, *state, done=torch.ones(slots, dtype=torch.bool, device=device),
                    out_tokens=torch.zeros(slots, max_new_tokens, dtype=torch.long, device=device),
                    out_logprobs=torch.zeros(slots, max_new_tokens, device=device),
                    index=torch.arange(slots, device=device),
                    prompt=torch.zeros(slots, dtype=torch.long, device=device))


def prefill_attention(kv, cu_seqlens, fan_src, fan_slot, fan_pos):
    """The `attend` of the packed prompt forward: causal attention inside each prompt, and every
    prompt token's key/value (packed index fan_src) copied to cache slot fan_slot at position fan_pos,
    once for each slot that takes the prompt."""
    def attend(layer, q, k, v):
        kv[layer, 0, fan_slot, fan_pos] = k[fan_src]
        kv[layer, 1, fan_slot, fan_pos] = v[fan_src]
        return M.varlen_attention(q, k, v, cu_seqlens, causal=True)
    return attend


def cached_attention(q, k, v, k_cache, v_cache, lengths, span):
    """One new token per row: store its key/value at position lengths[r] of row r, then attend over
    the row's lengths[r] + 1 cached positions. q [R, Hq, D]; k, v [R, Hkv, D]; caches [R, L, Hkv, D];
    the SDPA path reads positions < `span` only (span > max(lengths); the flash path reads each row's own)."""
    if M.use_flash(q):  # CUDA with flash-attn, unless --attention sdpa
        return flash_attn_with_kvcache(q[:, None], k_cache, v_cache, k[:, None], v[:, None],
                                       cache_seqlens=lengths.to(torch.int32), causal=True)[:, 0]
    rows = torch.arange(k.shape[0], device=q.device)
    k_cache[rows, lengths] = k
    v_cache[rows, lengths] = v
    visible = torch.arange(span, device=q.device) <= lengths[:, None]  # [R, span]
    return row_attention(q, k_cache[:, :span], v_cache[:, :span], visible)


def row_attention(q, k, v, visible):
    """SDPA of one query per row over its own keys: q [R, Hq, D]; k, v [R, L, Hkv, D]; visible [R, L].
    The Hq / Hkv query heads that share a key/value head attend as that head's queries (query head
    h reads key head h // (Hq / Hkv)): the cache is read as is, never repeated per query head."""
    R, _, Hkv, D = k.shape
    out = F.scaled_dot_product_attention(q.view(R, Hkv, -1, D), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=visible[:, None, None, :])
    return out.reshape(R, -1, D)


def cached_image_attention(q, k_cache, v_cache, lengths, rows):
    """Llama 3.2 Vision's cross-attention of one new token per row over the image keys/values its
    prompt stored once (model_mllama.ImageCache): row r reads positions < lengths[r] of cache row
    rows[r]. q [R, Hq, D]; caches [prompts, K, Hkv, D]; lengths, rows [R] int64. The flash path
    reads the cache rows in place (cache_batch_idx); the SDPA path gathers them."""
    if M.use_flash(q):
        return flash_attn_with_kvcache(q[:, None], k_cache, v_cache, cache_seqlens=lengths.to(torch.int32),
                                       cache_batch_idx=rows.to(torch.int32))[:, 0]
    visible = torch.arange(k_cache.shape[1], device=q.device) < lengths[:, None]
    return row_attention(q, k_cache[rows], v_cache[rows], visible)


def run_decoder(model, x, cos, sin, attend):
    """The decoder stack as plain calls of DecoderLayer.forward: on an FSDP2-wrapped model (its
    parameters gathered) no FSDP hook runs per layer call. Returns the final-norm hidden states."""
    for layer in model.model.layers:
        x = M.DecoderLayer.forward(layer, x, cos, sin, attend)
    return model.model.norm(x)


def decode_step(model, pool, B, sampler, eos, rope, span, image_cache=None):
    """One token for each of the slots 0 .. B-1, in place, with fixed shapes and no host sync: the
    function a CUDA graph captures. Feeds each slot's last token (its key/value written at position
    lengths[s]), draws the next one with `sampler(logits, keys, counts)`, records it at index counts[s],
    and advances the slots that were not done; a slot is done once it draws an `eos` id or its
    out_tokens row is full. `rope`: the cos/sin tables of text positions (all three mRoPE channels
    equal, or Llama's). `image_cache`: Llama 3.2 Vision's model_mllama.ImageCache (None: no prompt
    of the call has an image). Returns (tokens [B], logprobs [B]) as drawn, done slots' included."""
    tokens, lengths, positions = pool.tokens[:B], pool.lengths[:B], pool.positions[:B]
    keys, counts, done, rows = pool.keys[:B], pool.counts[:B], pool.done[:B], pool.index[:B]
    cos, sin = rope[0][positions], rope[1][positions]

    def attend(layer, q, k, v):
        return cached_attention(q, k, v, pool.kv[layer, 0, :B], pool.kv[layer, 1, :B], lengths, span)
    if isinstance(model, Mllama):
        hidden = model.decode_hidden(tokens, cos, sin, attend, image_cache, pool.prompt[:B], cached_image_attention)
    else:
        hidden = run_decoder(model, model.model.embed_tokens(tokens), cos, sin, attend)
    next_tokens, logprobs = sampler(hidden @ model.head_weight.t(), keys, counts)

    live = ~done
    at = counts.clamp(max=pool.out_tokens.shape[1] - 1)  # a done row's index may be one past the end
    pool.out_tokens[rows, at] = torch.where(live, next_tokens, pool.out_tokens[rows, at])
    pool.out_logprobs[rows, at] = torch.where(live, logprobs, pool.out_logprobs[rows, at])
    stop = (next_tokens[:, None] == eos).any(-1) | (counts + 1 >= pool.out_tokens.shape[1])
    step = live.long()
    done |= stop
    counts += step
    lengths += step
    positions += step
    tokens.copy_(torch.where(live, next_tokens, tokens))
    return next_tokens, logprobs


def capture_cuda_graph(fn, memory=None):
    """`fn` (no arguments, CUDA work only) captured as a CUDA graph after one warm-up run on a side
    stream (kernel selection, workspaces); graphs captured with the same `memory` pool share it.
    Returns (replay, memory pool)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=memory):
        fn()
    return graph.replay, graph.pool()


class GraphedDecodeSteps:
    """`decode_step` captured once per pool size (powers of two up to the pool) while every slot is
    done, so that capturing (and its warm-up) changes no sample. A call for B live slots replays the
    smallest size >= B; the slots above B are free, hence done: they only rewrite their own garbage."""

    def __init__(self, step, slots):
        self.sizes = sorted({min(2**i, slots) for i in range(slots.bit_length() + 1)})
        self.replays, memory = {}, None
        for size in self.sizes:
            self.replays[size], memory = capture_cuda_graph(functools.partial(step, size), memory)

    def __call__(self, B):
        self.replays[next(size for size in self.sizes if size >= B)]()


# -----------------------------------------------------------------------------
# 3. generation

@dataclass
class Completion:
    """One sampled response. `token_ids` and `logprobs` include the stop token when there is one;
    `finish_reason` is "stop" (an EOS id was sampled) or "length" (max_new_tokens reached);
    `text` is decoded without special tokens (None without a tokenizer)."""

    prompt_index: int
    sample: int
    token_ids: list
    logprobs: list
    finish_reason: str
    text: str | None = None


def prefill(model, prompts, slots_of, pool, rows, image_cache=None):
    """Vision tower and decoder over `prompts`, packed, each prompt's keys/values written into every
    slot of its list in `slots_of` (Llama 3.2 Vision: its images' cross-attention keys/values into
    row rows[i] of `image_cache`). Returns each prompt's next-token logits [P, V] and the RoPE
    position of its first response token [P]."""
    device = model.head_weight.device
    ids = [torch.as_tensor(p["input_ids"], dtype=torch.long) for p in prompts]
    lengths = [len(i) for i in ids]
    cu = data.cu_seqlens_of(lengths).long()
    input_ids = torch.cat(ids).to(device)
    # the fan-out: slot s of prompt p, position i <- packed token cu[p] + i, for i < len(prompt p)
    fan_slot = torch.cat([torch.tensor(slots).repeat_interleave(n) for slots, n in zip(slots_of, lengths)])
    fan_pos = torch.cat([torch.arange(n).repeat(len(slots)) for slots, n in zip(slots_of, lengths)])
    fan_src = torch.cat([torch.arange(start, start + n).repeat(len(slots))
                         for slots, start, n in zip(slots_of, cu.tolist(), lengths)])
    attend = prefill_attention(pool.kv, cu.to(device, torch.int32),
                               *(t.to(device) for t in (fan_src, fan_slot, fan_pos)))
    if isinstance(model, Mllama):  # 1-D positions 0 .. length - 1
        hidden = model.prefill_hidden(input_ids, cu.to(device, torch.int32), data.concat_tiles(prompts), attend,
                                      image_cache, rows)
        next_pos = torch.tensor(lengths, device=device)
    else:
        pixels, grid_thw = data.concat_images(prompts)
        # the embedding table alone for text: model.embed's dummy vision forward exists for training under FSDP
        x = model.model.embed_tokens(input_ids) if pixels is None else model.embed(input_ids, pixels.to(device),
                                                                                   grid_thw)
        positions = model.positions(input_ids, cu, grid_thw)
        hidden = run_decoder(model, x, *model.rope_cos_sin(positions, x.dtype), attend)
        next_pos = torch.stack([positions[:, s:e].max() + 1 for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())])
    logits = hidden[(cu[1:] - 1).to(device)] @ model.head_weight.t()  # the prompts' last positions only
    return logits, next_pos


class SlotScheduler:
    """The host side of `generate`: which sample each slot of the pool holds, and the moves between
    runs of decode steps. `admit` puts waiting samples (prompt-major) into the free slots, lowest
    first, each with its prompt's keys/values copied from a slot that still holds them or else
    prefilled, and draws their first tokens; `collect` takes the finished rows out (one host sync);
    `compact` moves the live rows into slots 0 .. B-1, so that a decode step runs on B rows.
    `results[prompt, sample]` is (token ids, log-probs, finish reason) of each finished sample."""

    def __init__(self, model, pool, prompts, n, sampler, eos, eos_ids, max_new_tokens, seed, prompt_ids,
                 image_cache=None):
        self.model, self.pool, self.prompts, self.sampler, self.eos, self.eos_ids = (model, pool, prompts, sampler,
                                                                                     eos, eos_ids)
        self.image_cache = image_cache
        self.max_new_tokens, self.seed, self.prompt_ids = max_new_tokens, seed, prompt_ids
        self.device, self.slots, self.slot_len = pool.kv.device, pool.kv.shape[2], pool.kv.shape[3]
        self.prompt_lens = [len(p["input_ids"]) for p in prompts]
        self.waiting = deque((p, j) for p in range(len(prompts)) for j in range(n))
        self.owner = [None] * self.slots  # (prompt, sample) of the live slots
        self.holds = [None] * self.slots  # the prompt whose keys/values fill positions [0, its length) of a slot
        self.counts = [0] * self.slots  # tokens each live slot had sampled at the last check
        self.first = {}  # prompt -> (next-token logits, first response position), while samples of it wait
        self.results = {}

    def run(self, decode, check_every):
        """Admit, collect and compact, then `decode(B, span)` for up to `check_every` steps (fewer when
        a row reaches max_new_tokens first; `span`: the cache positions the rows read), until every
        sample has finished. Returns `results`."""
        owner, counts = self.owner, self.counts
        while True:
            self.collect()
            while self.waiting and None in owner:
                self.admit()
                self.collect()  # rows whose first token stopped them
            B = self.compact()
            if B == 0:
                return self.results
            steps = min(check_every, *(self.max_new_tokens - counts[s] for s in range(B)))
            span = min(self.slot_len, max(self.prompt_lens[owner[s][0]] + counts[s] - 1 for s in range(B)) + steps)
            for _ in range(steps):
                decode(B, span)

    def admit(self):
        """Waiting samples into the free slots, lowest first; the first token of each drawn."""
        pool, owner, holds, prompt_lens = self.pool, self.owner, self.holds, self.prompt_lens
        free = [s for s in range(self.slots) if owner[s] is None]
        taken = [(s, self.waiting.popleft()) for s in free[:len(self.waiting)]]
        prompt_of = {s: p for s, (p, _) in taken}
        holders = {}
        for t, p in enumerate(holds):
            # a slot keeps its prompt's keys/values unless this admission gives it another prompt
            if p is not None and prompt_of.get(t, p) == p:
                holders.setdefault(p, t)
        copies, fresh = [], {}
        for s, (p, _) in taken:
            source = s if holds[s] == p else holders.get(p)
            if source is None:
                fresh.setdefault(p, []).append(s)
            elif source != s:
                copies.append((s, source))
        for s, source in copies:  # sources are slots this admission does not write
            pool.kv[:, :, s, :prompt_lens[prompt_of[s]]].copy_(pool.kv[:, :, source, :prompt_lens[prompt_of[s]]])
        if fresh:
            logits, next_pos = prefill(self.model, [self.prompts[p] for p in fresh], list(fresh.values()), pool,
                                       list(fresh), self.image_cache)
            self.first.update(zip(fresh, zip(logits, next_pos)))
        for s, (p, j) in taken:
            owner[s], holds[s], self.counts[s] = (p, j), p, 1
        index = torch.tensor([s for s, _ in taken], device=self.device)
        prompt = [p for _, (p, _) in taken]
        keys = torch.tensor([stream_key(self.seed, self.prompt_ids[p], j) for _, (p, j) in taken], device=self.device)
        tokens, logprobs = self.sampler(torch.stack([self.first[p][0] for p in prompt]), keys, torch.zeros_like(keys))
        pool.tokens[index], pool.keys[index] = tokens, keys
        pool.prompt[index] = torch.tensor(prompt, device=self.device)
        pool.out_tokens[index, 0], pool.out_logprobs[index, 0] = tokens, logprobs
        pool.lengths[index] = torch.tensor([prompt_lens[p] for p in prompt], device=self.device)
        pool.positions[index] = torch.stack([self.first[p][1] for p in prompt])
        pool.counts[index] = 1
        pool.done[index] = (tokens[:, None] == self.eos).any(-1) | (self.max_new_tokens == 1)
        for p in set(prompt) - {p for p, _ in self.waiting}:
            del self.first[p]

    def collect(self):
        """Finished rows leave their slots (one host sync); the live rows' counts are read."""
        pool, owner = self.pool, self.owner
        live = [s for s in range(self.slots) if owner[s] is not None]
        if not live:
            return
        index = torch.tensor(live, device=self.device)
        done, now = torch.stack([pool.done[index].long(), pool.counts[index]]).tolist()
        finished = [(s, c) for s, d, c in zip(live, done, now) if d]
        for s, c in zip(live, now):
            self.counts[s] = c
        if finished:
            at = torch.tensor([s for s, _ in finished], device=self.device)
            width = max(c for _, c in finished)
            tokens, logprobs = pool.out_tokens[at, :width].tolist(), pool.out_logprobs[at, :width].tolist()
            for (s, c), row_tokens, row_logprobs in zip(finished, tokens, logprobs):
                stopped = row_tokens[c - 1] in self.eos_ids
                self.results[owner[s]] = (row_tokens[:c], row_logprobs[:c], "stop" if stopped else "length")
                owner[s] = None

    def compact(self):
        """Move the last live rows into the lower free slots, so that the live ones are 0 .. B-1
        (a copy of the moved rows' filled positions, never of the whole cache); returns B."""
        pool, owner, holds, counts = self.pool, self.owner, self.holds, self.counts
        live = [s for s in range(self.slots) if owner[s] is not None]
        holes = [s for s in range(len(live)) if owner[s] is None]
        for dst, src in zip(holes, reversed(live)):
            filled = self.prompt_lens[owner[src][0]] + counts[src] - 1
            pool.kv[:, :, dst, :filled].copy_(pool.kv[:, :, src, :filled])
            for state in (pool.tokens, pool.lengths, pool.positions, pool.keys, pool.counts, pool.done,
                          pool.out_tokens, pool.out_logprobs, pool.prompt):
                state[dst] = state[src]
            pool.done[src] = True
            owner[dst], holds[dst], counts[dst], owner[src] = owner[src], holds[src], counts[src], None
        return len(live)


@torch.no_grad()
def generate(model, prompts, *, eos_ids, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=0,
             greedy=False, seed=0, prompt_ids=None, kv_budget=None, check_every=None, cuda_graphs=None,
             tokenizer=None):
    """Sample n completions of each prompt; returns P*n Completions, prompt-major (all samples of
    prompt 0, then prompt 1, ...), so GRPO groups are consecutive.

    prompts: dicts with `input_ids` (list[int] or LongTensor), `pixel_values` and `image_grid_thw`
    (None without images), as `data.ChatProcessor.encode_prompt` returns them. eos_ids: the stop
    ids (`data.ChatProcessor.eos_token_ids` reads them from generation_config.json); empty: stop only
    at max_new_tokens. Sampling arguments as in `sample_next`. Sample j of prompt i draws from the
    stream (seed, prompt_ids[i], j) (`stream_key`; prompt_ids default 0 .. P-1): give each prompt a
    global id and the samples are the same whatever the batch, the budget or the number of ranks.

    kv_budget: cached tokens at most (`kv_budget_tokens` converts GiB); None: every sample at once.
    check_every: decode steps between the host's stop checks and refills (default 8 on CUDA, where a
    check waits for the device; 1 on CPU, where it costs nothing and a finished row idles no step).
    cuda_graphs: capture the decode step (default: on CUDA).

    Under FSDP2 every rank calls it (with its own prompts): parameters are gathered once for the
    whole generation and resharded after; no collective runs inside, so ranks may take different
    numbers of steps.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (use greedy for argmax decoding)")
    prompt_ids = list(range(len(prompts))) if prompt_ids is None else list(prompt_ids)
    if len(prompt_ids) != len(prompts):
        raise ValueError(f"{len(prompt_ids)} prompt ids for {len(prompts)} prompts")
    longest = max(len(p["input_ids"]) for p in prompts)
    slot_len = longest + max_new_tokens
    slots = len(prompts) * n if kv_budget is None else min(len(prompts) * n, kv_budget // slot_len)
    if slots < 1:
        raise ValueError(f"kv_budget of {kv_budget} tokens holds no sample: one takes {slot_len} "
                         f"(the longest prompt, {longest}, + max_new_tokens)")

    with M.gathered_params(model):
        device, dtype = model.head_weight.device, model.head_weight.dtype
        pool = new_slot_pool(decoder_config(model), slots, slot_len, max_new_tokens, dtype, device)
        image_cache = model.new_image_cache(prompts, dtype, device) if isinstance(model, Mllama) else None
        eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
        sampler = functools.partial(draw, temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy,
                                    banned=torch.tensor(vision_token_ids(model), dtype=torch.long, device=device))
        rope = text_rope(model, slot_len, dtype, device)
        scheduler = SlotScheduler(model, pool, prompts, n, sampler, eos, eos_ids, max_new_tokens, seed, prompt_ids,
                                  image_cache)

        def step(B, span):
            return decode_step(model, pool, B, sampler, eos, rope, span, image_cache)
        graphs = None
        if cuda_graphs if cuda_graphs is not None else device.type == "cuda":
            graphs = GraphedDecodeSteps(lambda B: step(B, slot_len), slots)

        def decode(B, span):  # a captured step reads the whole slot length
            return graphs(B) if graphs is not None else step(B, span)
        results = scheduler.run(decode, check_every or (8 if device.type == "cuda" else 1))

    return [Completion(prompt_index=p, sample=j, token_ids=results[p, j][0], logprobs=results[p, j][1],
                       finish_reason=results[p, j][2],
                       text=tokenizer.decode(results[p, j][0], skip_special_tokens=True) if tokenizer else None)
            for p in range(len(prompts)) for j in range(n)]


# -----------------------------------------------------------------------------
# 4. command line

@command_line
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory (weights, tokenizer, image processor)")
    parser.add_argument("--prompts", required=True, help="problem records (.jsonl / .json / .parquet)")
    parser.add_argument("--out", required=True, help="output .jsonl, one line per completion")
    parser.add_argument("--n", type=at_least(1), default=1, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=at_least(1), default=512)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (sampling arguments ignored)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=at_least(0), default=0, help="0: no top-k cut")
    parser.add_argument("--seed", type=int, default=0, help="sample j of record i draws from the stream (seed, i, j)")
    parser.add_argument("--system", default=None, help="system prompt (default: none beyond the chat template's)")
    parser.add_argument("--batch-size", type=at_least(1), default=16, help="prompts per generate call")
    parser.add_argument("--kv-budget-gib", type=at_least(0, float), default=0.0,
                        help="KV cache per generate call (0: half the free GPU memory; on CPU 2^18 tokens)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    problems = data.load_prompts(args.prompts)  # every bad line is reported before any model work
    M.check_checkpoint(args.model)
    processor = data.ChatProcessor(args.model)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = M.load_model(args.model, dtype=dtype, device=args.device).eval()
    with open(args.out, "w") as f:
        for start in range(0, len(problems), args.batch_size):
            batch = problems[start:start + args.batch_size]
            prompts = [processor.encode_problem(record, system=args.system) for record in batch]
            kv_budget = kv_budget_tokens(decoder_config(model), dtype, args.kv_budget_gib, args.device)
            completions = generate(model, prompts, eos_ids=processor.eos_token_ids, n=args.n,
                                   max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                   top_p=args.top_p, top_k=args.top_k, greedy=args.greedy, seed=args.seed,
                                   prompt_ids=range(start, start + len(batch)),
                                   kv_budget=kv_budget, tokenizer=processor.tokenizer)
            for c in completions:
                f.write(json.dumps({"id": batch[c.prompt_index]["id"], "sample": c.sample, "token_ids": c.token_ids,
                                    "text": c.text, "finish_reason": c.finish_reason}) + "\n")
    print(f"wrote {len(problems) * args.n} completions of {len(problems)} prompts to {args.out}")


if __name__ == "__main__":
    main()
