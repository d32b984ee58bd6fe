"""generate.py against transformers' generate (the oracle), against our own training forward, and
against the sampling definitions; the CLI on the synthetic world; FSDP2 under torchrun."""

import functools
import itertools
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

import data
import generate as G
import model as M
from tests import flash_attn_standin, tiny

# text only; one image (grid 8x6); two images of different sizes; one image after a long text
SEQS = [((23,), []), ((5, 9), [(1, 8, 6)]), ((3, 4, 6), [(1, 4, 4), (1, 6, 8)]), ((31, 2), [(1, 4, 4)])]
pytestmark = pytest.mark.usefixtures("one_thread")
VISION_IDS = [tiny.IMAGE, tiny.VIDEO, tiny.VISION_START, tiny.VISION_END]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def ours(vl_dir):
    return M.load_model(vl_dir).eval()


@pytest.fixture(scope="module")
def oracle(vl_dir):
    return AutoModelForImageTextToText.from_pretrained(vl_dir, dtype=torch.float32).eval()


def samples():
    return [tiny.sample(lens, grids, seed=i) for i, (lens, grids) in enumerate(SEQS)]


def prompts():
    return [{"input_ids": ids, "pixel_values": pixels, "image_grid_thw": grid} for ids, pixels, grid in samples()]


@torch.no_grad()
def oracle_greedy(oracle, ids, pixels=None, grid=None, new_tokens=NEW_TOKENS):
    """transformers' greedy continuation of one prompt (vision ids suppressed as ours bans them)
    and the log-prob of each chosen token under its logits."""
    vision = {} if pixels is None else {"pixel_values": pixels, "image_grid_thw": grid,
                                        "mm_token_type_ids": tiny.mm_token_type_ids(ids)[None]}
    out = oracle.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], **vision,
                          max_new_tokens=new_tokens, do_sample=False, suppress_tokens=VISION_IDS,
                          return_dict_in_generate=True, output_logits=True)
    tokens = out.sequences[0, len(ids):]
    logits = torch.stack(out.logits)[:, 0]
    return tokens.tolist(), torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0]


@pytest.fixture(scope="module")
def oracle_outputs(oracle):
    return [oracle_greedy(oracle, *s) for s in samples()]


def slot_len(new_tokens):
    """One slot's tokens for prompts(): the longest prompt + new_tokens."""
    return max(len(p["input_ids"]) for p in prompts()) + new_tokens


# ----------------------------------------------------------------------------- greedy parity

@pytest.mark.parametrize("slots, check_every", [(None, 4), (1, 3)])
def test_greedy_matches_transformers_generate(ours, oracle_outputs, slots, check_every):
    """Every prompt at once, or one slot that the prompts take in turn."""
    budget = slots and slots * slot_len(NEW_TOKENS)
    out = G.generate(ours, prompts(), eos_ids=(), greedy=True, max_new_tokens=NEW_TOKENS, kv_budget=budget,
                     check_every=check_every)
    assert [(c.prompt_index, c.sample) for c in out] == [(i, 0) for i in range(len(SEQS))]
    for c, (tokens, logprobs) in zip(out, oracle_outputs):
        assert c.token_ids == tokens
        assert c.finish_reason == "length" and c.text is None
        assert (torch.tensor(c.logprobs) - logprobs).abs().max() <= 1e-4


def decoded_rows(model):
    """Rows of every decoder pass, recorded on layer 0's first norm (the engine calls the layers'
    forward directly, so a hook on the layer itself would not run)."""
    rows_seen = []
    return rows_seen, model.model.layers[0].input_layernorm.register_forward_hook(
        lambda module, args, out: rows_seen.append(args[0].shape[0]))


def stopped_at(outputs, eos_ids):
    """Each greedy row cut where it first makes one of `eos_ids`, with its finish reason."""
    rows = []
    for tokens, _ in outputs:
        stop = min((tokens.index(e) + 1 for e in eos_ids if e in tokens), default=None)
        rows.append((tokens[:stop], "stop" if stop else "length"))
    return rows


