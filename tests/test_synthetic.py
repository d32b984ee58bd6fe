"""The synthetic world: answers recomputed from the scene and read back from the pixels, splits
disjoint, determinism by seed, and the model directory loading in transformers and model.py."""

import hashlib
import json
import os
import re
from collections import Counter

import pytest
import torch
from PIL import Image

import data
import rewards
import synthetic
from tests import tiny
from tests import scripts

SPLITS = ("train", "rl", "test")
RGB = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 190, 20)}


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def world_records(world):
    return {split: read_jsonl(os.path.join(world, "data", f"{split}.jsonl")) for split in SPLITS}


def parse_question(question):
    """The query a question asks, read off its text (independently of synthetic.question_text)."""
    patterns = {
        "count": r"How many (\w+)s are there\?",
        "sum": r"How many shapes are (\w+) or (\w+) in total\?",
        "difference": r"How many more (\w+) shapes than (\w+) shapes are there\?",
        "most_shape": r"Which shape appears most often\?",
        "product": r"What is the number of (\w+) shapes times the number of (\w+) shapes\?",
    }
    for kind, pattern in patterns.items():
        m = re.fullmatch(pattern, question)
        if m:
            return kind, m.groups()
    head, choices = question.split("\nChoices:\n")
    assert head == "Which color appears most often?"
    return "most_frequent", tuple(line.split(". ")[1] for line in choices.split("\n"))


def recompute_answer(scene, kind, params):
    """The right answer from the structured scene alone."""
    objects = [(o["row"], o["col"], o["color"], o["shape"]) for o in scene["objects"]]
    per_color = Counter(color for _, _, color, _ in objects)
    per_shape = Counter(shape for _, _, _, shape in objects)
    if kind == "count":
        return str(per_shape[params[0]])
    if kind == "sum":
        return str(per_color[params[0]] + per_color[params[1]])
    if kind == "difference":
        return str(per_color[params[0]] - per_color[params[1]])
    if kind == "product":
        return str(per_color[params[0]] * per_color[params[1]])
    if kind == "most_shape":
        (winner, n), (_, runner_up) = per_shape.most_common(2)
        assert n > runner_up, "most_shape needs a unique winner"
        return winner
    (winner, n), (_, runner_up) = (per_color + Counter({c: 0 for c in RGB})).most_common(2)
    assert n > runner_up, "most_frequent needs a unique winner"
    return "ABCD"[params.index(winner)]


def test_answers_recomputed_from_scene(tiny_world):
    for split, records in world_records(tiny_world).items():
        for r in records:
            kind, params = parse_question(r["question"])
            assert kind == r["meta"]["kind"]
            assert r["answer"] == recompute_answer(r["meta"]["scene"], kind, params), r["id"]
            assert r["answer_type"] == {"most_frequent": "choice", "most_shape": "text"}.get(kind, "integer")
            if kind == "most_frequent":
                assert r["choices"] == list(params) and sorted(params) == sorted(RGB)
            else:
                assert r["choices"] is None
            if kind == "difference":
                assert int(r["answer"]) > 0


def cell_signature(image, row, col):
    """(center, top-left, lower-left) pixels of a cell's shape box: a square fills all three,
    a triangle the center and lower-left, a circle only the center."""
    x0, y0 = (col - 1) * 28 + 5, (row - 1) * 28 + 5
    return image.getpixel((x0 + 9, y0 + 9)), image.getpixel((x0 + 1, y0 + 1)), image.getpixel((x0 + 3, y0 + 17))


def test_images_show_their_scene(tiny_world):
    white = (255, 255, 255)
    for records in world_records(tiny_world).values():
        for r in records:
            image = Image.open(os.path.join(tiny_world, "data", r["images"][0]))
            assert image.size == (112, 112) and image.mode == "RGB"
            occupied = {(o["row"], o["col"]): o for o in r["meta"]["scene"]["objects"]}
            for row in range(1, 5):
                for col in range(1, 5):
                    o = occupied.get((row, col))
                    if o is None:
                        assert cell_signature(image, row, col) == (white, white, white)
                        continue
                    fill = RGB[o["color"]]
                    expected = {"square": (fill, fill, fill), "triangle": (fill, white, fill),
                                "circle": (fill, white, white)}[o["shape"]]
                    assert cell_signature(image, row, col) == expected, (r["id"], o)


