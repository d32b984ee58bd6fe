"""Llama 3.2 Vision's data path (data.ChatProcessor on a model_type mllama checkpoint) against
transformers' MllamaProcessor, and train_sft.py on it: loss falls, vision frozen, 2 ranks = 1 rank."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import data
import make_cold_data
import train_grpo
import train_sft
from tests import tiny_mllama as tiny
from tests.test_fsdp import torchrun
from tests.test_sft import metric, no_wandb  # noqa: F401 (an autouse fixture)
from train_utils import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

# (record, image sizes): both record layouts, 0-2 images, adjacent and separated <image>s, two turns
RECORDS = [
    ({"messages": [{"role": "user", "content": "How many red squares are there?"},
                   {"role": "assistant", "content": "The answer is 12."}]}, []),
    ({"conversations": [{"from": "human", "value": "<image>How many red squares are there?"},
                        {"from": "gpt", "value": "Count the cells. The answer is 12."}]}, [(40, 60)]),
    ({"messages": [{"role": "user", "content": "<image><image>Count the grid."},
                   {"role": "assistant", "content": "So the final answer is 4."}]}, [(30, 90), (28, 28)]),
    ({"conversations": [{"from": "human", "value": "<image>Count the rows, then<image>check each row."},
                        {"from": "gpt", "value": "Three rows."}, {"from": "human", "value": "Again?"},
                        {"from": "gpt", "value": "The answer is 3."}]}, [(90, 30), (60, 40)]),
]


@pytest.fixture(scope="module")
def cold_file(tmp_path_factory):
    """RECORDS as a JSON lines file with their images (PNG files beside it), repeated to 16 records."""
    folder = tmp_path_factory.mktemp("mllama_cold")
    lines = []
    for k in range(16):
        record, sizes = RECORDS[k % len(RECORDS)]
        names = []
        for i, image in enumerate(tiny.images(sizes, seed=k)):
            names.append(f"{k}_{i}.png")
            image.save(folder / names[-1])
        # one image as the released Vision-R1-cold files give it: `image`, a path string
        lines.append(json.dumps({**record, **({"image": names[0]} if len(names) == 1 else {"images": names})}))
    (folder / "cold.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "cold.jsonl")


def oracle(mllama_dir, record):
    """transformers' MllamaProcessor (the PIL image processor: its default one needs torchvision)
    on the record's chat as the checkpoint's own template renders it."""
    from transformers import AutoTokenizer, MllamaProcessor

    tokenizer = AutoTokenizer.from_pretrained(mllama_dir)
    processor = MllamaProcessor(data.mllama_image_processor_class().from_pretrained(mllama_dir), tokenizer,
                                chat_template=tokenizer.chat_template)
    text = processor.apply_chat_template(data.template_messages(record["messages"]), tokenize=False)
    images = [[data.load_image(source) for source in record["images"]]] if record["images"] else None
    return processor(images=images, text=[text], add_special_tokens=False, return_tensors="pt")


def test_encoding_equals_transformers_mllama_processor(mllama_dir, cold_file):
    """Every record layout with 0, 1 and 2 images (adjacent or apart): token ids, tiles,
    aspect-ratio ids and masks, and the per-token cross-attention mask equal MllamaProcessor's."""
    processor = data.ChatProcessor(str(mllama_dir))
    for record in data.load_conversations(cold_file)[:len(RECORDS)]:
        ours, theirs = processor.encode_conversation(record["messages"], record["images"]), oracle(mllama_dir, record)
        assert ours["input_ids"] == theirs["input_ids"][0].tolist()
        assert ours["input_ids"].count(tiny.IMAGE) == len(record["images"])
        for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"):
            assert (key in ours) == bool(record["images"])
            if record["images"]:
                assert torch.equal(ours[key], theirs[key][0]), key
    # the last record's images sit apart: image 0 is seen up to image 1's token, image 1 from there on
    cross = ours["cross_attention_mask"][:, :, 0]
    first, second = [i for i, t in enumerate(ours["input_ids"]) if t == tiny.IMAGE]
    assert cross[:first].sum() == 0 and cross[first:second].tolist() == [[1, 0]] * (second - first)
    assert cross[second:].tolist() == [[0, 1]] * (len(cross) - second)


