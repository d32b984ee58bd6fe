"""data.py: every record layout, the check with each bad-input kind, and chat encoding against
transformers' own Qwen2.5-VL processor (token ids, pixel values, grids), labels and packing."""

import io
import json
import os
import shutil
import struct
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import data
from tests import scripts


def save_png(path, size=(56, 56), color=(200, 30, 30), mode="RGB"):
    Image.new(mode, size, color).save(path)
    return str(path)


def png_bytes(size=(28, 28), color=(10, 200, 10)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def png_claiming_size(width, height):
    """A tiny PNG whose header claims width x height: PIL sizes images from the header at open."""
    b = bytearray(png_bytes((4, 4)))
    b[16:24] = struct.pack(">II", width, height)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    return bytes(b)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def problem(i, image="a.png", **kw):
    return {"id": f"p{i}", "images": [image], "question": f"How many red squares? ({i})", "answer": "2", **kw}


# ----------------------------------------------------------------------------- formats

def test_problem_jsonl(tmp_path):
    save_png(tmp_path / "a.png")
    rows = [problem(1, choices=["red", "blue"], answer_type="choice", meta={"kind": "count"}),
            {"images": ["a.png"], "question": "<image>What is 2 + 3?", "answer": 5}]
    records = data.load_problems(write_jsonl(tmp_path / "probs.jsonl", rows))
    assert records == [
        {"id": "p1", "images": [str(tmp_path / "a.png")], "question": "How many red squares? (1)", "answer": "2",
         "choices": ["red", "blue"], "answer_type": "choice", "meta": {"kind": "count"}},
        {"id": "probs-2", "images": [str(tmp_path / "a.png")], "question": "What is 2 + 3?", "answer": "5",
         "choices": None, "answer_type": None, "meta": {}},
    ]


def test_problem_json_array_reports_lines(tmp_path):
    save_png(tmp_path / "a.png")
    text = "[\n" + json.dumps(problem(1)) + ",\n" + json.dumps(problem(2), indent=1) + ",\n" + \
        json.dumps({"id": "p3", "images": ["a.png"], "question": "Q?"}) + "\n]\n"
    path = tmp_path / "probs.json"
    path.write_text(text)
    report = data.check_file(str(path))
    # line 1 "[", line 2 the first record, lines 3-10 the indented second, line 11 the third
    assert (report.total, report.good, report.bad) == (3, 2, [(11, "missing answer")])
    path.write_text("[\n" + json.dumps(problem(1)) + ",\n{\"id\": \"p2\" \"images\": []}\n]")
    report = data.check_file(str(path))
    assert report.good == 1 and len(report.bad) == 1
    assert report.bad[0][0] == 3 and report.bad[0][1].startswith("malformed JSON: Expecting ','")


def hf_image(payload, path=None):
    """A Hugging Face datasets Image cell as parquet stores it."""
    return {"bytes": payload, "path": path}


def test_geometry3k_parquet_with_embedded_images(tmp_path):
    first, second = png_bytes(color=(1, 2, 3)), png_bytes((56, 28), color=(200, 100, 0))
    table = pa.table({"images": [[hf_image(first, "x.png")], [hf_image(second)]],
                      "problem": ["<image>Find x. Round to the nearest tenth.", "<image>\nFind the area."],
                      "answer": ["3.5", "12"]})
    pq.write_table(table, tmp_path / "train-00000-of-00001.parquet")
    records = data.load_problems(str(tmp_path / "train-00000-of-00001.parquet"))
    assert [(r["id"], r["question"], r["answer"]) for r in records] == [
        ("train-00000-of-00001-1", "Find x. Round to the nearest tenth.", "3.5"),
        ("train-00000-of-00001-2", "Find the area.", "12")]
    assert records[0]["images"] == [first] and records[1]["images"] == [second]
    assert data.load_image(records[1]["images"][0]).getpixel((40, 10)) == (200, 100, 0)


def test_benchmark_parquet_keeps_its_columns(tmp_path):
    """A MathVista-style export: `pid`, a path in `image`, the bytes in `decoded_image`."""
    table = pa.table({"pid": ["7", "8"], "question": ["Which is larger?", "How many?"],
                      "image": ["images/7.jpg", "images/8.jpg"],
                      "decoded_image": [hf_image(png_bytes()), hf_image(png_bytes())],
                      "choices": [["A", "B"], None], "answer": ["B", "4"],
                      "answer_type": ["text", "integer"], "query": ["Hint: ... Which is larger?", "Hint: ... How many?"],
                      "precision": [None, 1.0]})
    pq.write_table(table, tmp_path / "testmini.parquet")
    records = data.load_problems(str(tmp_path / "testmini.parquet"))
    assert [r["id"] for r in records] == ["7", "8"]
    assert all(isinstance(r["images"][0], bytes) for r in records)
    assert records[0]["choices"] == ["A", "B"] and records[1]["choices"] is None
    assert records[0]["meta"] == {"query": "Hint: ... Which is larger?", "precision": None}


def test_conversation_layouts_normalise_alike(tmp_path):
    save_png(tmp_path / "a.png")
    sharegpt = {"id": "c1", "conversations": [{"from": "human", "value": "<image>How many?"},
                                              {"from": "gpt", "value": "<think> 2 </think><answer> Final Answer:2 </answer>"}]}
    expected = {"id": "c1", "images": [str(tmp_path / "a.png")],
                "messages": [{"role": "user", "content": "<image>How many?"},
                             {"role": "assistant", "content": "<think> 2 </think><answer> Final Answer:2 </answer>"}]}
    (tmp_path / "cold.json").write_text(json.dumps([{**sharegpt, "image": "a.png"}], indent=2))
    write_jsonl(tmp_path / "cold.jsonl", [{**sharegpt, "images": ["a.png"]}])
    as_messages = {"id": "c1", "images": ["a.png"],
                   "messages": [{"role": "user", "content": "<image>How many?"},
                                {"role": "assistant", "content": expected["messages"][1]["content"]}]}
    write_jsonl(tmp_path / "messages.jsonl", [as_messages])
    for name in ("cold.json", "cold.jsonl", "messages.jsonl"):
        assert data.load_conversations(str(tmp_path / name)) == [expected], name
    roles = [{**sharegpt, "images": ["a.png"], "system": "Be brief.",
              "conversations": [{"from": "user", "value": "<image>Q"}, {"from": "assistant", "value": "A"}]}]
    (record,) = data.load_conversations(write_jsonl(tmp_path / "roles.jsonl", roles))
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant"]


# ----------------------------------------------------------------------------- the check

def seed_bad_file(tmp_path):
    """A problem file with one bad record of every kind; returns (path, {line: reason prefix})."""
    save_png(tmp_path / "a.png")
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    (tmp_path / "bomb.png").write_bytes(png_claiming_size(10000, 10000))  # PIL alone would only warn
    Image.new("CMYK", (8, 8)).save(tmp_path / "cmyk.jpg")
    Image.new("I;16", (8, 8)).save(tmp_path / "deep.png")
    (tmp_path / "empty.png").write_bytes(b"")
    rows = [
        problem(1),                                                   # 1 good
        '{"id": "p2", "images": ["a.png"], "question": "Q?"',         # 2
        problem(3, image="nowhere.png"),                              # 3
        problem(4, image="garbage.png"),                              # 4
        problem(5, image="bomb.png"),                                 # 5
        problem(6, image="cmyk.jpg"),                                 # 6
        problem(7, image="deep.png"),                                 # 7
        problem(8, image="empty.png"),                                # 8
        {"id": "p9", "images": ["a.png"], "answer": "2"},             # 9
        {"id": "p10", "images": ["a.png"], "question": "Q?"},         # 10
        {**problem(11), "question": "<image><image>Compare them."},   # 11
        "",                                                           # 12 blank: not a record
        problem(13),                                                  # 13 good
        problem(1),                                                   # 14
    ]
    expected = {2: "malformed JSON", 3: "missing image", 4: "unreadable image", 5: "decompression bomb",
                6: "non-RGB image", 7: "non-RGB image", 8: "zero-size image", 9: "missing question",
                10: "missing answer", 11: "image count mismatch", 14: "duplicate id"}
    return write_jsonl(tmp_path / "seeded.jsonl", rows), expected


def test_check_lists_every_bad_line(tmp_path, capsys):
    path, expected = seed_bad_file(tmp_path)
    report = data.check_file(path)
    assert [line for line, _ in report.bad] == sorted(expected)
    for line, reason in report.bad:
        assert reason.startswith(expected[line] + ":") or reason == expected[line], (line, reason)
    assert (report.total, report.good) == (13, 2)

    assert data.main(["check", path]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [o.split(": ")[0] for o in out[:-1]] == [f"{path}:{line}" for line in sorted(expected)]
    assert out[-1].startswith(f"{path}: 2 good of 13 problems records (malformed JSON: 1, missing image: 1,")


def test_skip_bad_yields_exactly_the_good_records(tmp_path, capsys):
    path, expected = seed_bad_file(tmp_path)
    with pytest.raises(data.DataError) as err:
        data.load_problems(path)
    assert all(f"{path}:{line}: {reason}" in str(err.value) for line, reason in expected.items())
    assert [r["id"] for r in data.load_problems(path, skip_bad=True)] == ["p1", "p13"]
    assert capsys.readouterr().err == (f"{path}: skipped 11 of 13 records (malformed JSON: 1, missing image: 1, "
                                       "unreadable image: 1, decompression bomb: 1, non-RGB image: 2, zero-size image: 1, "
                                       "missing question: 1, missing answer: 1, image count mismatch: 1, duplicate id: 1)\n")


def test_check_command_line(tmp_path):
    path, expected = seed_bad_file(tmp_path)
    strict = scripts.run("data.py", ["check", path])
    assert strict.returncode == 1 and f"{path}:5: decompression bomb" in strict.stdout
    lenient = scripts.run("data.py", ["check", path, "--skip-bad"])
    assert lenient.returncode == 0 and f"{path}: 2 good of 13 problems records" in lenient.stdout


def test_conversation_check(tmp_path):
    save_png(tmp_path / "a.png")
    good = {"images": ["a.png"], "conversations": [{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}]}
    rows = [good,
            {**good, "images": []},
            {**good, "conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "<image>Q"}]},
            {**good, "conversations": good["conversations"][:1]},
            {**good, "conversations": [{"from": "robot", "value": "<image>Q"}, {"from": "gpt", "value": "A"}]},
            {"images": ["a.png"], "question": "Q?", "answer": "1"},
            {**good, "conversations": [*good["conversations"], {"from": "human", "value": "Q2"},
                                       {"from": "gpt", "value": " \n"}]}]
    report = data.check_file(write_jsonl(tmp_path / "sft.jsonl", rows))
    assert report.kind == "conversations"
    assert [(line, reason.split(":")[0]) for line, reason in report.bad] == [
        (2, "image count mismatch"), (3, "bad turns"), (4, "no assistant reply"), (5, "bad turns"), (6, "bad turns"),
        (7, "empty answer")]
    assert report.bad[-1][1] == "empty answer: assistant turn 2 is empty"


# ----------------------------------------------------------------------------- images

def test_load_image_rules(tmp_path):
    palette = Image.new("RGB", (30, 20), (12, 34, 56)).convert("P")
    assert data.load_image(palette).getpixel((0, 0)) == palette.convert("RGB").getpixel((0, 0))
    assert data.load_image(Image.new("RGBA", (8, 8), (9, 8, 7, 0))).getpixel((3, 3)) == (9, 8, 7)
    assert data.load_image(Image.new("L", (8, 8), 77)).getpixel((1, 1)) == (77, 77, 77)
    with pytest.raises(data.BadInput, match="zero-size image"):
        data.load_image(Image.new("RGB", (0, 0)))
    with pytest.raises(data.BadInput, match="decompression bomb"):
        data.load_image(png_claiming_size(20000, 20000))
    with pytest.raises(data.BadInput, match="extreme aspect ratio"):
        data.load_image(Image.new("RGB", (1000, 4)))
    # bounds: Qwen2-VL's smart_resize, sides multiples of 28
    wide = Image.new("RGB", (150, 90))
    assert data.load_image(wide, 784, 112 * 112).size == (140, 84)
    assert data.load_image(Image.new("RGB", (200, 300)), 784, 112 * 112).size == (84, 112)
    assert data.load_image(Image.new("RGB", (30, 20)), 784, 112 * 112).size == (28, 28)
    assert data.load_image(wide).size == (150, 90)


# ----------------------------------------------------------------------------- chat encoding vs transformers

def transformers_processor(model_dir):
    """transformers' own Qwen2.5-VL processor, the oracle. Its constructor insists on a video
    processor, which needs torchvision; the image path of its __call__ reads only these attributes."""
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    processor = Qwen2_5_VLProcessor.__new__(Qwen2_5_VLProcessor)
    image_processor = data.qwen2vl_image_processor_class().from_pretrained(model_dir)
    processor.tokenizer, processor.image_processor = tokenizer, image_processor
    processor.video_processor, processor.chat_template = None, tokenizer.chat_template
    processor.image_token, processor.video_token = "<|image_pad|>", "<|video_pad|>"
    processor.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    processor.video_token_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    return processor


def oracle(processor, chat, image_paths, add_generation_prompt):
    text = processor.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
    images = [Image.open(p) for p in image_paths] or None
    return processor(images=images, text=[text], return_tensors="pt")


def assert_same(ours, theirs):
    assert ours["input_ids"] == theirs["input_ids"][0].tolist()
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
    assert torch.equal(ours["image_grid_thw"], theirs["image_grid_thw"])


@pytest.fixture(scope="module")
def processors(tiny_world):
    model_dir = os.path.join(tiny_world, "model")
    return data.ChatProcessor(model_dir), transformers_processor(model_dir)


def test_problem_record_matches_transformers(tiny_world, processors, tmp_path):
    ours, theirs = processors
    record = data.load_problems(os.path.join(tiny_world, "data", "test.jsonl"))[3]
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record["question"]}]}
    expected = oracle(theirs, [user], record["images"], add_generation_prompt=True)
    assert_same(ours.encode_problem(record), expected)
    assert expected["image_grid_thw"].tolist() == [[1, 8, 8]]
    # a palette image off the 28-pixel grid, and a second image: conversion, resizing and order
    odd = tmp_path / "odd.png"
    Image.new("RGB", (150, 90), (30, 140, 200)).convert("P").save(odd)
    images = [str(odd), record["images"][0]]
    user = {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}
    encoded = ours.encode_prompt("Compare.", images)
    assert_same(encoded, oracle(theirs, [user], images, add_generation_prompt=True))
    assert encoded["image_grid_thw"].tolist() == [[1, 6, 10], [1, 8, 8]]