def mixed_stops(rows):
    """Some rows stop and some run to the length limit, each row at a step of its own."""
    return {reason for _, reason in rows} == {"stop", "length"} and len({len(row) for row, _ in rows}) == len(rows)


@pytest.mark.parametrize("check_every", [1, 3])
def test_eos_stops_each_row_and_finished_rows_leave_the_batch(ours, oracle_outputs, check_every):
    # the first two EOS ids (in order of appearance in the greedy outputs) that mix the stops
    tokens = list(dict.fromkeys(t for row, _ in oracle_outputs for t in row))
    eos_ids = next(pair for pair in itertools.combinations(tokens, 2) if mixed_stops(stopped_at(oracle_outputs, pair)))
    expected = stopped_at(oracle_outputs, eos_ids)

    rows_seen, hook = decoded_rows(ours)
    try:
        out = G.generate(ours, prompts(), eos_ids=eos_ids, greedy=True, max_new_tokens=NEW_TOKENS,
                         check_every=check_every)
    finally:
        hook.remove()
    assert [(c.token_ids, c.finish_reason) for c in out] == expected
    # the prefill packs every prompt token; between two checks every row live at the first decodes
    # (a row that stopped in between only idles), and a check sends the finished rows away
    lengths = [len(tokens) for tokens, _ in expected]
    decoded, count = [], 1  # tokens each row has at a check
    while any(n > count for n in lengths):
        steps = min(check_every, NEW_TOKENS - count)
        decoded += [sum(n > count for n in lengths)] * steps
        count += steps
    assert rows_seen == [sum(len(ids) for ids, _, _ in samples())] + decoded


@torch.no_grad()
def test_plain_qwen2_text_checkpoint_matches_transformers(tmp_path):
    tiny.save_qwen2_text(tmp_path)
    oracle = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = M.load_model(tmp_path).eval()
    batch = [torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 19)]
    out = G.generate(ours, [{"input_ids": ids} for ids in batch], eos_ids=(), greedy=True, max_new_tokens=NEW_TOKENS)
    for c, ids in zip(out, batch):
        assert c.token_ids == oracle_greedy(oracle, ids)[0]


# ----------------------------------------------------------------------------- groups and the budget

@pytest.mark.parametrize("slots", [None, 3])
def test_group_prefill_runs_vision_and_prompt_once_per_prompt(ours, slots):
    """8 samples of each prompt: all at once (one packed prefill), or 3 slots at a time, in which
    case a prompt's later samples copy its keys/values from a sibling's slot instead of prefilling."""
    patches_seen = []
    vision_hook = ours.visual.register_forward_hook(lambda module, args, out: patches_seen.append(args[0].shape[0]))
    rows_seen, hook = decoded_rows(ours)
    try:
        grouped = G.generate(ours, prompts(), eos_ids=(), n=8, greedy=True, max_new_tokens=4,
                             kv_budget=slots and slots * slot_len(4))
    finally:
        vision_hook.remove()
        hook.remove()
    batch = samples()
    patches = [len(pixels) for _, pixels, _ in batch if pixels is not None]
    if slots is None:
        assert patches_seen == [sum(patches)]
        assert rows_seen == [sum(len(ids) for ids, _, _ in batch)] + [8 * len(batch)] * 3
    else:  # a prompt's first 3, 2 or 1 samples prefill it (packed with the next prompt's when both start)
        assert sum(patches_seen) == sum(patches) and max(rows_seen) <= sum(len(ids) for ids, _, _ in batch)
    # fanning the cache out is exact: each of the 8 greedy rows is the prompt generated alone
    alone = G.generate(ours, prompts(), eos_ids=(), greedy=True, max_new_tokens=4)
    assert [(c.prompt_index, c.sample, c.token_ids) for c in grouped] == \
        [(c.prompt_index, k, c.token_ids) for c in alone for k in range(8)]