def test_labels_are_the_replies_and_their_eot(mllama_dir, cold_file):
    """Labels decode to each assistant reply followed by <|eot_id|>, nothing else (no header, no
    user turn, never <|image|>)."""
    processor = data.ChatProcessor(str(mllama_dir))
    record = data.load_conversations(cold_file)[3]
    encoded = processor.encode_conversation(record["messages"], record["images"])
    labelled = [t for t in encoded["labels"] if t != -100]
    assert processor.tokenizer.decode(labelled) == "Three rows.<|eot_id|>The answer is 3.<|eot_id|>"
    assert all(label in (-100, token) for label, token in zip(encoded["labels"], encoded["input_ids"]))


def test_collate_packs_tiles_for_the_packed_forward():
    """concat_tiles' docstring example: 3 tokens without images, then 2 with 2 images."""
    tiles = {"pixel_values": torch.rand(2, tiny.MAX_TILES, 3, tiny.TILE, tiny.TILE),
             "aspect_ratio_ids": torch.tensor([6, 1]), "aspect_ratio_mask": torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]]),
             "cross_attention_mask": torch.tensor([[[1, 1, 1, 1], [1, 0, 0, 0]]] * 2)}
    batch = data.collate([{"input_ids": [5, 6, 7]}, {"input_ids": [tiny.IMAGE, 8], **tiles}], [0, 1])
    assert batch["image_counts"] == [0, 2] and batch["cu_seqlens"].tolist() == [0, 3, 5]
    assert batch["cross_attention_mask"].shape == (5, 2, tiny.MAX_TILES)
    assert batch["cross_attention_mask"][:3].sum() == 0 and torch.equal(batch["cross_attention_mask"][3:],
                                                                        tiles["cross_attention_mask"])
    assert torch.equal(batch["pixel_values"], tiles["pixel_values"]) and "image_grid_thw" not in batch


def test_fit_context_cuts_the_cross_attention_mask_with_the_tokens():
    sample = {"input_ids": [tiny.IMAGE, 1, 2, 3], "labels": [-100, 1, 2, 3],
              "cross_attention_mask": torch.ones(4, 1, tiny.MAX_TILES)}
    cut = train_sft.fit_context(sample, 3, tiny.IMAGE)
    assert cut["input_ids"] == [tiny.IMAGE, 1, 2] and cut["labels"] == [-100, 1, 2]
    assert cut["cross_attention_mask"].shape == (3, 1, tiny.MAX_TILES)
    assert train_sft.fit_context({**sample, "input_ids": [1, 2, 3, tiny.IMAGE]}, 3, tiny.IMAGE) is None


def sft_args(mllama_dir, cold_file, out, *extra):
    return ["--preset", "toy", "--model", str(mllama_dir), "--data", cold_file, "--out", str(out), "--lr", "3e-3",
            "--global-batch", "8", "--max-tokens", "512", "--eval-holdout", "0", *extra]


def test_sft_loss_falls_and_the_vision_side_stays_frozen(mllama_dir, cold_file, tmp_path):
    train_sft.main(sft_args(mllama_dir, cold_file, tmp_path, "--epochs", "3", "--warmup-ratio", "0"))
    losses = metric(tmp_path, "loss")
    assert len(losses) == 6 and all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.85 * losses[0], losses
    before, after = load_file(mllama_dir / "model.safetensors"), load_file(tmp_path / "final" / "model.safetensors")
    frozen = [name for name in before if name.startswith(("vision_model.", "multi_modal_projector."))]
    assert frozen and all(torch.equal(before[name], after[name]) for name in frozen)
    assert not torch.equal(before["language_model.lm_head.weight"], after["language_model.lm_head.weight"])
    assert not torch.equal(before["language_model.model.layers.1.cross_attn.q_proj.weight"],
                           after["language_model.model.layers.1.cross_attn.q_proj.weight"])


