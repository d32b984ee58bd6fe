"""model_mllama.py against transformers' MllamaForConditionalGeneration (the oracle) on a tiny
random-weight checkpoint, with inputs from transformers' own image processor and cross-attention mask."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MllamaForConditionalGeneration, MllamaTextConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import model as M
import model_mllama as MM
from tests import tiny_mllama as tiny
from tests.test_fsdp import torchrun

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4
IMG = tiny.IMAGE


def text(n, seed):
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# (token ids, image sizes (height, width)): tiles of 28 px, at most 4 per image
TEXT_ONLY = (text(17, 0), [])
ONE_IMAGE = (text(6, 1) + [IMG] + text(9, 2), [(56, 28)])  # 2x1 tiles of 4: two padding tiles
ONE_3_TILES = (text(3, 3) + [IMG] + text(7, 4), [(28, 84)])  # 1x3
TWO_IMAGES = (text(2, 5) + [IMG] + text(4, 6) + [IMG] + text(5, 7), [(60, 60), (28, 28)])  # 2x2, then 1x1
SAMPLES = [TEXT_ONLY, ONE_IMAGE, ONE_3_TILES, TWO_IMAGES]


@pytest.fixture(scope="module")
def models(mllama_dir):
    """(ours, oracle): the checkpoint as model.load_model and as transformers load it."""
    oracle = MllamaForConditionalGeneration.from_pretrained(mllama_dir, dtype=torch.float32)
    return M.load_model(mllama_dir).eval(), oracle.eval()


@torch.no_grad()
def oracle_logits(oracle, samples, seed=0):
    return oracle(**tiny.padded_batch(samples, seed)).logits


@torch.no_grad()
def max_diff_on_tokens(models, samples):
    """Largest logit difference between ours and transformers on the real tokens of the padded batch."""
    ours, oracle = models
    batch = tiny.padded_batch(samples)
    keep = batch["attention_mask"].bool()
    return (ours(**batch)[keep] - oracle_logits(oracle, samples)[keep]).abs().max().item()


def test_loads_as_mllama_with_the_checkpoints_shapes(models):
    ours, _ = models
    assert isinstance(ours, MM.Mllama)
    assert ours.language_model.model.embed_tokens.weight.shape == (tiny.VOCAB + 8, 64)
    assert ours.head_weight.shape == (tiny.VOCAB, 64)
    kinds = [type(layer).__name__ for layer in ours.language_model.model.layers]
    assert kinds == ["DecoderLayer", "CrossAttentionDecoderLayer", "DecoderLayer", "CrossAttentionDecoderLayer",
                     "DecoderLayer"]
    assert ours.language_model.model.embed_tokens.padding_idx == tiny.VOCAB - 1


def test_text_only_batch_matches_transformers(models):
    """(a) Two right-padded text-only rows: no vision, the cross-attention layers skipped."""
    assert max_diff_on_tokens(models, [TEXT_ONLY, (text(9, 8), [])]) <= TOL


def test_one_image_of_two_tiles_matches_transformers(models):
    """(b) One image cut into 2x1 tiles of at most 4; the tokens before <|image|> see no tile."""
    batch = tiny.padded_batch([ONE_IMAGE])
    assert batch["aspect_ratio_mask"].tolist() == [[[1, 1, 0, 0]]] and batch["aspect_ratio_ids"].tolist() == [[5]]
    assert max_diff_on_tokens(models, [ONE_IMAGE]) <= TOL


def test_batch_of_different_tile_and_image_counts_matches_transformers(models):
    """(c) One image of 3 tiles beside two images of 4 and 1 tiles: the first row gets a padding
    image, which its tokens before <|image|> attend to in transformers (and here)."""
    assert max_diff_on_tokens(models, [ONE_3_TILES, TWO_IMAGES]) <= TOL


@torch.no_grad()
def test_packed_forward_equals_each_sample_run_alone(models):
    """Packed, every sequence attends to its own images only and gets the logits transformers gives
    it alone, and our batched forward of it alone. In a padded batch beside a sample of two images
    a one-image sample gets other logits (its tokens before <|image|> attend to its padding image
    there, and the later ones to them), in transformers as here (test (c))."""
    ours, oracle = models
    ids, cu, images = tiny.pack([tiny.process(*s) for s in SAMPLES])
    assert images["image_counts"] == [0, 1, 1, 2]
    logits = ours.forward_packed(ids, cu, **images) @ ours.head_weight.t()
    for (start, end), sample in zip(M._spans(cu), SAMPLES):
        assert (logits[start:end] - oracle_logits(oracle, [sample])[0]).abs().max() <= TOL
        assert (logits[start:end] - ours(**tiny.padded_batch([sample]))[0]).abs().max() <= TOL
    alone = logits[cu[2]:cu[3]]
    in_batch = ours(**tiny.padded_batch([ONE_3_TILES, TWO_IMAGES]))[0, :len(ONE_3_TILES[0])]
    assert (alone[0] - in_batch[0]).abs().max() > 100 * TOL


def test_every_attention_call_is_4d(models, monkeypatch):
    """SDPA's fused kernels take 4-d inputs only (3-d ones take the math kernel, O(queries x keys)
    memory per head, on CUDA too): every call of a packed forward with images (vision tiles,
    self-attention, cross-attention) is 4-d."""
    ours, _ = models
    ids, cu, images = tiny.pack([tiny.process(*s) for s in SAMPLES])
    sdpa, dims = MM.F.scaled_dot_product_attention, []

    def recorded(query, key, value, **kwargs):
        dims.append((query.dim(), key.dim(), value.dim()))
        return sdpa(query, key, value, **kwargs)
    monkeypatch.setattr(MM.F, "scaled_dot_product_attention", recorded)
    with torch.no_grad():
        ours.forward_packed(ids, cu, **images)
    assert len(dims) >= 2 * 3 and set(dims) == {(4, 4, 4)}  # two cross-attention layers x three samples with images


def test_packed_logprobs_is_the_packed_forward_through_the_head(models):
    ours, _ = models
    ids, cu, images = tiny.pack([tiny.process(*s) for s in SAMPLES[1:3]])
    targets = torch.roll(ids, -1) % tiny.VOCAB  # <|image|> (= VOCAB) is no row of the head
    logp = ours.packed_logprobs(ids, cu, targets, **images)
    with torch.no_grad():
        logits = ours.forward_packed(ids, cu, **images) @ ours.head_weight.t()
    assert (logp.detach() - torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]).abs().max() <= 1e-5
    logp.sum().backward()
    for p in (ours.vision_model.transformer.layers[0].self_attn.q_proj.weight,
              ours.language_model.model.layers[1].cross_attn.k_norm.weight, ours.multi_modal_projector.weight):
        assert p.grad.abs().sum() > 0
    ours.zero_grad(set_to_none=True)


def test_flash_branch_of_the_packed_forward_matches_sdpa(mllama_dir, monkeypatch):
    """The self-attention layers' flash-attn branch (model.varlen_attention, the stand-in, bf16)
    against their SDPA branch, forward and backward; cross-attention and vision take SDPA in both."""
    from tests import flash_attn_standin

    model = M.load_model(mllama_dir, dtype=torch.bfloat16)
    ids, cu, images = tiny.pack([tiny.process(*s) for s in SAMPLES])
    images["pixel_values"] = images["pixel_values"].bfloat16()

    def training_pass():
        logp = model.packed_logprobs(ids, cu, torch.roll(ids, -1) % tiny.VOCAB, **images)
        (logp * torch.arange(len(logp))).sum().backward()  # position-dependent: a misplaced token shows
        grads = [p.grad.float().clone() for p in (model.language_model.model.layers[0].self_attn.k_proj.weight,
                                                  model.language_model.model.layers[1].cross_attn.q_proj.weight)]
        model.zero_grad(set_to_none=True)
        return logp.detach(), grads

    sdpa_logp, sdpa_grads = training_pass()
    calls = flash_attn_standin.install(monkeypatch)
    flash_logp, flash_grads = training_pass()
    assert calls == [("flash_attn_varlen_func", torch.bfloat16)] * 3  # the three self-attention layers
    assert (flash_logp - sdpa_logp).abs().max() <= 2e-2
    for got, expected in zip(flash_grads, sdpa_grads):
        assert (got - expected).norm() <= 2e-2 * expected.norm()


def test_llama3_inv_freq_equals_transformers():
    cfg = tiny.config().text_config
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg)
    ours = MM.rope_inv_freq(MM.MllamaConfig.from_hf(tiny.config().to_dict()).text)
    assert torch.equal(ours, expected)
    # rope_inv_freq's docstring example: unchanged, blended, divided by the factor
    assert ours[:3].tolist() == pytest.approx([1.0, 0.0794030, 0.0047008], rel=1e-5)
    default = MllamaTextConfig(hidden_size=64, num_attention_heads=4,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    parsed = MM.MllamaConfig.from_hf({**tiny.config().to_dict(), "text_config": default.to_dict()}).text
    assert parsed.llama3_scaling is None
    assert torch.equal(MM.rope_inv_freq(parsed), 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16))


def test_tile_attention_mask_docstring_example():
    allowed = MM.tile_attention_mask(torch.tensor([[1]]), num_patches=1, padded=2)
    assert allowed[0, 0].int().tolist() == [[1, 1], [1, 0]]


def released_layout(raw):
    """The config.json of the released checkpoints (transformers 4.x): `rope_scaling` and a separate
    `rope_theta` in text_config."""
    text = dict(raw["text_config"])
    rope = text.pop("rope_parameters")
    return {**raw, "text_config": {**text, "rope_theta": rope.pop("rope_theta"), "rope_scaling": rope}}


def test_released_and_transformers5_configs_parse_alike(mllama_dir):
    raw = json.loads((mllama_dir / "config.json").read_text())
    assert "rope_parameters" in raw["text_config"]
    assert MM.MllamaConfig.from_hf(released_layout(raw)) == MM.MllamaConfig.from_hf(raw)


def edited(raw, section, **changes):
    """`raw` with keys of `section` (a top-level key, or None for the top level) set, or deleted for None."""
    raw = json.loads(json.dumps(raw))
    node = raw if section is None else raw[section]
    for key, value in changes.items():
        node.pop(key) if value is None else node.__setitem__(key, value)
    return raw


def rope(**changes):
    base = dict(tiny.config().text_config.rope_parameters)
    return {key: value for key, value in {**base, **changes}.items() if value is not None}


REFUSED = [
    ("text_config", {"rope_parameters": rope(rope_type="yarn")},
     "text_config.rope_parameters.rope_type 'yarn' is not implemented (supported: default, llama3)"),
    ("text_config", {"rope_parameters": rope(factor=None)},
     "text_config.rope_parameters.factor is missing (rope_type llama3)"),
    ("text_config", {"rope_parameters": rope(rope_type="default")},
     "text_config.rope_parameters.factor is not implemented (RoPE keys read: rope_type, type, rope_theta)"),
    ("text_config", {"rope_parameters": rope(partial_rotary_factor=0.5)},
     "text_config.rope_parameters.partial_rotary_factor is not implemented (RoPE keys read: rope_type, type, "
     "rope_theta, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)"),
    ("text_config", {"dropout": 0.1}, "text_config.dropout 0.1 is not implemented (supported: 0.0)"),
    ("text_config", {"tie_word_embeddings": True},
     "text_config.tie_word_embeddings True is not implemented (supported: False)"),
    ("text_config", {"head_dim": 32}, "text_config.head_dim 32 is not implemented (supported: 16)"),
    ("text_config", {"cross_attention_layers": None}, "text_config.cross_attention_layers is missing"),
    ("vision_config", {"hidden_act": "quick_gelu"},
     "vision_config.hidden_act 'quick_gelu' is not implemented (supported: gelu)"),
    ("vision_config", {"image_size": [28, 28]},
     "vision_config.image_size [28, 28] and vision_config.patch_size 14 are not implemented (supported: square "
     "tiles of whole patches, two ints)"),
    ("vision_config", {"vision_output_dim": 64},
     "vision_config.vision_output_dim 64 is not implemented (supported: 96)"),
    ("vision_config", {"intermediate_layers_indices": [3, 4]},
     "vision_config.intermediate_layers_indices 4 is not a layer of vision_config.num_hidden_layers 4"),
    (None, {"vision_config": None}, "vision_config is missing"),
]


@pytest.mark.parametrize("section, changes, message", REFUSED, ids=[m.split(" ")[0] for _, _, m in REFUSED])
def test_unimplemented_configs_are_refused_with_one_line_naming_the_key(mllama_dir, section, changes, message):
    raw = edited(json.loads((mllama_dir / "config.json").read_text()), section, **changes)
    with pytest.raises(ValueError) as refused:
        MM.MllamaConfig.from_hf(raw)
    assert str(refused.value) == f"config.json: {message}"


def test_a_refused_checkpoint_fails_to_load_with_one_line(mllama_dir, tmp_path):
    raw = edited(json.loads((mllama_dir / "config.json").read_text()), "text_config",
                 rope_parameters=rope(rope_type="yarn"))
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(M.CheckpointError) as refused:
        M.load_model(tmp_path)
    assert str(refused.value) == (f"{tmp_path}/config.json: text_config.rope_parameters.rope_type 'yarn' is not "
                                  "implemented (supported: default, llama3)")


@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 100_000])
@torch.no_grad()
def test_saved_checkpoint_loads_in_transformers_with_identical_logits(models, tmp_path, max_shard_bytes):
    ours, oracle = models
    M.save_model(ours, tmp_path, max_shard_bytes=max_shard_bytes)
    assert os.path.exists(tmp_path / "model.safetensors.index.json") == (max_shard_bytes < 5 * 2**30)
    reloaded, info = MllamaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32,
                                                                    output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched key
    for samples in ([TEXT_ONLY], [ONE_3_TILES, TWO_IMAGES]):
        assert torch.equal(oracle_logits(reloaded.eval(), samples), oracle_logits(oracle, samples))
    again = M.load_model(tmp_path)
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


@torch.no_grad()
def test_transformers5_key_layout_loads(mllama_dir, models, tmp_path):
    """The file renamed as transformers 5 names the weights in memory loads in ours unchanged, and in
    transformers with every key found (so the renaming is the one transformers reads)."""
    ours, oracle = models
    def to_v5(key):
        for new, released in MM.V5_PREFIXES.items():
            if key.startswith(released):
                return new + key[len(released):]
        raise AssertionError(key)

    state = load_file(mllama_dir / "model.safetensors")
    save_file({to_v5(k): v for k, v in state.items()}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((mllama_dir / "config.json").read_text())
    other = M.load_model(tmp_path)
    for (name, a), (_, b) in zip(ours.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name
    reloaded, info = MllamaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32,
                                                                    output_loading_info=True)
    assert not any(info.values()), info
    assert torch.equal(oracle_logits(reloaded.eval(), [ONE_IMAGE]), oracle_logits(oracle, [ONE_IMAGE]))


def test_sharded_checkpoint_saved_by_transformers_loads(models, tmp_path):
    ours, oracle = models
    oracle.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    again = M.load_model(tmp_path)
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_two_rank_fsdp_forward_backward_equals_one_rank(mllama_dir, tmp_path):
    """FSDP2 over 2 gloo ranks (loaded shard by shard, activation checkpointing on), one rank with
    text only: loss and every parameter's gradient equal the unsharded one-process run's."""
    for name in os.listdir(mllama_dir):
        os.symlink(mllama_dir / name, tmp_path / name)
    torch.save([tiny.process(*s) for s in SAMPLES + [(text(11, 9), [])]], tmp_path / "inputs.pt")
    result = json.loads(torchrun("tests/mllama_fsdp_worker.py", tmp_path, timeout=180).strip().splitlines()[-1])
    assert result["sharded"] and abs(result["loss"] - result["ref_loss"]) <= 1e-5, result
    assert result["max_relative_grad_diff"] <= 1e-4, result  # a zero gradient would give nan and fail