def test_cache_never_exceeds_the_budget(ours, monkeypatch):
    allocated = []
    new_slot_pool = G.new_slot_pool

    def counted(*args, **kwargs):
        pool = new_slot_pool(*args, **kwargs)
        allocated.append(pool.kv.nbytes)
        return pool
    monkeypatch.setattr(G, "new_slot_pool", counted)
    budget = 5 * slot_len(10) // 2  # room for 2.5 samples: 2 slots
    out = G.generate(ours, prompts(), eos_ids=(7, 11, 13), n=3, max_new_tokens=10, temperature=1.0, kv_budget=budget)
    per_token = G.kv_bytes_per_token(ours.cfg, torch.float32)
    assert per_token == 2 * 2 * 2 * 16 * 4  # layers x (K, V) x kv heads x head_dim x fp32 bytes
    assert allocated == [2 * slot_len(10) * per_token] and allocated[0] <= budget * per_token
    assert len(out) == 12 and any(c.finish_reason == "stop" for c in out)
    with pytest.raises(ValueError, match="holds no sample: one takes 49"):
        G.generate(ours, prompts(), eos_ids=(), max_new_tokens=10, kv_budget=slot_len(10) - 1)


def test_kv_budget_converts_gib_with_the_configs_shape():
    qwen_7b = M.ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                            num_attention_heads=28, num_key_value_heads=4)
    assert G.kv_bytes_per_token(qwen_7b, torch.bfloat16) == 57344  # 28 x 2 x 4 x 128 x 2 bytes
    assert G.kv_budget_tokens(qwen_7b, torch.bfloat16, gib=32) == 32 * 2**30 // 57344 == 599186
    assert G.kv_budget_tokens(qwen_7b, torch.float32, gib=32) == 299593
    assert G.kv_budget_tokens(qwen_7b, torch.bfloat16) == G.CPU_KV_BUDGET  # gib 0 on CPU


def test_kv_budget_on_cuda_counts_the_allocators_unused_cache_as_free(monkeypatch):
    """gib 0 on CUDA: half of what the driver reports free plus what PyTorch reserved and no tensor
    uses (after an update, freed gradients and activations stay reserved): 10 GiB free, 30 reserved,
    12 allocated -> half of 28 GiB of 56 KiB tokens."""
    qwen_7b = M.ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                            num_attention_heads=28, num_key_value_heads=4)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 30 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 12 * 2**30)
    assert G.kv_budget_tokens(qwen_7b, torch.bfloat16, device="cuda") == 14 * 2**30 // 57344


# ----------------------------------------------------------------------------- sampling

def test_sampling_is_seeded_and_logprobs_are_what_training_recomputes(ours):
    settings = dict(eos_ids=(), n=4, max_new_tokens=12, temperature=0.7, top_p=0.9, top_k=50)
    first = G.generate(ours, prompts(), seed=0, **settings)
    again = G.generate(ours, prompts(), seed=0, **settings)
    other = G.generate(ours, prompts(), seed=1, **settings)
    assert [(c.token_ids, c.logprobs) for c in first] == [(c.token_ids, c.logprobs) for c in again]
    assert [c.token_ids for c in first] != [c.token_ids for c in other]
    assert len({tuple(c.token_ids) for c in first}) == len(first)  # the samples of a group differ
    assert not {t for c in first for t in c.token_ids} & set(VISION_IDS)
    # each row's log-probs equal the packed training forward over prompt + completion at temperature 0.7
    batch = samples()
    for c in first:
        ids, pixels, grid = batch[c.prompt_index]
        sequence = torch.cat([ids, torch.tensor(c.token_ids)])
        cu = torch.tensor([0, len(sequence)], dtype=torch.int32)
        with torch.no_grad():
            logp = ours.packed_logprobs(sequence, cu, torch.roll(sequence, -1), pixels, grid, temperature=0.7)
        assert (logp[len(ids) - 1:-1] - torch.tensor(c.logprobs)).abs().max() <= 1e-4