def test_resuming_from_a_saved_state_ends_with_the_straight_runs_weights(mllama_dir, cold_file, tmp_path):
    """4 steps straight, and steps 3-4 resumed from the straight run's step-2 training state in a
    fresh folder: the final weights agree."""
    args = ("--epochs", "2", "--save-every", "2", "--keep-last", "0")
    train_sft.main(sft_args(mllama_dir, cold_file, tmp_path / "straight", *args))
    shutil.copytree(tmp_path / "straight" / "state", tmp_path / "resumed" / "state")
    (tmp_path / "resumed" / "state" / "latest").write_text("step_2")
    train_sft.main(sft_args(mllama_dir, cold_file, tmp_path / "resumed", *args, "--resume"))
    assert metric(tmp_path / "resumed", "loss") == metric(tmp_path / "straight", "loss")[2:]
    a, b = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("straight", "resumed"))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_two_ranks_give_the_one_rank_first_step_loss(mllama_dir, cold_file, tmp_path):
    """FSDP2 over 2 gloo ranks (each packing its 4 records, images or not) and one rank."""
    args = ("--epochs", "0.5")  # one step
    train_sft.main(sft_args(mllama_dir, cold_file, tmp_path / "one", *args))
    torchrun("train_sft.py", *sft_args(mllama_dir, cold_file, tmp_path / "two", *args), timeout=300)
    one, two = metric(tmp_path / "one", "loss"), metric(tmp_path / "two", "loss")
    assert len(one) == len(two) == 1 and abs(one[0] - two[0]) <= 1e-5, (one, two)


def test_the_qwen_only_scripts_refuse_it_with_one_line(mllama_dir, tmp_path):
    """train_grpo stops before any work with one line naming the folder, and make_cold_data's local
sampler before loading the model; so do train_sft's memory plan and Qwen's pixel bounds."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"question": "Q", "answer": "1"}) + "\n")
    with pytest.raises(SystemExit) as stopped:
        train_grpo.main([str(a) for a in ["--preset", "toy", "--init", mllama_dir, "--ref", mllama_dir, "--data",
                                          prompts, "--out-root", tmp_path / "rl"]])
    assert str(stopped.value) == (f"{mllama_dir}: Llama 3.2 Vision (model_type mllama) trains with train_sft.py, "
                                  f"but train_grpo.py serves Qwen2.5-VL only so far")
    assert sorted(os.listdir(tmp_path)) == ["prompts.jsonl"]
    with pytest.raises(InputError, match="but make_cold_data.py serves Qwen2.5-VL only so far"):
        make_cold_data.LocalBackend(str(mllama_dir))
    with pytest.raises(InputError, match="--min-pixels / --max-pixels are for Qwen2.5-VL"):
        data.ChatProcessor(str(mllama_dir), min_pixels=28 * 28)
    with pytest.raises(SystemExit, match=r"but --plan \(memplan.py\) serves Qwen2.5-VL only so far"):
        train_sft.main(["--plan", "--model", str(mllama_dir)])


def test_paper_llamav_preset_is_the_papers_recipe_on_llama():
    """docs/method.md §2 on Llama-3.2-11B-Vision-Instruct: lr 5e-6 cosine, 5% warmup, 2 epochs, batch 32, vision frozen."""
    cfg = train_sft.parse_config(train_sft.SFTConfig, train_sft.PRESETS, ["--preset", "paper-llamav"])
    assert cfg.model == "checkpoints/Llama-3.2-11B-Vision-Instruct" and not cfg.train_vision
    assert (cfg.lr, cfg.schedule, cfg.warmup_ratio, cfg.epochs, cfg.global_batch) == (5e-6, "cosine", 0.05, 2.0, 32)
