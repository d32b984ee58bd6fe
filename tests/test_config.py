"""model.ModelConfig.from_hf on every config.json layout transformers has written for our models
(checked in under tests/data/configs/): the same tiny weights give the same network under each,
equal to transformers'; what we save loads back in transformers; what we do not implement is
refused with one line naming the key."""

import json
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

import model as M
from tests import tiny

CONFIGS = os.path.join(os.path.dirname(__file__), "data", "configs")
VL_LAYOUTS = ("qwen2_5_vl_released.json", "qwen2_5_vl_transformers4.json", "qwen2_5_vl_transformers5.json")
QWEN2_LAYOUTS = ("qwen2_transformers4.json", "qwen2_transformers5.json")
TOL = 1e-4


def layout(name):
    with open(os.path.join(CONFIGS, name)) as f:
        return json.load(f)


def checkpoint(weights_dir, config_name, path):
    """`weights_dir`'s model.safetensors with the checked-in config `config_name`."""
    os.makedirs(path, exist_ok=True)
    shutil.copy(os.path.join(weights_dir, "model.safetensors"), path)
    shutil.copy(os.path.join(CONFIGS, config_name), os.path.join(path, "config.json"))
    return path


@torch.no_grad()
def vl_logits(model, transformers_model=False):
    """Logits of one sequence with two images of different sizes."""
    ids, pixels, grid = tiny.sample((3, 4, 6), [(1, 4, 4), (1, 6, 8)], seed=2)
    if transformers_model:
        return model(input_ids=ids[None], pixel_values=pixels, image_grid_thw=grid,
                     mm_token_type_ids=tiny.mm_token_type_ids(ids)[None]).logits[0]
    return model(ids[None], pixel_values=pixels, image_grid_thw=grid)[0]


def test_every_layout_reads_as_the_same_config():
    vl = [M.ModelConfig.from_hf(layout(name)) for name in VL_LAYOUTS]
    assert vl[0] == vl[1] == vl[2]
    assert (vl[0].rope_theta, vl[0].mrope_section, vl[0].head_dim, vl[0].tie_word_embeddings) == (10000.0, [2, 3, 3], 16, False)
    assert (vl[0].vision.depth, vl[0].vision.window_size, vl[0].vision.fullatt_block_indexes) == (3, 56, [1])
    qwen2 = [M.ModelConfig.from_hf(layout(name)) for name in QWEN2_LAYOUTS]
    assert qwen2[0] == qwen2[1]
    assert (qwen2[0].rope_theta, qwen2[0].mrope_section, qwen2[0].vision, qwen2[0].tie_word_embeddings) == (10000.0, None, None, True)


@torch.no_grad()
def test_same_weights_give_the_same_logits_under_every_layout_equal_to_transformers(vl_dir, tmp_path):
    logits = []
    for name in VL_LAYOUTS:
        path = checkpoint(vl_dir, name, tmp_path / name)
        ours = vl_logits(M.load_model(path).eval())
        theirs = vl_logits(AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval(), True)
        assert (ours - theirs).abs().max() <= TOL, name
        logits.append(ours)
    assert all(torch.equal(logits[0], other) for other in logits[1:])


@torch.no_grad()
def test_plain_qwen2_layouts_give_the_same_logits_equal_to_transformers(tmp_path):
    tiny.save_qwen2_text(tmp_path / "weights")
    ids = torch.randint(0, 300, (1, 19), generator=torch.Generator().manual_seed(1))
    logits = []
    for name in QWEN2_LAYOUTS:
        path = checkpoint(tmp_path / "weights", name, tmp_path / name)
        ours = M.load_model(path)(ids)
        theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(input_ids=ids).logits
        assert (ours - theirs).abs().max() <= TOL, name
        logits.append(ours)
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("name", VL_LAYOUTS)
@torch.no_grad()
def test_what_we_save_loads_in_transformers_with_identical_logits(vl_dir, tmp_path, name):
    """save_model writes the config it read, in its layout; the installed transformers reads it
    back into the network transformers builds from the source checkpoint, bit for bit."""
    source = checkpoint(vl_dir, name, tmp_path / "source")
    M.save_model(M.load_model(source), tmp_path / "saved")
    expected = vl_logits(AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32).eval(), True)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    assert torch.equal(vl_logits(reloaded, True), expected)
    assert M.ModelConfig.from_hf(layout(name)) == M.load_model(tmp_path / "saved").cfg