def test_samples_do_not_depend_on_the_schedule(ours, monkeypatch):
    """A sample's tokens are a function of (seed, prompt id, sample index) alone: the same under any
    budget (down to one slot), check interval, prompt order, split of the prompts (ranks) and with
    the decode step replayed at padded pool sizes as the CUDA graphs run it."""
    settings = dict(eos_ids=(7, 11, 13), n=3, max_new_tokens=10, temperature=1.0, top_p=0.95, seed=21)
    batch, ids = prompts(), [100, 101, 102, 103]

    def by_stream(completions, prompt_ids):
        return {(prompt_ids[c.prompt_index], c.sample): (c.token_ids, c.finish_reason) for c in completions}

    reference = by_stream(G.generate(ours, batch, prompt_ids=ids, **settings), ids)
    assert len(reference) == 12 and {reason for _, reason in reference.values()} == {"stop", "length"}
    assert len({tuple(tokens) for tokens, _ in reference.values()}) == 12
    for slots, check_every in ((1, 4), (3, 1), (5, 7), (None, 1)):  # one slot, one group, ...
        budget = slots and slots * slot_len(10)
        out = G.generate(ours, batch, prompt_ids=ids, kv_budget=budget, check_every=check_every, **settings)
        assert by_stream(out, ids) == reference, (slots, check_every)
    assert by_stream(G.generate(ours, batch[::-1], prompt_ids=ids[::-1], **settings), ids[::-1]) == reference
    for rank in range(2):
        assert by_stream(G.generate(ours, batch[rank::2], prompt_ids=ids[rank::2], **settings), ids[rank::2]) \
            .items() <= reference.items()
    monkeypatch.setattr(G, "capture_cuda_graph", lambda fn, memory=None: (fn, None))  # run, not capture
    graphed = G.generate(ours, batch, prompt_ids=ids, kv_budget=5 * slot_len(10), cuda_graphs=True, **settings)
    assert by_stream(graphed, ids) == reference


def truncated_softmax(logits, temperature, top_k, top_p, banned):
    """The distribution sample_next must draw from, written out step by step in float64."""
    p = torch.softmax(logits.double() / temperature, -1)
    p[banned] = 0
    p /= p.sum()
    ranked = torch.argsort(p, descending=True).tolist()
    if top_k:
        p[ranked[top_k:]] = 0
        p /= p.sum()
    keep, mass = [], 0.0
    for token in ranked:
        if mass >= top_p:
            break
        keep.append(token)
        mass += p[token].item()
    out = torch.zeros_like(p)
    out[keep] = p[keep] / p[keep].sum()
    return out


def stream_noise(draws, along):
    """Noise of `draws` draws: the first decode position of `draws` samples' streams, or the first
    `draws` positions of one sample's stream."""
    if along == "samples":
        keys = torch.tensor([G.stream_key(0, 0, j) for j in range(draws)])
        return G.stream_uniform(keys, torch.zeros_like(keys))
    return G.stream_uniform(torch.full((draws,), G.stream_key(0, 0, 0)), torch.arange(draws))


@pytest.mark.parametrize("temperature, top_k, top_p, along", [(0.7, 0, 1.0, "samples"), (0.1, 40, 0.6, "samples"),
                                                             (1.0, 0, 0.9, "positions")])
