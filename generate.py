"""Sampling from our Qwen2.5-VL: batched, multimodal, KV-cached and group-aware, in one readable loop.

    python generate.py --model DIR --prompts FILE.jsonl --out FILE.jsonl [--greedy] [--n K]
        [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K] [--seed S] [--system TEXT]

A prompt line is a problem record (`id`, `images` relative to the file, `question`); the prompt is
the checkpoint's chat template over one user turn (the images, then the question) plus the
generation prompt. Each output line is {"id", "sample", "token_ids", "text", "finish_reason"}.

How `generate` runs, for P prompts and n samples each (GRPO's groups):
  1. group prefill  the P distinct prompts go through the vision tower and the decoder once, packed
                    (varlen); each prompt's keys/values are copied into the cache rows of its n
                    samples, so n samples cost one prefill
  2. decode         one token per live row per step, attending over that row's cache length; the new
                    token's mRoPE position is the prompt's largest position + 1 (then +1 per step) on
                    all three channels, which is what transformers' `rope_deltas` amount to
  3. stop           a row ends on any EOS id ("stop") or after max_new_tokens ("length"); finished
                    rows leave the batch and the cache, so they cost nothing afterwards

The cache is one tensor, allocated at the start and written in place (compaction copies the live
rows into a smaller one). On CUDA, decoding attends with flash-attn's `flash_attn_with_kvcache`
over the whole cache with per-row lengths, so a step's shapes depend only on the number of live
rows (CUDA graphs could capture one step per row count); without flash-attn (and on CPU) SDPA
attends over the cache up to the longest live row.
"""

import argparse
import json
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import data
import model as M

try:  # GPU-only kernel; the SDPA path below is its CPU twin
    from flash_attn import flash_attn_with_kvcache
except ImportError:
    flash_attn_with_kvcache = None

VISION_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


# -----------------------------------------------------------------------------
# 1. sampling

def sample_next(logits, temperature=1.0, top_p=1.0, top_k=0, generator=None, greedy=False, banned=None,
                uniform=None):
    """Next token of every row of `logits` [R, V] and its log-prob; returns (tokens [R], logprobs [R]).

    The token is drawn from softmax(logits / temperature) with the `banned` ids removed, cut to the
    top_k most likely tokens (0: no cut), then to the smallest most-likely set whose mass reaches
    top_p (1.0: no cut), renormalised: transformers' order (temperature, top-k, top-p). `greedy`
    takes the argmax instead. The returned log-prob is log_softmax(logits / temperature)[token], the
    full tempered distribution before the ban and the cuts: the quantity GRPO's ratio uses and that
    `Qwen25VL.packed_logprobs(..., temperature)` recomputes in training. `uniform` [R, V] in (0, 1)
    replaces the draws from `generator` (per-prompt generators, see `generate`).

    Example: logits [2, 1, 0, -1], temperature 1 -> p = [.64, .24, .09, .03]; top_p 0.8 keeps
    tokens 0 and 1 (the mass before token 1 is .64 < .8, before token 2 it is .88) and draws
    token 0 with probability .64 / .88 = .73, token 1 with .27.
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
        probs = scores.softmax(-1)
        # argmax_i p_i / E_i with E_i = -log U_i ~ Exp(1) picks i with probability p_i (the
        # exponential race): a multinomial draw without a host sync, as CUDA graphs need, and on
        # CPU several times faster than torch.multinomial or Tensor.exponential_
        if uniform is None:
            uniform = torch.rand(probs.shape, generator=generator, device=probs.device)
        race = uniform.log().neg_()
        tokens = (probs / race).max(-1).indices
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


def vision_token_ids(model):
    """Ids only the processor may place (image/video pads, vision start/end): never sampled."""
    raw = model.hf_config or {}
    ids = {raw.get(key) for key in VISION_TOKEN_KEYS} | {model.cfg.image_token_id, model.cfg.vision_start_token_id}
    return sorted(i for i in ids if i is not None)


# -----------------------------------------------------------------------------
# 2. KV cache: kv [layers, 2 (keys, values), rows, max_len, Hkv, head_dim], row r filled up to lengths[r]

def prefill_attention(kv, cu_seqlens, fan_src, fan_row, fan_pos):
    """The `attend` of the packed prompt forward: causal attention inside each prompt, and every
    prompt token's key/value (packed index fan_src) copied to cache row fan_row at position fan_pos,
    once for each of the prompt's n sample rows."""
    def attend(layer, q, k, v):
        kv[layer, 0, fan_row, fan_pos] = k[fan_src]
        kv[layer, 1, fan_row, fan_pos] = v[fan_src]
        return M.varlen_attention(q, k, v, cu_seqlens, causal=True)
    return attend


