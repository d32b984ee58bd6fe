"""model.py against transformers (the oracle) on tiny random-weight checkpoints."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

import model as M
from tests import tiny

torch.set_num_threads(2)
TOL = 1e-4

# three sequences: text only, one image (grid 8x6: partial attention windows), two images of different sizes
SEQS = [((23,), []), ((5, 9), [(1, 8, 6)]), ((3, 4, 6), [(1, 4, 4), (1, 6, 8)])]


@pytest.fixture(scope="module")
def oracle(vl_dir):
    return AutoModelForImageTextToText.from_pretrained(vl_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(vl_dir):
    return M.load_model(vl_dir).eval()


def samples():
    return [tiny.sample(lens, grids, seed=i) for i, (lens, grids) in enumerate(SEQS)]


def right_padded(batch):
    T = max(len(ids) for ids, _, _ in batch)
    input_ids = torch.zeros(len(batch), T, dtype=torch.long)
    mask = torch.zeros(len(batch), T, dtype=torch.long)
    for i, (ids, _, _) in enumerate(batch):
        input_ids[i, :len(ids)] = ids
        mask[i, :len(ids)] = 1
    pixels = [p for _, p, _ in batch if p is not None]
    grids = [g for _, _, g in batch if g is not None]
    return input_ids, mask, torch.cat(pixels) if pixels else None, torch.cat(grids) if grids else None


@torch.no_grad()
def oracle_logits(oracle, ids, pixels, grid):
    return oracle(input_ids=ids[None], pixel_values=pixels, image_grid_thw=grid,
                  mm_token_type_ids=tiny.mm_token_type_ids(ids)[None]).logits[0]


@pytest.mark.parametrize("which", range(len(SEQS)))
@torch.no_grad()
def test_single_sequence_logits_match_transformers(oracle, ours, which):
    ids, pixels, grid = samples()[which]
    expected = oracle_logits(oracle, ids, pixels, grid)
    got = ours(ids[None], pixel_values=pixels, image_grid_thw=grid)[0]
    assert (got - expected).abs().max() <= TOL


@torch.no_grad()
def test_right_padded_batch_matches_transformers(oracle, ours):
    batch = samples()
    input_ids, mask, pixels, grid = right_padded(batch)
    expected = oracle(input_ids=input_ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                      mm_token_type_ids=tiny.mm_token_type_ids(input_ids)).logits
    got = ours(input_ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid)
    keep = mask.bool()
    assert (got[keep] - expected[keep]).abs().max() <= TOL
    # each row also equals the sequence run alone
    for i, (ids, p, g) in enumerate(batch):
        assert (got[i, :len(ids)] - oracle_logits(oracle, ids, p, g)).abs().max() <= TOL


@torch.no_grad()
def test_packed_forward_matches_per_sequence_oracle(oracle, ours):
    batch = samples()
    input_ids = torch.cat([ids for ids, _, _ in batch])
    cu = torch.tensor([0] + [len(ids) for ids, _, _ in batch]).cumsum(0).to(torch.int32)
    pixels = torch.cat([p for _, p, _ in batch if p is not None])
    grid = torch.cat([g for _, _, g in batch if g is not None])
    hidden = ours.forward_packed(input_ids, cu, pixels, grid)
    logits = hidden @ ours.head_weight.t()
    expected = torch.cat([oracle_logits(oracle, *s) for s in batch])
    assert (logits - expected).abs().max() <= TOL


def test_mrope_positions_equal_get_rope_index(oracle):
    batch = samples()
    input_ids, mask, _, grid = right_padded(batch)
    expected, _ = oracle.model.get_rope_index(input_ids, tiny.mm_token_type_ids(input_ids), grid, attention_mask=mask)
    grids = [g for _, _, g in batch]
    for i, (ids, _, _) in enumerate(batch):
        got = M.mrope_positions(ids, grids[i], tiny.IMAGE, tiny.MERGE)
        assert torch.equal(got, expected[:, i, :len(ids)])


def test_mrope_docstring_example():
    ids = torch.tensor([1, 2] + [tiny.IMAGE] * 4 + [3])
    pos = M.mrope_positions(ids, torch.tensor([[1, 4, 4]]), tiny.IMAGE, 2)
    assert pos.tolist() == [[0, 1, 2, 2, 2, 2, 4], [0, 1, 2, 2, 3, 3, 4], [0, 1, 2, 3, 2, 3, 4]]


def _relayout(src, dst, rename):
    os.makedirs(dst, exist_ok=True)
    state = load_file(os.path.join(src, "model.safetensors"))
    save_file({rename(k): v for k, v in state.items()}, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)


@torch.no_grad()
def test_both_key_layouts_load(vl_dir, ours, tmp_path):
    def to_new_layout(key):  # how transformers 4.52-4.57 name the weights
        if key.startswith("model."):
            return "model.language_model." + key[len("model."):]
        if key.startswith("visual."):
            return "model." + key
        return key

    _relayout(vl_dir, tmp_path / "new", to_new_layout)
    assert any(k.startswith("model.language_model.") for k in load_file(tmp_path / "new" / "model.safetensors"))
    other = M.load_model(tmp_path / "new")
    for (name, a), (_, b) in zip(ours.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 200_000])
@torch.no_grad()
def test_save_model_round_trips_through_transformers(ours, oracle, tmp_path, max_shard_bytes):
    (tmp_path / "src").mkdir()
    ours.source_dir = str(tmp_path / "src")
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}")
    M.save_model(ours, tmp_path / "out", max_shard_bytes=max_shard_bytes)
    sharded = os.path.exists(tmp_path / "out" / "model.safetensors.index.json")
    assert sharded == (max_shard_bytes < 5 * 2**30)
    assert (tmp_path / "out" / "tokenizer_config.json").exists()
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    for ids, pixels, grid in samples():
        a = oracle_logits(reloaded, ids, pixels, grid)
        assert torch.equal(a, oracle_logits(oracle, ids, pixels, grid))
    ours_again = M.load_model(tmp_path / "out")
    for (name, a), (_, b) in zip(ours.state_dict().items(), ours_again.state_dict().items()):
        assert torch.equal(a, b), name


@torch.no_grad()
def test_tied_embeddings_vl(tmp_path):
    tiny.save_vl(tmp_path, seed=3, tie=True)
    oracle = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = M.load_model(tmp_path)
    assert ours.lm_head is None
    ids, pixels, grid = samples()[1]
    assert (ours(ids[None], pixel_values=pixels, image_grid_thw=grid)[0]
            - oracle_logits(oracle, ids, pixels, grid)).abs().max() <= TOL


@torch.no_grad()
def test_plain_qwen2_text_checkpoint(tmp_path):
    tiny.save_qwen2_text(tmp_path)
    oracle = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = M.load_model(tmp_path)
    assert ours.visual is None and ours.cfg.mrope_section is None
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    expected = oracle(input_ids=ids, attention_mask=mask).logits
    got = ours(ids, attention_mask=mask)
    assert (got[mask.bool()] - expected[mask.bool()]).abs().max() <= TOL


def test_token_logprobs_values_and_gradients_match_naive():
    g = torch.Generator().manual_seed(0)
    T, H, V, tau = 37, 16, 101, 0.7
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (T,), generator=g)
    w_logp, w_ent = torch.randn(T, generator=g, dtype=torch.float64), torch.randn(T, generator=g, dtype=torch.float64)

    logits = (hidden @ weight.t()) / tau
    naive = torch.log_softmax(logits, -1)
    naive_logp = naive.gather(1, targets[:, None])[:, 0]
    naive_ent = -(naive.exp() * naive).sum(-1)
    naive_grads = torch.autograd.grad((naive_logp * w_logp + naive_ent * w_ent).sum(), (hidden, weight))

    assert M.head_chunk(H) == 16  # the default chunk: 3 blocks of rows, the last one short
    logp, ent = M.token_logprobs(hidden, weight, targets, temperature=tau, with_entropy=True)
    grads = torch.autograd.grad((logp * w_logp + ent * w_ent).sum(), (hidden, weight))
    assert (logp - naive_logp).abs().max() <= 1e-5 and (ent - naive_ent).abs().max() <= 1e-5
    for a, b in zip(grads, naive_grads):
        assert (a - b).abs().max() <= 1e-5

    # the real use: fp32 inputs, fp32 accumulation
    only_logp = M.token_logprobs(hidden.float(), weight.float(), targets, temperature=tau, chunk=1000)
    assert only_logp.dtype == torch.float32 and (only_logp - naive_logp).abs().max() <= 1e-5


def test_packed_logprobs_is_the_packed_forward_through_the_head(ours):
    ids, pixels, grid = samples()[1]
    cu = torch.tensor([0, len(ids)], dtype=torch.int32)
    targets = torch.roll(ids, -1)
    logp = ours.packed_logprobs(ids, cu, targets, pixels, grid)
    with torch.no_grad():
        logits = ours.forward_packed(ids, cu, pixels, grid) @ ours.head_weight.t()
    expected = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
    assert (logp.detach() - expected).abs().max() <= 1e-5
    logp.sum().backward()
    assert ours.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    ours.zero_grad(set_to_none=True)


def test_token_logprobs_gradient_when_entropy_is_only_logged():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 30, (9,), generator=g)
    logp, _ = M.token_logprobs(hidden, weight, targets, chunk=4, with_entropy=True)
    grads = torch.autograd.grad(logp.sum(), (hidden, weight))
    naive = torch.log_softmax(hidden @ weight.t(), -1).gather(1, targets[:, None]).sum()
    for a, b in zip(grads, torch.autograd.grad(naive, (hidden, weight))):
        assert (a - b).abs().max() <= 1e-10


@pytest.mark.parametrize("padded_attention", [True, False])
def test_shared_prompt_packing_equals_each_response_after_its_own_prompt(ours, monkeypatch, padded_attention):
    """Two prompts (text only; two images) packed once each with their responses (one empty;
    max_tokens splits the second group over two batches) give every response the log-probs and
    the gradients it gets packed after its own copy of the prompt, in both SDPA paths."""
    import data

    if not padded_attention:
        monkeypatch.setattr(M, "PADDED_ATTENTION_MAX_SCORES", 0)
    groups = tiny.shared_prompt_groups(samples()[0], samples()[2])
    batches = data.pack_shared_prompts(groups, max_tokens=len(groups[1]["input_ids"]) + 14)
    assert [b["rows"] for b in batches] == [[0, 1, 2], [3, 4], [5]]  # group 2 split: its prompt packed twice
    weight = ours.model.layers[0].self_attn.k_proj.weight
    ours.zero_grad(set_to_none=True)

    shared = torch.zeros(6, 9)
    for b in batches:
        logp = ours.packed_logprobs(b["input_ids"], b["cu_seqlens"], b["targets"], b["pixel_values"],
                                    b["image_grid_thw"], temperature=0.7, positions=b["positions"],
                                    prefix_of=b["prefix_of"])
        (logp * torch.arange(len(logp))).sum().backward()  # position-dependent weights: a misplaced token shows
        mask = torch.arange(9) < b["lengths"][:, None]
        shared[b["rows"]] = torch.zeros(mask.shape).masked_scatter(mask, logp.detach())
    shared_grad, weight.grad = weight.grad, None

    separate = torch.zeros(6, 9)
    for group in groups:
        for row, response in zip(group["rows"], group["continuations"]):
            if not response:
                continue
            prompt_len = len(group["input_ids"])
            ids = torch.tensor(group["input_ids"] + response)
            cu = torch.tensor([0, len(ids)], dtype=torch.int32)
            logp = ours.packed_logprobs(ids, cu, torch.roll(ids, -1), group["pixel_values"], group["image_grid_thw"],
                                        temperature=0.7)[prompt_len - 1:-1]
            separate[row, :len(response)] = logp.detach()
            separate_rows = [b for b in batches if row in b["rows"]][0]
            first = sum(int(n) for r, n in zip(separate_rows["rows"], separate_rows["lengths"]) if r < row)
            (logp * (first + torch.arange(len(logp)))).sum().backward()
    assert (shared - separate).abs().max() <= 1e-5
    assert (shared_grad - weight.grad).abs().max() <= 1e-4 * weight.grad.abs().max()
    ours.zero_grad(set_to_none=True)


def test_shared_prompt_gradients_repeat_exactly_on_two_threads(ours):
    """One prompt packed once for 16 responses (a GRPO group): its key and last-position gradients
    sum 16 contributions each. Two CPU threads must give the same gradients bit for bit on every
    backward, or a GRPO run does not repeat itself (advanced indexing's backward adds repeated
    rows with atomics on several threads; this failed with k[key_index])."""
    import data

    ids, pixels, grid = samples()[0]
    g = torch.Generator().manual_seed(0)
    group = {"input_ids": ids.tolist(), "pixel_values": pixels, "image_grid_thw": grid, "rows": list(range(16)),
             "continuations": [torch.randint(0, 300, (60,), generator=g).tolist() for _ in range(16)]}
    (batch,) = data.pack_shared_prompts([group], max_tokens=4096)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(6):
            ours.zero_grad(set_to_none=True)
            logp = ours.packed_logprobs(batch["input_ids"], batch["cu_seqlens"], batch["targets"],
                                        positions=batch["positions"], prefix_of=batch["prefix_of"])
            (logp * torch.linspace(-1, 1, len(logp))).sum().backward()
            grads.append([p.grad.clone() for p in ours.parameters() if p.grad is not None])
    finally:
        torch.set_num_threads(threads)
        ours.zero_grad(set_to_none=True)
    assert all(torch.equal(a, b) for other in grads[1:] for a, b in zip(grads[0], other))


def test_length_groups_docstring_example():
    assert M.length_groups([100, 20, 90, 30, 16]) == [[0, 2], [3], [1, 4]]
    assert M.length_groups([5, 5, 5]) == [[0, 1, 2]] and M.length_groups([]) == []


@pytest.mark.parametrize("shared_prefix", [False, True])
@pytest.mark.parametrize("without_mask", [False, True])
def test_grouped_padded_attention_equals_attention_sequence_by_sequence(monkeypatch, shared_prefix, without_mask):
    """Five sequences in three or four length groups (causal, grouped-query; with shared-prefix keys, the
    responses' queries after their prompt's keys): outputs and gradients equal one SDPA call per
    sequence (float64, so any misplaced token or mask shows). `without_mask`: the CUDA branch on CPU
    (`model.CAUSAL_WITHOUT_MASK_DEVICES`), every call 4-d with SDPA's own causal mask over as many
    queries as keys, no mask tensor (what its fused CUDA kernels take), grouped and sequence by
    sequence, against the CPU branch's masks."""
    lengths, prefix_of = [9, 2, 8, 3, 2], ([-1, 0, 0, -1, 3] if shared_prefix else [-1] * 5)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    key_index, cu_k = M.shared_prefix_keys(cu, prefix_of)
    assert len(M.length_groups((cu_k[1:] - cu_k[:-1]).tolist())) >= 3
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(int(cu[-1]), heads, 4, generator=g, dtype=torch.float64, requires_grad=True)
               for heads in (4, 2, 2))
    weights = torch.randn(int(cu[-1]), 4, 4, generator=g, dtype=torch.float64)

    def attention():
        out = M.varlen_attention(q, k.index_select(0, key_index), v.index_select(0, key_index), cu, causal=True,
                                 cu_seqlens_k=cu_k)
        return (out,) + torch.autograd.grad((out * weights).sum(), (q, k, v))

    reference = attention()  # the CPU branch, grouped
    calls = []
    if without_mask:
        sdpa = M.F.scaled_dot_product_attention

        def recorded(query, key, value, **kwargs):
            calls.append((query.dim(), query.shape[-2], key.shape[-2], kwargs["attn_mask"], kwargs["is_causal"]))
            return sdpa(query, key, value, **kwargs)
        monkeypatch.setattr(M, "CAUSAL_WITHOUT_MASK_DEVICES", ("cpu",))
        monkeypatch.setattr(M.F, "scaled_dot_product_attention", recorded)
        for a, b in zip(reference, attention()):
            assert (a - b).abs().max() <= 1e-12
    monkeypatch.setattr(M, "PADDED_ATTENTION_MAX_SCORES", 0)
    for a, b in zip(reference, attention()):
        assert (a - b).abs().max() <= 1e-12
    groups = len(M.length_groups((cu_k[1:] - cu_k[:-1]).tolist()))
    assert len(calls) == (groups + len(lengths)) * without_mask
    # SDPA's fused kernels: 4-d inputs, no mask, is_causal with as many queries as keys
    assert all(dim == 4 and lq == lk and mask is None and is_causal for dim, lq, lk, mask, is_causal in calls)


def test_shared_prefix_keys_docstring_example():
    key_index, cu_k = M.shared_prefix_keys(torch.tensor([0, 3, 5, 6], dtype=torch.int32), [-1, 0, 0])
    assert key_index.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 5] and cu_k.tolist() == [0, 3, 8, 12]
    with pytest.raises(ValueError, match="continues sequence 1"):
        M.shared_prefix_keys(torch.tensor([0, 3, 5, 6], dtype=torch.int32), [-1, 0, 1])
