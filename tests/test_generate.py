"""generate.py against transformers' generate (the oracle), against our own training forward, and
against the sampling definitions; the CLI on the synthetic world; FSDP2 under torchrun."""

import itertools
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

import data
import generate as G
import model as M
from tests import tiny
from tests.test_fsdp import torchrun

# text only; one image (grid 8x6); two images of different sizes; one image after a long text
SEQS = [((23,), []), ((5, 9), [(1, 8, 6)]), ((3, 4, 6), [(1, 4, 4), (1, 6, 8)]), ((31, 2), [(1, 4, 4)])]
VISION_IDS = [tiny.IMAGE, tiny.VIDEO, tiny.VISION_START, tiny.VISION_END]
NEW_TOKENS = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread avoids oversubscription stalls on the shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# ----------------------------------------------------------------------------- greedy parity

def test_greedy_matches_transformers_generate(ours, oracle_outputs):
    out = G.generate(ours, prompts(), eos_ids=(), greedy=True, max_new_tokens=NEW_TOKENS)
    assert [(c.prompt_index, c.sample) for c in out] == [(i, 0) for i in range(len(SEQS))]
    for c, (tokens, logprobs) in zip(out, oracle_outputs):
        assert c.token_ids == tokens
        assert c.finish_reason == "length" and c.text is None
        assert (torch.tensor(c.logprobs) - logprobs).abs().max() <= 1e-4


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


def test_eos_stops_each_row_and_finished_rows_leave_the_batch(ours, oracle_outputs):
    # the first two EOS ids (in order of appearance in the greedy outputs) that mix the stops
    tokens = list(dict.fromkeys(t for row, _ in oracle_outputs for t in row))
    eos_ids = next(pair for pair in itertools.combinations(tokens, 2) if mixed_stops(stopped_at(oracle_outputs, pair)))
    expected = stopped_at(oracle_outputs, eos_ids)

    rows_seen = []
    hook = ours.model.layers[0].register_forward_hook(lambda module, args, out: rows_seen.append(args[0].shape[0]))
    try:
        out = G.generate(ours, prompts(), eos_ids=eos_ids, greedy=True, max_new_tokens=NEW_TOKENS)
    finally:
        hook.remove()
    assert [(c.token_ids, c.finish_reason) for c in out] == expected
    # the prefill packs every prompt token; decode step s (making token s + 1) runs only the rows still going
    lengths = [len(tokens) for tokens, _ in expected]
    prefill_tokens = sum(len(ids) for ids, _, _ in samples())
    assert rows_seen == [prefill_tokens] + [sum(n > s for n in lengths) for s in range(1, max(lengths))]


@torch.no_grad()
def test_plain_qwen2_text_checkpoint_matches_transformers(tmp_path):
    tiny.save_qwen2_text(tmp_path)
    oracle = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = M.load_model(tmp_path).eval()
    batch = [torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 19)]
    out = G.generate(ours, [{"input_ids": ids} for ids in batch], eos_ids=(), greedy=True, max_new_tokens=NEW_TOKENS)
    for c, ids in zip(out, batch):
        assert c.token_ids == oracle_greedy(oracle, ids)[0]


# ----------------------------------------------------------------------------- groups

def test_group_prefill_runs_vision_and_prompt_once_per_prompt(ours):
    patches_seen, rows_seen = [], []
    hooks = [ours.visual.register_forward_hook(lambda module, args, out: patches_seen.append(args[0].shape[0])),
             ours.model.layers[0].register_forward_hook(lambda module, args, out: rows_seen.append(args[0].shape[0]))]
    try:
        grouped = G.generate(ours, prompts(), eos_ids=(), n=8, greedy=True, max_new_tokens=4)
    finally:
        for hook in hooks:
            hook.remove()
    batch = samples()
    assert patches_seen == [sum(len(pixels) for _, pixels, _ in batch if pixels is not None)]
    assert rows_seen == [sum(len(ids) for ids, _, _ in batch)] + [8 * len(batch)] * 3
    # fanning the cache out is exact: each of the 8 greedy rows is the prompt generated alone
    alone = G.generate(ours, prompts(), eos_ids=(), greedy=True, max_new_tokens=4)
    assert [(c.prompt_index, c.sample, c.token_ids) for c in grouped] == \
        [(c.prompt_index, k, c.token_ids) for c in alone for k in range(8)]


