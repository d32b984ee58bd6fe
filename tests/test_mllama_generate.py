"""generate.py on Llama 3.2 Vision against transformers' MllamaForConditionalGeneration.generate (the
oracle): greedy tokens and log-probs, samples that do not depend on the schedule, and each prompt's
image keys/values computed once for all its samples."""

import pytest
import torch
from transformers import MllamaForConditionalGeneration

import generate as G
import model as M
from tests import tiny_mllama as T

pytestmark = pytest.mark.usefixtures("one_thread")
NEW_TOKENS = 16
# text only; one image of 2 tiles after a text token (that token sees no tile); two images of 4 and 1 tiles
SEQS = [([1, 40, 41, 42, 43, 44, 45], []),
        ([1, 50, T.IMAGE, 51, 52, 53], [(28, 56)]),
        ([1, T.IMAGE, 60, 61, T.IMAGE, 62, 63, 64, 65], [(56, 56), (28, 28)])]


@pytest.fixture(scope="module")
def ours(mllama_dir):
    return M.load_model(mllama_dir).eval()


@pytest.fixture(scope="module")
def oracle(mllama_dir):
    model = MllamaForConditionalGeneration.from_pretrained(mllama_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # run every prompt to NEW_TOKENS, as eos_ids=() does here
    return model


def prompts():
    return [T.process(ids, sizes, seed=i) for i, (ids, sizes) in enumerate(SEQS)]


@pytest.fixture(scope="module")
def oracle_outputs(oracle):
    """transformers' greedy continuation of each prompt alone and the log-prob of each chosen token."""
    outputs = []
    for i, (ids, sizes) in enumerate(SEQS):
        with torch.no_grad():
            out = oracle.generate(**T.padded_batch([(ids, sizes)], seed=i), max_new_tokens=NEW_TOKENS,
                                  do_sample=False, pad_token_id=T.VOCAB - 1, return_dict_in_generate=True,
                                  output_logits=True)
        tokens = out.sequences[0, len(ids):]
        logprobs = torch.log_softmax(torch.stack(out.logits)[:, 0], -1).gather(1, tokens[:, None])[:, 0]
        outputs.append((tokens.tolist(), logprobs))
    return outputs


def slot_len(new_tokens):
    return max(len(ids) for ids, _ in SEQS) + new_tokens


@pytest.mark.parametrize("slots, check_every", [(None, 4), (1, 3)])
def test_greedy_matches_transformers_generate(ours, oracle_outputs, slots, check_every):
    """Every prompt at once (text-only and image rows in one decode batch), or one slot in turn."""
    out = G.generate(ours, prompts(), eos_ids=(), greedy=True, max_new_tokens=NEW_TOKENS,
                     kv_budget=slots and slots * slot_len(NEW_TOKENS), check_every=check_every)
    assert [(c.prompt_index, c.sample) for c in out] == [(i, 0) for i in range(len(SEQS))]
    for c, (tokens, logprobs) in zip(out, oracle_outputs):
        assert c.token_ids == tokens and c.finish_reason == "length"
        assert (torch.tensor(c.logprobs) - logprobs).abs().max() <= 1e-4


def test_samples_do_not_depend_on_the_schedule(ours, monkeypatch):
    """A sample's tokens depend on (seed, prompt id, sample index) alone: the same under any budget,
    check interval and prompt order, and with the decode step replayed at padded pool sizes as the
    CUDA graphs run it."""
    settings = dict(eos_ids=(7, 11, 13), n=3, max_new_tokens=10, temperature=1.0, top_p=0.95, seed=5)
    batch, ids = prompts(), [100, 101, 102]

    def by_stream(completions, prompt_ids):
        return {(prompt_ids[c.prompt_index], c.sample): (c.token_ids, c.finish_reason) for c in completions}

    reference = by_stream(G.generate(ours, batch, prompt_ids=ids, **settings), ids)
    assert len({tuple(tokens) for tokens, _ in reference.values()}) == 9  # the samples differ
    for slots, check_every in ((1, 4), (2, 1), (4, 3)):
        out = G.generate(ours, batch, prompt_ids=ids, kv_budget=slots * slot_len(10), check_every=check_every,
                         **settings)
        assert by_stream(out, ids) == reference, (slots, check_every)
    assert by_stream(G.generate(ours, batch[::-1], prompt_ids=ids[::-1], **settings), ids[::-1]) == reference
    monkeypatch.setattr(G, "capture_cuda_graph", lambda fn, memory=None: (fn, None))  # run, not capture
    graphed = G.generate(ours, batch, prompt_ids=ids, kv_budget=5 * slot_len(10), cuda_graphs=True, **settings)
    assert by_stream(graphed, ids) == reference


def test_sampled_logprobs_are_what_training_recomputes(ours):
    """Each sample's log-probs equal the packed training forward over prompt + completion at the
    same temperature, its response tokens seeing the tiles the prompt's last token sees."""
    out = G.generate(ours, prompts(), eos_ids=(), n=2, max_new_tokens=8, temperature=0.7, top_k=50, seed=3)
    for c in out:
        prompt = prompts()[c.prompt_index]
        completion = torch.tensor(c.token_ids)
        sequence = torch.cat([prompt["input_ids"], completion])
        images = {}
        if "pixel_values" in prompt:
            mask = prompt["cross_attention_mask"]
            images = {key: prompt[key] for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
            images.update(cross_attention_mask=torch.cat([mask, mask[-1:].expand(len(completion), -1, -1)]),
                          image_counts=[len(mask[0])])
        with torch.no_grad():
            targets = torch.roll(sequence, -1).clamp(max=T.VOCAB - 1)  # <|image|> is no head row; prompt rows unread
            logp = ours.packed_logprobs(sequence, torch.tensor([0, len(sequence)]), targets, temperature=0.7, **images)
        assert (logp[len(prompt["input_ids"]) - 1:-1] - torch.tensor(c.logprobs)).abs().max() <= 1e-4


@pytest.mark.parametrize("slots", [None, 2])
def test_image_keys_and_values_are_computed_once_per_prompt(ours, slots):
    """4 samples of each prompt, all at once or 2 slots at a time: the vision encoder sees each
    image once and each cross-attention layer projects each image's states once; every sample
    equals the prompt generated alone."""
    images_seen, keys_projected = [], []
    hooks = [ours.vision_model.register_forward_hook(lambda module, args, out: images_seen.append(args[0].shape[0]))]
    hooks += [layer.cross_attn.k_proj.register_forward_hook(
        lambda module, args, out: keys_projected.append(args[0].shape[0]))
        for layer in ours.language_model.model.layers if hasattr(layer, "cross_attn")]
    try:
        grouped = G.generate(ours, prompts(), eos_ids=(), n=4, greedy=True, max_new_tokens=4,
                             kv_budget=slots and slots * slot_len(4))
    finally:
        for hook in hooks:
            hook.remove()
    # the slots cache the 3 self-attention layers only: layers x (K, V) x kv heads x head_dim x fp32 bytes
    assert G.kv_bytes_per_token(G.decoder_config(ours), torch.float32) == 3 * 2 * 2 * 16 * 4
    images = sum(len(sizes) for _, sizes in SEQS)
    keys_per_image = T.MAX_TILES * 5  # tiles x (2 x 2 patches + class token)
    assert sum(images_seen) == images
    assert sum(keys_projected) == len(T.CROSS_LAYERS) * images * keys_per_image
    alone = G.generate(ours, prompts(), eos_ids=(), greedy=True, max_new_tokens=4)
    assert [(c.prompt_index, c.sample, c.token_ids) for c in grouped] == \
        [(c.prompt_index, k, c.token_ids) for c in alone for k in range(4)]


def test_cli_and_evaluate_sample_the_llama_checkpoint(mllama_dir, tmp_path):
    """generate.py and evaluate.py (which samples through the engine) take a Llama 3.2 Vision
    checkpoint: records with and without an image, each greedy output the engine's on its prompt."""
    import json

    import data
    import evaluate as E

    T.images([(40, 60)], seed=0)[0].save(tmp_path / "grid.png")
    records = [{"id": "a", "images": ["grid.png"], "question": "How many red squares are there?", "answer": "12"},
               {"id": "b", "images": [], "question": "Count the cells of the grid.", "answer": "3"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    G.main(["--model", str(mllama_dir), "--prompts", str(path), "--out", str(tmp_path / "out.jsonl"), "--greedy",
            "--max-new-tokens", "6"])
    lines = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    processor = data.ChatProcessor(str(mllama_dir))
    expected = G.generate(M.load_model(mllama_dir).eval(), [processor.encode_problem(r) for r in
                                                            data.load_prompts(str(path))],
                          eos_ids=processor.eos_token_ids, greedy=True, max_new_tokens=6)
    assert [(line["id"], line["token_ids"]) for line in lines] == [(r["id"], c.token_ids)
                                                                   for r, c in zip(records, expected)]
    summaries = E.main(["--model", str(mllama_dir), "--bench", "synthetic", "--data", str(path), "--out",
                        str(tmp_path / "eval"), "--greedy", "--max-new-tokens", "6", "--attention", "sdpa"])
    assert [s["model"] for s in summaries] == [E.model_name(str(mllama_dir))]
    rows = data.read_append_only(tmp_path / "eval" / "synthetic" / E.model_name(str(mllama_dir)) / "samples.jsonl")
    assert {row["id"]: row["response"] for row in rows} == {line["id"]: line["text"] for line in lines}
    assert all(line["text"] for line in lines)  # the texts compared are not empty


@torch.no_grad()
def test_flash_branches_match_sdpa_in_bf16(mllama_dir, flash_attn):
    """The engine's CUDA branches (flash-attn's varlen prefill of the self-attention layers,
    flash_attn_with_kvcache in every decode layer: the slots' cache, and the prompts' image cache
    read in place by cache_batch_idx), through the stand-in that enforces their contracts, on the
    Llama model in bf16: the greedy tokens of the SDPA branches, log-probs within bf16 rounding."""
    model = M.load_model(mllama_dir, dtype=torch.bfloat16).eval()
    settings = dict(eos_ids=(), greedy=True, max_new_tokens=6, check_every=1)  # before a near tie at 8
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(M, "use_flash", lambda q: False)
        expected = G.generate(model, prompts(), **settings)
    got = G.generate(model, prompts(), **settings)
    layers = len(model.language_model.model.layers)
    assert flash_attn.count(("flash_attn_varlen_func", torch.bfloat16)) == layers - len(T.CROSS_LAYERS)  # prefill
    assert flash_attn.count(("flash_attn_with_kvcache", torch.bfloat16)) == 5 * layers  # 5 decode steps
    for c, want in zip(got, expected):
        assert c.token_ids == want.token_ids
        assert (torch.tensor(c.logprobs) - torch.tensor(want.logprobs)).abs().max() <= 2e-2


def test_decode_step_traces_as_one_graph(ours, oracle_outputs, monkeypatch):
    """The step a CUDA graph captures, on the Llama model: torch.compile traces it whole (no graph
    break, which a host sync such as .item() or .tolist() would cause), image cache included, and
    the greedy tokens stay transformers'."""
    monkeypatch.setattr(G, "decode_step", torch.compile(G.decode_step, fullgraph=True, backend="eager"))
    out = G.generate(ours, prompts(), eos_ids=(), greedy=True, max_new_tokens=4)
    assert [c.token_ids for c in out] == [tokens[:4] for tokens, _ in oracle_outputs]
