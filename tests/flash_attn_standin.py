"""flash-attn 2.8's `flash_attn_varlen_func` and `flash_attn_with_kvcache` in plain PyTorch, so that the
tests run the code's CUDA branches on CPU (`install`).

Same signatures and results as flash_attn/flash_attn_interface.py, and the same contracts, checked
where the kernels check them (csrc/flash_attn/flash_api.cpp) and where they would go wrong silently:
  - q, k, v and the caches fp16 or bf16, all one dtype, on one device; the caches, written in place,
    with a contiguous last dimension
  - cu_seqlens_q / cu_seqlens_k, cache_seqlens, cache_batch_idx, block_table: int32
  - head_dim <= 256; Hq a multiple of Hkv (grouped-query: query head h reads key head h // (Hq / Hkv))
  - varlen: q [total_q, Hq, D], k / v [total_k, Hkv, D], cu_seqlens [B + 1] rising from 0 to the total,
    max_seqlen at least every length (a smaller one makes the kernel skip tokens)
  - KV cache: q [B, Sq, Hq, D]; caches [B_cache, L, Hkv, D], or paged [blocks, page, Hkv, D] with a
    block_table [B, blocks per row] and page % 256 == 0; new k / v [B, S_new, Hkv, D] are written in
    place at positions cache_seqlens[b] .. cache_seqlens[b] + S_new - 1 of their row (cache_batch_idx[b],
    default b), which must fit (the kernel would write out of bounds), and attention then covers
    cache_seqlens[b] + S_new keys (all L without cache_seqlens)
  - causal masks aligned at the bottom right: query i of Lq sees keys j <= i + Lk - Lq; a query that
    sees no key gives 0. Example, Lq = 2, Lk = 5: rows [1 1 1 1 0] and [1 1 1 1 1].
Scores, softmax and the value sum run in fp32 and the output comes back in q's dtype, as the kernels
accumulate; gradients flow through the varlen function as through the kernel's backward. Options the
code never uses (dropout, local windows, softcap, ALiBi, rotary, left padding) are refused.
"""

import torch

HALF = (torch.float16, torch.bfloat16)


def _check(ok, message):
    if not ok:
        raise RuntimeError(message)


def _check_unused(**options):
    """Refuse every option the stand-in does not implement (each given at its default value: off)."""
    defaults = {"dropout_p": 0.0, "window_size": (-1, -1), "softcap": 0.0, "alibi_slopes": None,
                "return_attn_probs": False, "rotary_cos": None, "rotary_sin": None, "cache_leftpad": None}
    for name, value in options.items():
        if torch.is_tensor(value) or value != defaults[name]:
            raise NotImplementedError(f"the flash-attn stand-in does not implement {name}={value!r}")


def _check_qkv(q, k, v):
    """dtype, device and head layout of q and the keys/values (the Python API makes q, k, v contiguous)."""
    _check(q.dtype in HALF, f"FlashAttention only support fp16 and bf16 data type (q is {q.dtype})")
    _check(k.dtype == q.dtype and v.dtype == q.dtype, "query and key/value must have the same dtype")
    _check(k.device == q.device and v.device == q.device, "q, k and v must be on one device")
    _check(q.shape[-1] <= 256, "FlashAttention forward only supports head dimension at most 256")
    _check(k.shape[-2] > 0 and q.shape[-2] % k.shape[-2] == 0,
           "Number of heads in key/value must divide number of heads in query")
    _check(k.shape[-1] == q.shape[-1] and v.shape == k.shape, f"k {tuple(k.shape)} / v {tuple(v.shape)} do not "
           f"match q {tuple(q.shape)} (layout [.., heads, head_dim])")


def _check_int32(name, t, shape, device):
    _check(t.dtype == torch.int32, f"{name} must have dtype int32 (got {t.dtype})")
    _check(t.is_contiguous() and t.device == device, f"{name} must be contiguous, on q's device")
    _check(tuple(t.shape) == shape, f"{name} must have shape {shape} (got {tuple(t.shape)})")