def test_description_is_exact(tiny_world):
    scene = {"grid": 4, "objects": [{"row": 1, "col": 2, "color": "red", "shape": "square"},
                                    {"row": 3, "col": 4, "color": "blue", "shape": "circle"}]}
    assert synthetic.describe(scene) == ("Row 1: empty, red square, empty, empty. Row 2: empty, empty, empty, empty. "
                                         "Row 3: empty, empty, empty, blue circle. Row 4: empty, empty, empty, empty.")
    for records in world_records(tiny_world).values():
        for r in records:
            rows = re.fullmatch(r"Row 1: (.*)\. Row 2: (.*)\. Row 3: (.*)\. Row 4: (.*)\.", r["meta"]["description"]).groups()
            described = {(row, col): cell for row, cells in enumerate(rows, 1)
                         for col, cell in enumerate(cells.split(", "), 1) if cell != "empty"}
            assert all(len(cells.split(", ")) == 4 for cells in rows)
            assert described == {(o["row"], o["col"]): f"{o['color']} {o['shape']}" for o in r["meta"]["scene"]["objects"]}


def test_splits_sized_balanced_and_disjoint(tiny_world):
    preset = synthetic.PRESETS["tiny"]
    records = world_records(tiny_world)
    assert [len(records[s]) for s in SPLITS] == [preset.n_train, preset.n_rl, preset.n_test]
    images, scenes, ids = [], [], []
    for split, rs in records.items():
        per_kind = Counter(r["meta"]["kind"] for r in rs)  # every kind equally often, up to the split's remainder
        assert set(per_kind) == set(synthetic.KINDS) and max(per_kind.values()) - min(per_kind.values()) <= 1
        images += [r["images"][0] for r in rs]
        scenes += [json.dumps(r["meta"]["scene"], sort_keys=True) for r in rs]
        ids += [r["id"] for r in rs]
    assert len(set(images)) == len(set(scenes)) == len(set(ids)) == len(ids)
    pixels = {hashlib.sha256(open(os.path.join(tiny_world, "data", p), "rb").read()).hexdigest() for p in images}
    assert len(pixels) == len(images)


def test_base_sft_answers_directly_or_as_instructed_and_reads_out_counts(tiny_world):
    train = {r["id"]: r for r in world_records(tiny_world)["train"]}
    conversations = data.load_conversations(os.path.join(tiny_world, "data", "base_sft.jsonl"))
    assert [c["id"] for c in conversations] == [i + suffix for i in train for suffix in ("", "-perception")]
    instructed = Counter()
    for asked, perception in zip(conversations[::2], conversations[1::2]):
        problem = train[asked["id"]]
        answer, question = problem["answer"], {"role": "user", "content": "<image>" + problem["question"]}
        if asked["messages"][0]["role"] == "system":
            system = asked["messages"][0]["content"]
            reply = asked["messages"][2]["content"]
            instructed[system] += 1
            assert asked["messages"][1] == question
            if "<think>" in system:  # the format the R1-Zero reward pays for, with a right answer
                assert rewards.reward(reply, answer, problem["choices"], problem["answer_type"]) == 1.0
                assert reply.startswith("<think> I need the ") or reply.startswith("<think> The most frequent ")
            elif "<answer>" in system:
                assert reply == f"<answer> {answer} </answer>"
            elif "Explain" in system:
                assert reply.endswith(f" So the answer is {answer}.") and len(reply.split()) > 6
            else:
                assert reply == answer
        else:
            assert asked["messages"] == [question, {"role": "assistant", "content": answer}]
        assert perception["messages"][0] == {"role": "user", "content": "<image>Count the shapes by color and by shape."}
        # the read-out, recomputed from the scene's objects
        objects = problem["meta"]["scene"]["objects"]
        per_color = Counter(o["color"] for o in objects)
        per_shape = Counter(o["shape"] for o in objects)
        expected = " ".join([f"{c.capitalize()}: {per_color[c]}." for c in ("red", "green", "blue", "yellow")]
                            + [f"{s.capitalize()}s: {per_shape[s]}." for s in ("square", "circle", "triangle")])
        assert perception["messages"][1] == {"role": "assistant", "content": expected}
        assert asked["images"] == perception["images"] == [os.path.join(tiny_world, "data", problem["images"][0])]
    assert set(instructed) <= {system for system, _ in synthetic.INSTRUCTIONS}
    assert 0.2 <= sum(instructed.values()) / len(train) <= 0.8  # INSTRUCTION_RATE 0.5 of 20 questions