# ----------------------------------------------------------------------------- sampling

def test_sampling_is_seeded_and_logprobs_are_what_training_recomputes(ours):
    settings = dict(eos_ids=(), n=4, max_new_tokens=12, temperature=0.7, top_p=0.9, top_k=50)
    first = G.generate(ours, prompts(), generator=torch.Generator().manual_seed(0), **settings)
    again = G.generate(ours, prompts(), generator=torch.Generator().manual_seed(0), **settings)
    other = G.generate(ours, prompts(), generator=torch.Generator().manual_seed(1), **settings)
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


def test_per_prompt_generators_make_samples_independent_of_the_batch(ours):
    """GRPO seeds one generator per prompt so that a group's samples do not depend on which
    other prompts share the batch (or the rank), and eos-stopped rows do not shift the draws."""
    settings = dict(eos_ids=(7, 11, 13), n=3, max_new_tokens=10, temperature=1.0)
    batch = prompts()
    together = G.generate(ours, batch, generator=[torch.Generator().manual_seed(100 + i) for i in range(len(batch))],
                          **settings)
    for i, prompt in enumerate(batch):
        alone = G.generate(ours, [prompt], generator=[torch.Generator().manual_seed(100 + i)], **settings)
        assert [c.token_ids for c in alone] == [c.token_ids for c in together if c.prompt_index == i]
    assert any(c.finish_reason == "stop" for c in together)


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


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (0.1, 40, 0.6)])
def test_first_token_distribution_matches_truncated_softmax(ours, temperature, top_k, top_p):
    ids, pixels, grid = samples()[1]
    with torch.no_grad():
        logits = ours(ids[None], pixel_values=pixels, image_grid_thw=grid)[0, -1]
    logits[VISION_IDS] += 5.0  # the vision placeholders become the likeliest tokens: the ban must hold
    draws = 20_000
    tokens, logprobs = G.sample_next(logits.expand(draws, -1), temperature, top_p, top_k,
                                     torch.Generator().manual_seed(0), banned=torch.tensor(VISION_IDS))
    expected = truncated_softmax(logits, temperature, top_k, top_p, VISION_IDS)
    counts = torch.bincount(tokens, minlength=len(logits)).double()
    support = expected > 0
    assert counts[~support].sum() == 0
    assert (draws * expected[support]).min() >= 5  # chi-square's validity condition
    chi2 = ((counts[support] - draws * expected[support]) ** 2 / (draws * expected[support])).sum()
    dof = int(support.sum()) - 1
    p_value = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), chi2 / 2)
    assert p_value > 1e-3, (dof, chi2.item())
    assert torch.allclose(logprobs, torch.log_softmax(logits / temperature, -1)[tokens], atol=1e-6)


def test_sample_next_docstring_example():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    token, logprob = G.sample_next(logits, greedy=True)
    assert token.tolist() == [0] and abs(logprob.item() - (2 - torch.logsumexp(logits[0], 0).item())) <= 1e-6
    tokens, _ = G.sample_next(logits.expand(20_000, -1), top_p=0.8, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=4).tolist()
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] / 20_000 - 0.7311) <= 0.01  # e^2 / (e^2 + e^1); its standard error is 0.003
    tokens, _ = G.sample_next(logits.expand(20_000, -1), top_k=3, generator=torch.Generator().manual_seed(0))
    assert torch.bincount(tokens, minlength=4)[3] == 0
    with pytest.raises(ValueError, match="temperature"):
        G.sample_next(logits, temperature=0.0)


# ----------------------------------------------------------------------------- FSDP2

def test_fsdp2_generation_equals_unsharded(tmp_path):
    tiny.save_vl(tmp_path)
    results = json.loads(torchrun("tests/generate_fsdp_worker.py", tmp_path,
                                  rerun_on_teardown_abort=True).strip().splitlines()[-1])
    for rank in results:
        assert rank["got"] == rank["expected"], rank
        assert rank["all_gathers"] == rank["fsdp_modules"]  # every module gathered once for the whole generation
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