def labeled_runs(encoded, tokenizer):
    """Decoded runs of consecutive labeled tokens."""
    runs, current = [], []
    for token, label in zip(encoded["input_ids"], encoded["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs, current = runs + [tokenizer.decode(current)], []
    return runs + ([tokenizer.decode(current)] if current else [])


def test_conversation_record_matches_transformers(tiny_world, processors):
    ours, theirs = processors
    # a base SFT question asked under a format instruction: system, user (image + question), assistant
    conversation = next(c for c in data.load_conversations(os.path.join(tiny_world, "data", "base_sft.jsonl"))
                        if c["messages"][0]["role"] == "system")
    system, user, reply = conversation["messages"]
    question, answer = user["content"][len("<image>"):], reply["content"]
    chat = [system, {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": answer}]
    encoded = ours.encode_conversation(conversation["messages"], conversation["images"])
    assert_same(encoded, oracle(theirs, chat, conversation["images"], add_generation_prompt=False))
    # the prompt an RL rollout sees is exactly the SFT sample's prefix; labels start right after it
    prompt = ours.encode_prompt(question, conversation["images"], system=system["content"])["input_ids"]
    n = len(prompt)
    assert encoded["input_ids"][:n] == prompt
    assert encoded["labels"][:n] == [-100] * n and encoded["labels"][-1] == -100  # the newline after <|im_end|>
    assert encoded["labels"][n:-1] == encoded["input_ids"][n:-1]
    assert ours.tokenizer.decode(encoded["input_ids"][n:-1]) == answer + "<|im_end|>"


def test_multi_turn_labels_and_image_order(tiny_world, processors, tmp_path):
    ours, theirs = processors
    small, large = save_png(tmp_path / "s.png", (56, 56)), save_png(tmp_path / "l.png", (112, 84), (0, 0, 255))
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "<image>How many red squares?"},
                {"role": "assistant", "content": "<think> 1 </think><answer> Final Answer:1 </answer>"},
                {"role": "user", "content": "And here?<image>"},
                {"role": "assistant", "content": "None."}]
    encoded = ours.encode_conversation(messages, [small, large])
    chat = [messages[0], {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many red squares?"}]},
            messages[2], {"role": "user", "content": [{"type": "text", "text": "And here?"}, {"type": "image"}]},
            messages[4]]
    assert_same(encoded, oracle(theirs, chat, [small, large], add_generation_prompt=False))
    assert labeled_runs(encoded, ours.tokenizer) == [messages[2]["content"] + "<|im_end|>", "None.<|im_end|>"]
    pads = [i for i, t in enumerate(encoded["input_ids"]) if t == ours.image_token_id]
    assert len(pads) == 4 + 12 and pads[4] - pads[3] > 1  # 56x56 -> 4 tokens first, 112x84 -> 12 tokens second


@pytest.mark.parametrize("layout", ["min_max_pixels", "size"])
def test_pixel_bounds_from_either_preprocessor_layout_and_overridden(tiny_world, tmp_path, layout):
    """Bounds written as released Qwen2.5-VL checkpoints write them (min_pixels, max_pixels) or as
    transformers 5 does (size) are read alike; bounds given to ChatProcessor override them. Either
    way pixels and grid equal transformers' processor's on the original image with those bounds.
    A 200x150 image: max 112*112 -> 112x84 (grid 1x6x8); max 56*56 -> 56x28 (grid 1x2x4)."""
    model_dir = tmp_path / "model"
    shutil.copytree(os.path.join(tiny_world, "model"), model_dir)
    path = model_dir / "preprocessor_config.json"
    config = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("size", "min_pixels", "max_pixels")}
    bounds = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}
    config.update(bounds if layout == "min_max_pixels" else {"size": {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}})
    path.write_text(json.dumps(config))
    image = Image.fromarray(torch.randint(0, 256, (150, 200, 3), generator=torch.Generator().manual_seed(0),
                                          dtype=torch.uint8).numpy())
    theirs = data.qwen2vl_image_processor_class().from_pretrained(model_dir)
    for override, grid in [({}, [[1, 6, 8]]), ({"min_pixels": 28 * 28, "max_pixels": 56 * 56}, [[1, 2, 4]])]:
        ours = data.ChatProcessor(model_dir, **override)
        assert (ours.min_pixels, ours.max_pixels) == tuple({**bounds, **override}.values())
        pixels, grid_thw = ours.vision_inputs([image])
        size = {"shortest_edge": ours.min_pixels, "longest_edge": ours.max_pixels}
        expected = theirs(images=[image], size=size, return_tensors="pt")
        assert grid_thw.tolist() == grid == expected["image_grid_thw"].tolist()
        assert torch.equal(pixels, expected["pixel_values"])


def test_prompt_system_and_special_ids(processors):
    ours, _ = processors
    with_system = ours.tokenizer.decode(ours.encode_prompt("Hi", [], system="Think first.")["input_ids"])
    assert with_system == "<|im_start|>system\nThink first.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    plain = ours.encode_prompt("Hi", [])
    assert plain["pixel_values"] is None and plain["image_grid_thw"] is None
    assert ours.tokenizer.decode(plain["input_ids"]).startswith("<|im_start|>system\nYou are a helpful assistant.")
    tokens = ours.tokenizer.convert_tokens_to_ids
    assert ours.eos_token_ids == [tokens("<|im_end|>"), tokens("<|endoftext|>")]
    assert (ours.pad_token_id, ours.image_token_id) == (tokens("<|endoftext|>"), tokens("<|image_pad|>"))


# ----------------------------------------------------------------------------- packing

def fake_sample(n, start, patches=0, labels=True):
    sample = {"input_ids": list(range(start, start + n)),
              "pixel_values": torch.full((patches, 3), float(start)) if patches else None,
              "image_grid_thw": torch.tensor([[1, 2, patches // 2]]) if patches else None}
    return {**sample, "labels": [-100] + list(range(start + 1, start + n))} if labels else sample


def test_pack_first_fit_in_order():
    samples = [fake_sample(5, 0, patches=4), fake_sample(4, 10), fake_sample(3, 20, patches=2), fake_sample(2, 30),
               fake_sample(12, 40, patches=8), fake_sample(1, 60)]
    batches = data.pack(samples, max_tokens=8)
    assert [b["index"] for b in batches] == [[0, 2], [1, 3, 5], [4]]
    first = batches[0]
    assert first["cu_seqlens"].dtype == torch.int32 and first["cu_seqlens"].tolist() == [0, 5, 8]
    assert first["input_ids"].tolist() == [0, 1, 2, 3, 4, 20, 21, 22]
    assert first["labels"].tolist() == [-100, 1, 2, 3, 4, -100, 21, 22]
    assert first["pixel_values"][:, 0].tolist() == [0, 0, 0, 0, 20, 20]
    assert first["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 1]]
    assert batches[1]["cu_seqlens"].tolist() == [0, 4, 6, 7] and batches[1]["pixel_values"] is None
    assert batches[2]["cu_seqlens"].tolist() == [0, 12]  # longer than max_tokens: a batch of its own
    unlabeled = data.pack([fake_sample(3, 0, labels=False), fake_sample(2, 5)], max_tokens=8)
    assert "labels" not in unlabeled[0]


def test_pack_shared_prompts_packs_each_prompt_once_per_batch():
    image = {"pixel_values": torch.ones(4, 3), "image_grid_thw": torch.tensor([[1, 2, 2]])}
    groups = [{"input_ids": [10, 11], "pixel_values": None, "image_grid_thw": None,
               "continuations": [[20, 21], [30]], "rows": [0, 1]},  # the docstring's example
              {"input_ids": [40, 41, 42], **image, "continuations": [[50, 51, 52], [], [60, 61]], "rows": [2, 3, 4]}]
    first, second, third = data.pack_shared_prompts(groups, max_tokens=7)
    assert first["input_ids"].tolist() == [10, 11, 20, 21, 30]
    assert first["cu_seqlens"].dtype == torch.int32 and first["cu_seqlens"].tolist() == [0, 2, 4, 5]
    assert first["prefix_of"] == [-1, 0, 0] and first["pixel_values"] is None
    assert first["positions"].tolist() == [1, 2, 1] and first["targets"].tolist() == [20, 21, 30]
    assert first["rows"] == [0, 1] and first["lengths"].tolist() == [2, 1]
    # the second group's 3 + 3 + 0 + 2 tokens exceed 7: its last response goes with a copy of the prompt
    assert second["input_ids"].tolist() == [40, 41, 42, 50, 51, 52]
    assert second["prefix_of"] == [-1, 0] and second["rows"] == [2, 3] and second["lengths"].tolist() == [3, 0]
    assert second["positions"].tolist() == [2, 3, 4] and second["pixel_values"].shape == (4, 3)
    assert third["input_ids"].tolist() == [40, 41, 42, 60, 61] and third["positions"].tolist() == [2, 3]
    assert third["rows"] == [4] and third["image_grid_thw"].tolist() == [[1, 2, 2]]


def test_one_line_json_array_without_ids_numbers_records_by_position(tmp_path):
    """Released sharegpt files are often one compact JSON array: ids must not repeat per line."""
    save_png(tmp_path / "a.png")
    rows = [{"image": "a.png", "conversations": [{"from": "human", "value": f"<image>Q{i}"},
                                                 {"from": "gpt", "value": f"A{i}"}]} for i in range(3)]
    (tmp_path / "cold.json").write_text(json.dumps(rows))
    records = data.load_conversations(tmp_path / "cold.json")
    assert [r["id"] for r in records] == ["cold-1", "cold-2", "cold-3"]


def test_prompts_may_come_without_an_answer(tmp_path):
    save_png(tmp_path / "a.png")
    write_jsonl(tmp_path / "p.jsonl", [{"id": "x", "images": ["a.png"], "question": "How many?"}])
    assert data.load_prompts(tmp_path / "p.jsonl")[0]["answer"] is None
    with pytest.raises(data.DataError, match="p.jsonl:1: missing answer"):
        data.load_problems(tmp_path / "p.jsonl")