def digest(directory, names):
    return {n: hashlib.sha256(open(os.path.join(directory, n), "rb").read()).hexdigest() for n in names}


def test_cli_is_deterministic_by_seed(tiny_world, tmp_path):
    out = tmp_path / "again"
    scripts.run("synthetic.py", ["--out", out, "--preset", "tiny", "--seed", "0"], check=True)
    files = ["data/train.jsonl", "data/rl.jsonl", "data/test.jsonl", "data/base_sft.jsonl", "data/images/test-00003.png",
             "model/tokenizer.json", "model/config.json", "model/model.safetensors", "model/preprocessor_config.json"]
    assert digest(out, files) == digest(tiny_world, files)
    other = synthetic.make_problems(synthetic.PRESETS["tiny"], seed=1)
    assert other != synthetic.make_problems(synthetic.PRESETS["tiny"], seed=0)


def test_chat_template_is_qwen2_vl_style(tiny_world):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(tiny_world, "model"))
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}
    assert tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many?<|im_end|>\n"
        "<|im_start|>assistant\n")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think> x </think><answer> Final Answer:2 </answer>"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think> x </think><answer> Final Answer:2 </answer><|im_end|>\n")
    # the reasoning tags are one token each and survive decoding without special tokens
    ids = tokenizer("<think> 3 + 2 = 5 </think><answer> Final Answer:5 </answer>").input_ids
    assert tokenizer.convert_ids_to_tokens(ids).count("<think>") == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think> 3 + 2 = 5 </think><answer> Final Answer:5 </answer>"
    assert 300 <= len(tokenizer) <= 2048


def test_transformers_loads_the_model_dir(tiny_world):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    model_dir = os.path.join(tiny_world, "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert isinstance(AutoImageProcessor.from_pretrained(model_dir), data.qwen2vl_image_processor_class())
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    ids = tokenizer.convert_tokens_to_ids
    config = model.config
    assert (config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id) == (
        ids("<|image_pad|>"), ids("<|video_pad|>"), ids("<|vision_start|>"), ids("<|vision_end|>"))
    assert config.text_config.vocab_size % 64 == 0 and config.text_config.vocab_size >= len(tokenizer)
    assert model.generation_config.eos_token_id == [ids("<|im_end|>"), ids("<|endoftext|>")]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"

    processor = data.ChatProcessor(model_dir)
    problem = data.load_problems(os.path.join(tiny_world, "data", "test.jsonl"))[0]
    encoded = processor.encode_problem(problem)
    assert encoded["image_grid_thw"].tolist() == [[1, 8, 8]]  # 112x112 kept: 16 image tokens
    assert encoded["input_ids"].count(processor.image_token_id) == 16
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([encoded["input_ids"]]), pixel_values=encoded["pixel_values"],
                       image_grid_thw=encoded["image_grid_thw"]).logits
    assert logits.shape == (1, len(encoded["input_ids"]), config.text_config.vocab_size)