def _attend(q, k, v, scale, causal):
    """One sequence: q [Lq, Hq, D], k / v [Lk, Hkv, D] -> [Lq, Hq, D] in fp32, flash-attn's semantics."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.float().repeat_interleave(group, dim=1) for x in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    Lq, Lk = q.shape[0], k.shape[0]
    seen = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
    if causal:
        seen = seen.tril(Lk - Lq)
    # a finite fill, not -inf: a query that sees no key gets a uniform row here, zeroed below, and no NaN
    probs = scores.masked_fill(~seen, torch.finfo(torch.float32).min).softmax(-1)
    out = torch.einsum("hqk,khd->qhd", probs, v)
    return torch.where(seen.any(-1)[:, None, None], out, 0.0)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Attention over sequences packed along dim 0: sequence b's queries q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]
    attend to its keys k[cu_seqlens_k[b]:cu_seqlens_k[b+1]]. Returns [total_q, Hq, D] in q's dtype."""
    _check_unused(dropout_p=dropout_p, window_size=tuple(window_size), softcap=softcap, alibi_slopes=alibi_slopes,
                  return_attn_probs=return_attn_probs)
    if block_table is not None:
        raise NotImplementedError("the flash-attn stand-in does not implement a paged varlen cache")
    _check(q.dim() == 3 and k.dim() == 3, "varlen q, k, v are [total, heads, head_dim]")
    _check_qkv(q, k, v)
    batch = cu_seqlens_q.shape[0] - 1
    _check(batch > 0, "batch size must be positive")
    for name, cu, total, max_len in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                     ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
        _check_int32(name, cu, (batch + 1,), q.device)
        lengths = cu[1:] - cu[:-1]
        _check(int(cu[0]) == 0 and int(cu[-1]) == total and bool((lengths >= 0).all()),
               f"{name} must rise from 0 to the {total} packed tokens, got {cu.tolist()}")
        _check(isinstance(max_len, int) and max_len >= int(lengths.max()),
               f"max_seqlen {max_len!r} is below the longest sequence of {name} ({int(lengths.max())})")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = [_attend(q[bounds_q[b]:bounds_q[b + 1]], k[bounds_k[b]:bounds_k[b + 1]], v[bounds_k[b]:bounds_k[b + 1]],
                   scale, causal) for b in range(batch)]
    return torch.cat(out).to(q.dtype)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                            cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                            alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Decoding attention: with k / v given, append them to each row's cache in place first; then q
    [B, Sq, Hq, D] attends to its row's cached keys. Returns [B, Sq, Hq, D] in q's dtype."""
    _check_unused(rotary_cos=rotary_cos, rotary_sin=rotary_sin, cache_leftpad=cache_leftpad,
                  window_size=tuple(window_size), softcap=softcap, alibi_slopes=alibi_slopes)
    if return_softmax_lse:
        raise NotImplementedError("the flash-attn stand-in does not implement return_softmax_lse")
    _check(k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "k_cache must have contiguous last dimension")
    _check(q.dim() == 4 and k_cache.dim() == 4, "q is [B, Sq, Hq, D] and the caches [B_cache, L, Hkv, D]")
    _check_qkv(q, k_cache, v_cache)
    B, Sq = q.shape[:2]
    _check(B > 0, "batch size must be positive")
    if block_table is None:
        if cache_batch_idx is not None:
            _check_int32("cache_batch_idx", cache_batch_idx, (B,), q.device)
        rows = list(range(B)) if cache_batch_idx is None else cache_batch_idx.tolist()
        _check(0 <= min(rows) and max(rows) < k_cache.shape[0], f"cache rows {rows} outside a cache of "
               f"{k_cache.shape[0]} rows")
        capacity = k_cache.shape[1]
        positions = torch.arange(capacity, device=q.device)
        slots = [(torch.full((capacity,), row, device=q.device), positions) for row in rows]
    else:
        _check(cache_batch_idx is None, "Paged KVcache does not support cache_batch_idx")
        _check_int32("block_table", block_table, (B, block_table.shape[1]), q.device)
        page = k_cache.shape[1]
        _check(page % 256 == 0, "Paged KV cache block size must be divisible by 256")
        capacity = block_table.shape[1] * page
        positions = torch.arange(capacity, device=q.device)
        slots = [(block_table[b].long()[positions // page], positions % page) for b in range(B)]
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=q.device)
    if cache_seqlens is not None:
        _check_int32("cache_seqlens", cache_seqlens, (B,), q.device)
    if k is not None:
        _check(v is not None and cache_seqlens is not None, "new k needs v and cache_seqlens")
        _check(k.dim() == 4 and tuple(k.shape) == tuple(v.shape) == (B, k.shape[1], *k_cache.shape[2:]),
               f"new k / v must be [B, S_new, Hkv, D] = [{B}, S_new, {k_cache.shape[2]}, {k_cache.shape[3]}], "
               f"got {tuple(k.shape)}")
        _check(k.dtype == q.dtype and v.dtype == q.dtype, "Key must have the same dtype as query")
        _check(Sq <= capacity, "If key is supplied, it must have seqlen <= the seqlen of the KV cache")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out = []
    for b, (cache_row, cache_pos) in enumerate(slots):
        start = capacity if cache_seqlens is None else int(cache_seqlens[b])
        end = start + (0 if k is None else k.shape[1])
        _check(0 <= start and end <= capacity, f"row {b}: {end} keys do not fit a cache of {capacity}")
        if k is not None:
            k_cache[cache_row[start:end], cache_pos[start:end]] = k[b]
            v_cache[cache_row[start:end], cache_pos[start:end]] = v[b]
        keys = k_cache[cache_row[:end], cache_pos[:end]]
        values = v_cache[cache_row[:end], cache_pos[:end]]
        out.append(_attend(q[b], keys, values, scale, causal))
    return torch.stack(out).to(q.dtype)


def install(monkeypatch):
    """Put the stand-in where model.py and generate.py call flash-attn and open model.py's CUDA gate
    (`model.use_flash`) on CPU. Returns the list to which every call appends (function name, q dtype)."""
    import generate
    import model

    calls = []
    monkeypatch.setattr(model, "flash_attn_varlen_func", recorded(flash_attn_varlen_func, calls))
    monkeypatch.setattr(model, "use_flash", lambda q: True)
    monkeypatch.setattr(generate, "flash_attn_with_kvcache", recorded(flash_attn_with_kvcache, calls))
    return calls


def recorded(function, calls):
    """`function`, appending (its name, q's dtype) to `calls` at every call."""
    def call(q, *args, **kwargs):
        calls.append((function.__name__, q.dtype))
        return function(q, *args, **kwargs)
    return call