def test_token_frequencies_match_the_truncated_softmax(ours, temperature, top_k, top_p, along):
    ids, pixels, grid = samples()[1]
    with torch.no_grad():
        logits = ours(ids[None], pixel_values=pixels, image_grid_thw=grid)[0, -1]
    logits[VISION_IDS] += 5.0  # the vision placeholders become the likeliest tokens: the ban must hold
    draws = 20_000
    tokens, logprobs = G.sample_next(logits.expand(draws, -1), temperature, top_p, top_k,
                                     banned=torch.tensor(VISION_IDS), uniform=stream_noise(draws, along))
    expected = truncated_softmax(logits, temperature, top_k, top_p, VISION_IDS)
    counts = torch.bincount(tokens, minlength=len(logits)).double()
    support = expected > 0
    assert counts[~support].sum() == 0
    assert (draws * expected[support]).min() >= 5  # chi-square's validity condition
    chi2 = ((counts[support] - draws * expected[support]) ** 2 / (draws * expected[support])).sum()
    dof = int(support.sum()) - 1
    p_value = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), chi2 / 2)
    assert dof >= 5 and p_value > 1e-3, (dof, chi2.item())  # several tokens in the cut, frequencies as expected
    assert torch.allclose(logprobs, torch.log_softmax(logits / temperature, -1)[tokens], atol=1e-6)


def test_sample_next_docstring_example():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    token, logprob = G.sample_next(logits, greedy=True)
    assert token.tolist() == [0] and abs(logprob.item() - (2 - torch.logsumexp(logits[0], 0).item())) <= 1e-6
    noise = stream_noise(20_000, "samples")
    tokens, _ = G.sample_next(logits.expand(20_000, -1), top_p=0.8, uniform=noise)
    counts = torch.bincount(tokens, minlength=4).tolist()
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] / 20_000 - 0.7311) <= 0.01  # e^2 / (e^2 + e^1); its standard error is 0.003
    tokens, _ = G.sample_next(logits.expand(20_000, -1), top_k=3, uniform=noise)
    assert torch.bincount(tokens, minlength=4)[3] == 0
    with pytest.raises(ValueError, match="temperature"):
        G.sample_next(logits, temperature=0.0)


def test_stream_noise_is_a_function_of_key_and_position():
    keys = torch.tensor([G.stream_key(0, 0, 0), G.stream_key(0, 0, 1), G.stream_key(1, 0, 0), G.stream_key(0, 0, 0)])
    counts = torch.tensor([0, 0, 0, 1])
    noise = G.stream_uniform(keys, counts)
    assert noise.dtype == torch.float64
    assert torch.equal(G.stream_uniform(keys.flip(0), counts.flip(0)), noise.flip(0))  # rows do not interact
    assert len(set(noise.tolist())) == 4  # sample, seed and position each change the stream
    assert G.stream_key(0, 3, 1) != G.stream_key(0, 1, 3) and 0 <= G.stream_key(-1, -1, -1) < 2**63
    for along in ("samples", "positions"):  # uniform on (0, 1): Kolmogorov-Smirnov distance of 20,000 draws
        u = stream_noise(20_000, along).sort().values
        assert u.min() > 0 and u.max() < 1
        grid = torch.arange(1, 20_001, dtype=torch.float64) / 20_000
        assert torch.maximum(grid - u, u - (grid - 1 / 20_000)).max() < 1.63 / 20_000**0.5  # p = 0.01
    # 52 bits: the low bits vary too (a 32-bit draw would leave multiples of 2^-32)
    assert ((stream_noise(1000, "samples") * 2.0**52 - 0.5) % 2**20).unique().numel() > 900


def test_evaluate_draws_each_record_from_its_own_streams():
    """evaluate.py's redraws (--retry-until-answer) take fresh streams named by (record, round, k-th
    redrawn sample of that record), so a record's samples never depend on its batch or rank."""
    import evaluate as E

    calls, texts = [], iter(["none", "<answer>1</answer>", "none", "none", "none", "<answer>2</answer>", "none",
                             "<answer>3</answer>", "none"])

    def sample(prompts, n, prompt_ids):
        calls.append(list(prompt_ids))
        return [G.Completion(p, k, [1], [], "stop", next(texts)) for p in range(len(prompts)) for k in range(n)]
    batch = [{"input_ids": [1]}, {"input_ids": [2]}]
    _, attempts = E.sample_until_answer(E.record_streams(sample, batch, [40, 7]), batch, n=2, retries=2)
    # record 40: none, answer; record 7: none, none. Round 1 redraws 40#0, 7#0, 7#1 (none, answer, none);
    # round 2 redraws 40#0 and 7#1, each the first of its record in that round
    assert calls == [[40, 7], [G.stream_key(40, 1, 0), G.stream_key(7, 1, 0), G.stream_key(7, 1, 1)],
                     [G.stream_key(40, 2, 0), G.stream_key(7, 2, 0)]]
    assert attempts == [3, 1, 2, 3]