def test_our_load_model_matches_transformers_on_packed_data(tiny_world):
    model_py = pytest.importorskip("model")
    if not hasattr(model_py, "load_model"):
        pytest.skip("model.py has no load_model yet")
    from transformers import AutoModelForImageTextToText

    model_dir = os.path.join(tiny_world, "model")
    ours = model_py.load_model(model_dir).eval()
    theirs = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = data.ChatProcessor(model_dir)
    problem = data.load_problems(os.path.join(tiny_world, "data", "rl.jsonl"))[1]
    conversation = data.load_conversations(os.path.join(tiny_world, "data", "base_sft.jsonl"))[2]
    samples = [processor.encode_problem(problem),
               processor.encode_conversation(conversation["messages"], conversation["images"])]
    (batch,) = data.pack(samples, max_tokens=1024)
    with torch.no_grad():
        hidden = ours.forward_packed(batch["input_ids"], batch["cu_seqlens"], batch["pixel_values"],
                                     batch["image_grid_thw"])
        logits = hidden @ ours.head_weight.t()
        for i, sample in enumerate(samples):
            ids = torch.tensor([sample["input_ids"]])
            expected = theirs(input_ids=ids, pixel_values=sample["pixel_values"], image_grid_thw=sample["image_grid_thw"],
                              mm_token_type_ids=tiny.mm_token_type_ids(ids, processor.image_token_id)).logits[0]
            start, end = batch["cu_seqlens"][i:i + 2].tolist()
            torch.testing.assert_close(logits[start:end], expected, atol=1e-4, rtol=1e-4)


def test_mllama_world_tiles_its_images_and_loads_in_transformers_and_model_py_alike(tiny_world, tmp_path):
    """`--arch mllama`: the same problems, a Llama 3 tokenizer (pad and <|image|> at the end of the
    vocabulary), 2x2 tiles of 56 pixels per 112x112 image, and our Llama 3.2 Vision giving
    transformers' logits on a world problem."""
    from transformers import AutoTokenizer, MllamaForConditionalGeneration

    import model as M

    world = synthetic.build(str(tmp_path), preset="tiny", seed=0, arch="mllama")
    model_dir = os.path.join(world, "model")
    config = json.loads(open(os.path.join(model_dir, "config.json")).read())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.convert_tokens_to_ids
    vocab = config["text_config"]["vocab_size"]
    assert config["model_type"] == "mllama" and vocab % 64 == 0
    assert (ids("<|begin_of_text|>"), ids("<|eot_id|>"), ids(synthetic.LLAMA_PAD), config["image_token_index"]) == (
        1, 2, vocab - 1, vocab)
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}
    assert tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>How many?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tokenizer.convert_ids_to_tokens(tokenizer("<think> 3 </think>").input_ids).count("<think>") == 1
    # the problems are the Qwen world's: the data does not depend on the architecture
    assert world_records(world) == world_records(tiny_world)

    processor = data.ChatProcessor(model_dir)
    sample = processor.encode_problem(data.load_problems(os.path.join(world, "data", "test.jsonl"))[0])
    assert sample["pixel_values"].shape == (1, 4, 3, 56, 56) and sample["aspect_ratio_mask"].tolist() == [[1, 1, 1, 1]]
    assert sample["input_ids"].count(vocab) == 1
    batch = data.collate([sample], [0])
    keys = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask", "image_counts")
    ours = M.load_model(model_dir).eval()
    theirs = MllamaForConditionalGeneration.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = ours.forward_packed(batch["input_ids"], batch["cu_seqlens"], **{k: batch[k] for k in keys}) \
            @ ours.head_weight.t()
        expected = theirs(input_ids=torch.tensor([sample["input_ids"]]), pixel_values=sample["pixel_values"][None],
                          aspect_ratio_ids=sample["aspect_ratio_ids"][None],
                          aspect_ratio_mask=sample["aspect_ratio_mask"][None],
                          cross_attention_mask=sample["cross_attention_mask"][None]).logits[0]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    # the gates are open: the tokens after <|image|> read the image
    images = {k: batch[k] for k in keys} | {"pixel_values": torch.zeros_like(batch["pixel_values"])}
    with torch.no_grad():
        blind = ours.forward_packed(batch["input_ids"], batch["cu_seqlens"], **images) @ ours.head_weight.t()
    assert (blind[sample["input_ids"].index(vocab):] - logits[sample["input_ids"].index(vocab):]).abs().max() > 1e-2