def edit(name, **changes):
    """The checked-in layout `name` with dotted keys set (value None: deleted)."""
    raw = layout(name)
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        node = raw
        for parent in parents:
            node = node[parent]
        if value is None:
            del node[key]
        else:
            node[key] = value
    return raw


RELEASED, V4, V5 = VL_LAYOUTS
REFUSED = [
    (edit(V5, **{"text_config.rope_parameters.rope_type": "yarn", "text_config.rope_parameters.factor": 4.0}),
     "text_config.rope_parameters.rope_type 'yarn' is not implemented (supported: default, mrope)"),
    (edit(RELEASED, **{"rope_scaling.type": "dynamic"}),
     "rope_scaling.type 'dynamic' is not implemented (supported: default, mrope)"),
    (edit(V4, **{"text_config.rope_scaling.rope_type": "linear"}),
     "text_config.rope_scaling.rope_type 'linear' is not implemented (supported: default, mrope)"),
    (edit(V5, **{"text_config.rope_parameters.factor": 2.0}),
     "text_config.rope_parameters.factor is not implemented (RoPE keys read: rope_type, type, rope_theta, mrope_section)"),
    (edit(RELEASED, use_sliding_window=True),
     "use_sliding_window True is not implemented (supported: False)"),
    (edit(V5, **{"text_config.use_sliding_window": True}),
     "text_config.use_sliding_window True is not implemented (supported: False)"),
    (edit(V4, **{"text_config.layer_types": ["full_attention", "sliding_attention"]}),
     "text_config.layer_types 'sliding_attention' is not implemented (supported: full_attention)"),
    (edit(V5, model_type="qwen2_vl"),
     "model_type 'qwen2_vl' is not implemented (supported: qwen2_5_vl, qwen2)"),
    (edit(V5, **{"text_config.rope_parameters.mrope_section": None}),
     "text_config.rope_parameters.mrope_section None does not split head_dim / 2 = 8 into (t, h, w) bands"),
    (edit(RELEASED, **{"rope_scaling.mrope_section": [2, 3, 4]}),
     "rope_scaling.mrope_section [2, 3, 4] does not split head_dim / 2 = 8 into (t, h, w) bands"),
    (edit(RELEASED, rope_theta=None),
     "rope_scaling.rope_theta is missing, and so is rope_theta"),
    (edit(V5, **{"text_config.rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}),
     "both text_config.rope_parameters and text_config.rope_scaling are set"),
    (edit(V4, **{"text_config.hidden_act": "gelu"}),
     "text_config.hidden_act 'gelu' is not implemented (supported: silu)"),
    (edit(V5, **{"text_config.head_dim": 32}),
     "text_config.head_dim 32 is not implemented (supported: 16)"),
    (edit(V5, **{"text_config.rms_norm_eps": None}),
     "text_config.rms_norm_eps is missing"),
    (edit(V5, **{"text_config.tie_word_embeddings": True}),
     "tie_word_embeddings False and text_config.tie_word_embeddings True disagree"),
    (edit(V5, **{"vision_config.rope_parameters.rope_theta": 20000.0}),
     "vision_config.rope_parameters.rope_theta 20000.0 is not implemented (supported: 10000.0)"),
    (edit(RELEASED, **{"vision_config.hidden_act": "quick_gelu"}),
     "vision_config.hidden_act 'quick_gelu' is not implemented (supported: silu)"),
    (edit("qwen2_transformers5.json", **{"rope_parameters.rope_type": "llama3"}),
     "rope_parameters.rope_type 'llama3' is not implemented (supported: default, mrope)"),
]


@pytest.mark.parametrize("raw, message", REFUSED, ids=[m.split(" ")[0] for _, m in REFUSED])
def test_unimplemented_configs_are_refused_with_one_line_naming_the_key(raw, message):
    with pytest.raises(ValueError) as refused:
        M.ModelConfig.from_hf(raw)
    assert str(refused.value) == f"config.json: {message}"