# ----------------------------------------------------------------------------- the decode step

def live_pool(model, slots=4, slot_len=40, new_tokens=8, dtype=torch.float32):
    """A pool of `slots` slots, the last one free, the others mid-sample over random cached keys/values."""
    pool = G.new_slot_pool(model.cfg, slots, slot_len, new_tokens, dtype, "cpu")
    g = torch.Generator().manual_seed(0)
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=g))
    pool.tokens[:] = torch.tensor([5, 17, 250, 0])[:slots]
    pool.lengths[:] = torch.tensor([9, 30, 14, 0])[:slots]
    pool.positions[:] = torch.tensor([7, 25, 14, 0])[:slots]
    pool.counts[:] = torch.tensor([1, 6, 3, 0])[:slots]
    pool.keys[:] = torch.tensor([G.stream_key(0, p, 0) for p in range(slots)])
    pool.done[:] = torch.tensor([False, False, False, True])[:slots]
    return pool


@torch.no_grad()
def test_decode_step_traces_as_one_graph(ours):
    """The step a CUDA graph captures: torch.compile traces it whole (no graph break, which a host
    sync such as .item() or .tolist() would cause) and it computes what the eager step computes."""
    eos = torch.tensor([7, 11])
    sampler = functools.partial(G.draw, temperature=1.0, top_p=0.9, top_k=0, greedy=False,
                                banned=torch.tensor(VISION_IDS))
    rope = ours.rope_cos_sin(torch.arange(40).expand(3, -1), torch.float32)
    eager, traced = live_pool(ours), live_pool(ours)
    step = torch.compile(G.decode_step, fullgraph=True, backend="eager")
    for _ in range(3):
        expected = G.decode_step(ours, eager, 4, sampler, eos, rope, 40)
        got = step(ours, traced, 4, sampler, eos, rope, 40)
        assert torch.equal(got[0], expected[0]) and torch.allclose(got[1], expected[1])
    for name, value in vars(eager).items():
        assert torch.allclose(getattr(traced, name), value), name
    # slot 1 fills its 8 tokens at the second step and stops advancing; the free slot never moves
    assert eager.counts.tolist() == [4, 8, 6, 0] and eager.lengths.tolist() == [12, 32, 17, 0]
    assert eager.done.tolist() == [False, True, False, True]


@torch.no_grad()
def test_flash_decode_branch_matches_sdpa_in_bf16(vl_dir, monkeypatch):
    """The CUDA branch of cached_attention (flash-attn's flash_attn_with_kvcache) on CPU through the
    stand-in, which enforces the kernel's contracts (bf16/fp16, int32 cache_seqlens, [B, L, Hkv, D]
    caches written in place): three bf16 decode steps over a pool with a free slot draw the tokens
    the SDPA branch draws, write the same cache and state, and log-probs within bf16 rounding."""
    model = M.load_model(vl_dir, dtype=torch.bfloat16).eval()
    eos = torch.tensor([7, 11])
    sampler = functools.partial(G.draw, temperature=1.0, top_p=1.0, top_k=0, greedy=False,
                                banned=torch.tensor(VISION_IDS))
    rope = model.rope_cos_sin(torch.arange(40).expand(3, -1), torch.bfloat16)

    def steps(pool):
        return [G.decode_step(model, pool, 4, sampler, eos, rope, 40) for _ in range(3)]

    sdpa, flash = live_pool(model, dtype=torch.bfloat16), live_pool(model, dtype=torch.bfloat16)
    expected = steps(sdpa)
    calls = flash_attn_standin.install(monkeypatch)
    got = steps(flash)
    assert calls == [("flash_attn_with_kvcache", torch.bfloat16)] * 3 * len(model.model.layers)
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(got, expected):
        assert torch.equal(tokens, want_tokens) and (logprobs - want_logprobs).abs().max() <= 2e-2
    for name, value in vars(sdpa).items():
        if name in ("kv", "out_logprobs"):  # the same tokens' keys/values and log-probs, bf16 rounding apart
            assert (getattr(flash, name).float() - value.float()).abs().max() <= 2e-2, name
        else:
            assert torch.equal(getattr(flash, name), value), name