def cached_attention(q, k, v, k_cache, v_cache, lengths, span):
    """One new token per row: store its key/value at position lengths[r] of row r, then attend over
    the row's lengths[r] + 1 cached positions. q [R, Hq, D]; k, v [R, Hkv, D]; caches [R, L, Hkv, D];
    `span` = max(lengths) + 1 bounds the SDPA path's work by the longest live row, not by L."""
    if flash_attn_with_kvcache is not None and q.is_cuda:
        return flash_attn_with_kvcache(q[:, None], k_cache, v_cache, k[:, None], v[:, None],
                                       cache_seqlens=lengths.to(torch.int32), causal=True)[:, 0]
    R, Hkv, D = k.shape
    rows = torch.arange(R, device=q.device)
    k_cache[rows, lengths] = k
    v_cache[rows, lengths] = v
    visible = torch.arange(span, device=q.device) <= lengths[:, None]  # [R, span]
    # the Hq / Hkv query heads that share a key/value head attend as that head's queries: the
    # cache is read as is, never repeated per query head
    out = F.scaled_dot_product_attention(q.view(R, Hkv, -1, D), k_cache[:, :span].transpose(1, 2),
                                         v_cache[:, :span].transpose(1, 2), attn_mask=visible[:, None, None, :])
    return out.reshape(R, -1, D)


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


def prefill(model, prompts, n, max_new_tokens):
    """Vision tower and decoder over the distinct prompts, packed; the cache rows of prompt p are
    p*n .. p*n + n - 1. Returns the next-token logits of every row [P*n, V], the preallocated cache
    with each row holding its prompt, the rows' prompt lengths and the rows' next mRoPE positions."""
    device = model.head_weight.device
    ids = [torch.as_tensor(p["input_ids"], dtype=torch.long) for p in prompts]
    prompt_lens = torch.tensor([len(i) for i in ids])
    cu = F.pad(prompt_lens.cumsum(0), (1, 0))
    input_ids = torch.cat(ids).to(device)
    pixels, grid_thw = data.concat_images(prompts)
    x = model.embed(input_ids, None if pixels is None else pixels.to(device), grid_thw)
    positions = model.positions(input_ids, cu, grid_thw)
    cos, sin = model.rope_cos_sin(positions, x.dtype)

    cfg, rows = model.cfg, len(prompts) * n
    # zeros, not empty: SDPA reads the masked tail of shorter rows, and NaN garbage there would leak
    # through the mask (0 * NaN = NaN)
    kv = torch.zeros(cfg.num_hidden_layers, 2, rows, int(prompt_lens.max()) + max_new_tokens,
                     cfg.num_key_value_heads, cfg.head_dim, dtype=x.dtype, device=device)
    # the fan-out: cache row r = p*n + j, position i <- packed token cu[p] + i, for i < len(prompt p)
    prompt_of_row = torch.arange(len(prompts)).repeat_interleave(n)
    row_lens = prompt_lens[prompt_of_row]
    fan_row = torch.arange(rows).repeat_interleave(row_lens)
    fan_pos = torch.cat([torch.arange(length) for length in row_lens.tolist()])
    fan_src = cu[:-1][prompt_of_row].repeat_interleave(row_lens) + fan_pos
    attend = prefill_attention(kv, cu.to(device, torch.int32), *(t.to(device) for t in (fan_src, fan_row, fan_pos)))
    hidden = model.decode(x, cos, sin, attend)

    logits = hidden[(cu[1:] - 1).to(device)] @ model.head_weight.t()  # the prompts' last positions only
    next_pos = torch.stack([positions[:, s:e].max() + 1 for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())])
    return logits.repeat_interleave(n, 0), kv, row_lens.to(device), next_pos.repeat_interleave(n)


def decode_step(model, kv, tokens, lengths, next_pos):
    """Logits [R, V] after one new token per row; its key/value go to cache position lengths[r]."""
    x = model.embed(tokens)
    cos, sin = model.rope_cos_sin(next_pos.expand(3, -1), x.dtype)  # text: equal on t, h, w channels
    span = int(lengths.max()) + 1
    hidden = model.decode(x, cos, sin, lambda layer, q, k, v: cached_attention(q, k, v, kv[layer, 0], kv[layer, 1],
                                                                                 lengths, span))
    return hidden @ model.head_weight.t()