# ----------------------------------------------------------------------------- FSDP2

def test_fsdp2_generation_equals_unsharded(fsdp_checks):
    results = fsdp_checks["generate"]
    for rank in results:
        assert rank["got"] == rank["expected"], rank
        assert rank["sampled"] == rank["sampled_expected"], rank  # the same samples as one unsharded process
        assert rank["all_gathers"] == rank["fsdp_modules"]  # every module gathered once for the whole generation
        assert rank["layer_hooks"] == 0 and rank["vision_hooks"] <= rank["vision_blocks"] * 2, rank
        assert rank["resharded"] and rank["loss_diff"] <= 1e-5, rank
    assert len({len(tokens) for rank in results for tokens in rank["got"]}) > 1  # rows stopped at different steps
    assert results[0]["got"][0] != results[1]["got"][0]  # each rank generated its own prompts


# ----------------------------------------------------------------------------- command line

def test_cli_writes_one_line_per_completion(tiny_world, tmp_path):
    prompts_path, model_dir = f"{tiny_world}/data/test.jsonl", f"{tiny_world}/model"
    G.main(["--model", model_dir, "--prompts", prompts_path, "--out", str(tmp_path / "out.jsonl"),
            "--greedy", "--n", "2", "--max-new-tokens", "6", "--batch-size", "4"])
    lines = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    problems = data.load_problems(prompts_path)
    assert [(line["id"], line["sample"]) for line in lines] == [(p["id"], k) for p in problems for k in range(2)]
    assert all(set(line) == {"id", "sample", "token_ids", "text", "finish_reason"} for line in lines)
    processor = data.ChatProcessor(model_dir)
    expected = G.generate(M.load_model(model_dir).eval(), [processor.encode_problem(problems[5])],
                          eos_ids=processor.eos_token_ids, greedy=True, max_new_tokens=6)[0]
    for line in lines[10:12]:
        assert line["token_ids"] == expected.token_ids and line["finish_reason"] == expected.finish_reason
        assert line["text"] == processor.tokenizer.decode(expected.token_ids, skip_special_tokens=True)


def test_cli_rejects_bad_prompt_lines_before_loading_the_model(tiny_world, tmp_path, monkeypatch):
    good = json.loads(open(f"{tiny_world}/data/test.jsonl").readline())
    shutil.copy(f"{tiny_world}/data/{good['images'][0]}", tmp_path / "good.png")
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    records = [{**good, "images": ["good.png"]}, {**good, "id": "b", "images": ["missing.png"]},
               {**good, "id": "c", "images": ["corrupt.png"]},
               {**good, "id": "d", "images": ["good.png"], "question": ""}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))

    def no_model_work(*args, **kwargs):
        raise AssertionError("model work started before the prompt file was checked")

    monkeypatch.setattr(G.M, "load_model", no_model_work)
    monkeypatch.setattr(G.data, "ChatProcessor", no_model_work)
    with pytest.raises(SystemExit) as failure:
        G.main(["--model", f"{tiny_world}/model", "--prompts", str(path), "--out", str(tmp_path / "out.jsonl")])
    message = str(failure.value)
    assert f"{path}:2: missing image" in message
    assert f"{path}:3: unreadable image" in message
    assert f"{path}:4: missing question" in message
    assert f"{path}:1:" not in message