@torch.no_grad()
def generate(model, prompts, *, eos_ids, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=0,
             greedy=False, generator=None, tokenizer=None):
    """Sample n completions of each prompt; returns P*n Completions, prompt-major (all samples of
    prompt 0, then prompt 1, ...), so GRPO groups are consecutive.

    prompts: dicts with `input_ids` (list[int] or LongTensor), `pixel_values` and `image_grid_thw`
    (None without images), as `data.ChatProcessor.encode_prompt` returns them. eos_ids: the stop
    ids (`data.ChatProcessor.eos_token_ids` reads them from generation_config.json); empty: stop only
    at max_new_tokens. Sampling arguments as in `sample_next`; `generator` (on the model's device)
    makes sampling reproducible. A list of generators, one per prompt, makes each prompt's samples
    depend on its own generator alone: the same samples whatever the batch or the number of ranks.

    Under FSDP2 every rank calls it (with its own prompts): parameters are gathered once for the
    whole generation and resharded after; no collective runs inside, so ranks may take different
    numbers of steps.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    with M.gathered_params(model):
        logits, kv, lengths, next_pos = prefill(model, prompts, n, max_new_tokens)
        banned = torch.tensor(vision_token_ids(model), dtype=torch.long, device=logits.device)
        eos = torch.tensor(list(eos_ids), dtype=torch.long, device=logits.device)
        rows = len(prompts) * n
        live = list(range(rows))  # original row of each cache row
        token_ids, logprobs, finish = [[] for _ in range(rows)], [[] for _ in range(rows)], ["length"] * rows
        for step in range(max_new_tokens):
            uniform = None
            if isinstance(generator, (list, tuple)) and not greedy:
                # live rows stay in prompt order: draw each prompt's rows from its own generator
                counts = torch.bincount(torch.tensor(live) // n, minlength=len(prompts)).tolist()
                uniform = torch.cat([torch.rand(c, logits.shape[-1], generator=g, device=logits.device)
                                     for g, c in zip(generator, counts) if c])
            tokens, token_logprobs = sample_next(logits, temperature, top_p, top_k, None if uniform is not None
                                                 else generator, greedy, banned, uniform)
            stopped = torch.isin(tokens, eos)
            for row, token, logprob, stop in zip(live, tokens.tolist(), token_logprobs.tolist(), stopped.tolist()):
                token_ids[row].append(token)
                logprobs[row].append(logprob)
                if stop:
                    finish[row] = "stop"
            if step == max_new_tokens - 1 or bool(stopped.all()):
                break
            if bool(stopped.any()):
                # compact: the live rows' cache is copied into a smaller tensor (one copy per step in
                # which rows finish), after which finished rows cost neither attention nor matmuls
                keep = ~stopped
                live = [row for row, k in zip(live, keep.tolist()) if k]
                kv, tokens, lengths, next_pos = kv[:, :, keep], tokens[keep], lengths[keep], next_pos[keep]
            logits = decode_step(model, kv, tokens, lengths, next_pos)
            lengths, next_pos = lengths + 1, next_pos + 1
    return [Completion(prompt_index=row // n, sample=row % n, token_ids=token_ids[row], logprobs=logprobs[row],
                       finish_reason=finish[row],
                       text=tokenizer.decode(token_ids[row], skip_special_tokens=True) if tokenizer else None)
            for row in range(rows)]


# -----------------------------------------------------------------------------
# 4. command line

def main(argv=None):
    parser = argparse.ArgumentParser(description="Sample completions of problem prompts with our Qwen2.5-VL.")
    parser.add_argument("--model", required=True, help="checkpoint directory (weights, tokenizer, image processor)")
    parser.add_argument("--prompts", required=True, help="problem records (.jsonl / .json / .parquet)")
    parser.add_argument("--out", required=True, help="output .jsonl, one line per completion")
    parser.add_argument("--n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (sampling arguments ignored)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--system", default=None, help="system prompt (default: none beyond the chat template's)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    try:  # every bad line (missing or corrupt image, no question) is reported before any model work
        problems = data.load_prompts(args.prompts)
    except data.DataError as e:
        sys.exit(str(e))
    processor = data.ChatProcessor(args.model)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = M.load_model(args.model, dtype=dtype, device=args.device).eval()
    generator = torch.Generator(args.device).manual_seed(args.seed)
    with open(args.out, "w") as f:
        for start in range(0, len(problems), args.batch_size):
            batch = problems[start:start + args.batch_size]
            prompts = [processor.encode_problem(record, system=args.system) for record in batch]
            completions = generate(model, prompts, eos_ids=processor.eos_token_ids, n=args.n,
                                   max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                   top_p=args.top_p, top_k=args.top_k, greedy=args.greedy, generator=generator,
                                   tokenizer=processor.tokenizer)
            for c in completions:
                f.write(json.dumps({"id": batch[c.prompt_index]["id"], "sample": c.sample, "token_ids": c.token_ids,
                                    "text": c.text, "finish_reason": c.finish_reason}) + "\n")
    print(f"wrote {len(problems) * args.n} completions of {len(problems)} prompts to {args.out}")


if __name__ == "__main__":
    main()
