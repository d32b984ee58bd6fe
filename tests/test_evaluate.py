"""evaluate.py: miniature MathVista / MathVerse / MM-Math files in their released layouts (real field
names and answer types), loaders, scoring with hand-computed accuracies and breakdowns, reports, and
the command line on the synthetic world (per-sample file = summary, resume, two checkpoints)."""

import argparse
import io
import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import chat_client
import data
import evaluate as E
import generate as G
import model as M
from tests.test_fsdp import torchrun

real_generate = G.generate


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread avoids stalls on the shared cores
    yield
    torch.set_num_threads(threads)


def png(color, size=(56, 84)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def block(answer):
    return f"<think> Let me look at the figure. </think><answer> Final Answer:{answer} </answer>"


def completion(text, tokens=10, finish="stop", sample=0):
    """A generate.Completion with `tokens` response tokens (+ the stop token when it stopped)."""
    return G.Completion(0, sample, [7] * tokens + [1] * (finish == "stop"), [], finish, text)


# ----------------------------------------------------------------------------- miniature benchmarks

HINTS = {  # MathVista's hint lines, by question / answer type
    "multi_choice": "Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.",
    "integer": "Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, "
               "at the end.",
    "float": "Please answer the question requiring a floating-point number with one decimal place and provide the "
             "final value, e.g., 1.2, 1.3, 1.4, at the end.",
    "list": "Please answer the question requiring a Python list as an answer and provide the final list, e.g., "
            "[1, 2, 3], [1.1, 2.2, 3.3], at the end."}


def mathvista_row(pid, question, question_type, answer_type, answer, task, skills, choices=None, precision=None):
    """A MathVista testmini record as the Hugging Face export has it (decoded_image added for parquet)."""
    hint = HINTS["multi_choice" if question_type == "multi_choice" else answer_type]
    listing = "".join(f"\n({chr(65 + i)}) {c}" for i, c in enumerate(choices or []))
    return {"pid": pid, "question": question, "image": f"images/{pid}.png", "choices": choices, "unit": None,
            "precision": precision, "answer": answer, "question_type": question_type, "answer_type": answer_type,
            "metadata": {"category": "math-targeted-vqa", "context": "geometry diagram", "grade": "high school",
                         "img_height": 84, "img_width": 56, "language": "english", "skills": skills,
                         "source": "Geometry3K", "split": "testmini", "task": task},
            "query": f"Hint: {hint}\nQuestion: {question}" + (f"\nChoices:{listing}" if choices else "")}


MATHVISTA = [  # (row, response, finish reason)
    (mathvista_row("1", "Find the angle x.", "multi_choice", "text", "4", "geometry problem solving",
                   ["geometry reasoning", "algebraic reasoning"], choices=["3", "4", "5"]), block("B"), "stop"),
    (mathvista_row("2", "How many apples are left?", "free_form", "integer", "7", "math word problem",
                   ["arithmetic reasoning"]), 'Counting them all. The answer is "7".', "stop"),
    (mathvista_row("3", "What is the mean of the bars?", "free_form", "float", "1.5", "figure question answering",
                   ["statistical reasoning"], precision=1.0), block("1.46"), "stop"),
    (mathvista_row("4", "What animal is shown?", "multi_choice", "text", "a dog", "visual question answering",
                   ["numeric commonsense"], choices=["a cat", "a dog"]), block("A"), "stop"),
    (mathvista_row("5", "List the roots.", "free_form", "list", "[1, 2]", "textbook question answering",
                   ["scientific reasoning", "logical reasoning"]), "<think> The roots are", "length"),
    (mathvista_row("6", "Find the perimeter.", "free_form", "integer", "12", "geometry problem solving",
                   ["geometry reasoning", "arithmetic reasoning"]), block("12.0"), "stop"),
]

CHOICES = "\nChoices:\nA:25°\nB:30°\nC:40°\nD:50°"
FULL_QUESTION = "As shown in the figure, AB is parallel to CD and angle 1 is 150°, find angle 2." + CHOICES


def mathverse_row(index, version, question, answer, question_type="multi-choice", subject="Plane Geometry"):
    """A MathVerse testmini record (testmini.json layout); Vision Only rows have an empty question."""
    form = ("provide the correct option letter, e.g., A, B, C, D" if question_type == "multi-choice"
            else "provide the final value, e.g., 1, 2.5, 300")
    if version == "Vision Only":
        query_wo = f"According to the question shown in the image, please directly answer the question and {form}."
    else:
        query_wo = f"Please directly answer the question and {form}.\nQuestion: {question}"
    return {"sample_index": str(index), "problem_index": "21", "problem_version": version, "question": question,
            "image": f"images/mv{index}.png", "answer": answer, "question_type": question_type,
            "metadata": {"split": "testmini", "source": "GeoQA", "subject": subject, "subfield": "Angle"},
            "query_wo": query_wo,
            "query_cot": query_wo.replace("directly answer", "first conduct reasoning, and then answer"),
            "question_for_eval": question or FULL_QUESTION}


MATHVERSE = [
    (mathverse_row(101, "Text Dominant", FULL_QUESTION, "B"), block("B")),
    (mathverse_row(102, "Text Lite", "AB is parallel to CD, find angle 2." + CHOICES, "B"), block("30°")),
    (mathverse_row(103, "Vision Intensive", "Find angle 2 in the figure." + CHOICES, "B"), block("C")),
    (mathverse_row(104, "Vision Dominant", "Find angle 2." + CHOICES, "B"), "The answer is B."),
    (mathverse_row(105, "Vision Only", "", "B"), block("30°")),  # the options come from question_for_eval
    (mathverse_row(106, "Text Dominant", "The line passes (0, 1) and (2, 2). Find its slope.", "\\frac{1}{2}",
                   question_type="free-form", subject="Functions"), block("0.5")),
]

MMMATH = [
    ({"question": "The square has perimeter 24. Find its side.", "file_name": "mm1.png",
      "solution": "The four sides are equal, so the side is $24 \\div 4$ = \\boxed{6}.", "year": "七年级上学期",
      "difficult": "容易", "knowledge": "Properties of Shapes"}, block("6")),
    ({"question": "Find the slope of the line in the figure.", "file_name": "mm2.png",
      "solution": "It rises 1 over a run of 2, so the slope is \\boxed{\\frac{1}{2}}.", "year": "八年级下学期",
      "difficult": "普通", "knowledge": ["Functions"]}, "It rises 1 over a run of 2.\nSo the slope is $0.5$"),
    ({"question": "After the rotation, how far is A from B?", "file_name": "mm3.png",
      "solution": "The rotation keeps lengths, so AB = \\boxed{3}.", "year": "九年级上学期", "difficult": "困难",
      "knowledge": ["Transformations of Shapes", "Properties of Shapes"]}, "\\boxed{4}"),
    ({"question": "Find angle C.", "file_name": "mm4.png",
      "solution": "The angles sum to 180, so C = \\boxed{60^{\\circ}}.", "year": "八年级上学期", "difficult": "普通",
      "knowledge": ["Properties of Shapes"]}, block("60")),
]


def write_json_lines(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    """mathvista.parquet (embedded images) and mathvista.jsonl (image paths), mathverse.json (a JSON
    array, as testmini.json) and mathverse.parquet, mmmath.jsonl (MM_Math.jsonl with file_name)."""
    root = tmp_path_factory.mktemp("benchmarks")
    (root / "images").mkdir()
    colors = iter((30 * i % 255, 60 * i % 255, 90) for i in range(100))
    vista = [row for row, _, _ in MATHVISTA]
    for row in vista:
        (root / row["image"]).write_bytes(png(next(colors)))
    pq.write_table(pa.Table.from_pylist([{**row, "decoded_image": {"bytes": (root / row["image"]).read_bytes(),
                                                                   "path": None}} for row in vista]),
                   root / "mathvista.parquet")
    write_json_lines(root / "mathvista.jsonl", vista)
    verse = [row for row, _ in MATHVERSE]
    for row in verse:
        (root / row["image"]).write_bytes(png(next(colors)))
    (root / "mathverse.json").write_text(json.dumps(verse, indent=4, ensure_ascii=False), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist([{**row, "image": {"bytes": (root / row["image"]).read_bytes(), "path": None}}
                                         for row in verse]), root / "mathverse.parquet")
    for row, _ in MMMATH:
        (root / row["file_name"]).write_bytes(png(next(colors)))
    write_json_lines(root / "mmmath.jsonl", [row for row, _ in MMMATH])
    return root


# ----------------------------------------------------------------------------- loaders

def test_mathvista_parquet_and_jsonl_load_alike(bench_dir):
    from_parquet = E.load_benchmark("mathvista", str(bench_dir / "mathvista.parquet"))
    from_jsonl = E.load_benchmark("mathvista", str(bench_dir / "mathvista.jsonl"))
    assert [r["id"] for r in from_parquet] == ["1", "2", "3", "4", "5", "6"]
    first = from_parquet[0]
    assert first["question"].startswith("Hint: Please answer the question and provide the correct option letter")
    assert first["question"].endswith("Choices:\n(A) 3\n(B) 4\n(C) 5")  # the official prompt is `query`
    assert isinstance(first["images"][0], bytes) and from_jsonl[0]["images"][0].endswith("images/1.png")
    assert first["choices"] == ["3", "4", "5"] and first["answer_type"] == "text"
    assert first["meta"]["question_type"] == "multi_choice" and first["meta"]["question"] == "Find the angle x."
    assert from_parquet[2]["meta"]["precision"] == 1.0
    assert [r["meta"] for r in from_parquet] == [r["meta"] for r in from_jsonl]
    assert E.categories("mathvista", first) == {"task": ["GPS"], "skill": ["GEO", "ALG"]}
    assert E.categories("mathvista", from_parquet[4]) == {"task": ["TQA"], "skill": ["SCI", "LOG"]}


def test_mathverse_loads_all_five_versions(bench_dir):
    for name in ("mathverse.json", "mathverse.parquet"):
        records = E.load_benchmark("mathverse", str(bench_dir / name))
        assert [r["id"] for r in records] == ["101", "102", "103", "104", "105", "106"]
        vision_only = records[4]
        assert vision_only["meta"]["question"] == ""  # nothing to read but the image ...
        assert vision_only["question"].startswith("According to the question shown in the image")  # ... and query_wo
        assert records[0]["question"] == "Please directly answer the question and provide the correct option " \
                                         "letter, e.g., A, B, C, D.\nQuestion: " + FULL_QUESTION
        assert [E.categories("mathverse", r)["version"] for r in records] == [
            ["Text Dominant"], ["Text Lite"], ["Vision Intensive"], ["Vision Dominant"], ["Vision Only"],
            ["Text Dominant"]]


def test_mmmath_loads_the_released_layout(bench_dir):
    records = E.load_benchmark("mmmath", str(bench_dir / "mmmath.jsonl"))
    assert [r["id"] for r in records] == ["mmmath-1", "mmmath-2", "mmmath-3", "mmmath-4"]
    assert records[0]["images"][0] == str(bench_dir / "mm1.png") and records[0]["answer"].endswith("\\boxed{6}.")
    assert E.categories("mmmath", records[0]) == {"difficulty": ["easy"], "grade": ["seven"], "knowledge": ["Shape"]}
    assert E.categories("mmmath", records[2]) == {"difficulty": ["hard"], "grade": ["nine"],
                                                  "knowledge": ["Trans", "Shape"]}


def test_synthetic_split_loads_as_problem_records(tiny_world):
    path = os.path.join(tiny_world, "data", "test.jsonl")
    records = E.load_benchmark("synthetic", path)
    assert records == data.load_problems(path)
    assert E.categories("synthetic", records[0]) == {"kind": [records[0]["meta"]["kind"]]}


def test_bad_rows_are_named_by_file_and_line(bench_dir, tmp_path):
    rows = [row for row, _, _ in MATHVISTA[:3]]
    rows[1] = {k: v for k, v in rows[1].items() if k != "question_type"}
    rows[2] = {**rows[2], "precision": None}  # a float answer cannot be scored without its precision
    rows.append({**MATHVISTA[3][0], "image": "images/missing.png"})
    path = tmp_path / "mathvista.jsonl"
    write_json_lines(path, rows)
    shutil.copytree(bench_dir / "images", tmp_path / "images")
    with pytest.raises(data.DataError) as error:
        E.load_benchmark("mathvista", str(path))
    message = str(error.value)
    assert f"{path}:2: missing field: question_type" in message
    assert f"{path}:3: missing field: precision (the answer is a float)" in message
    assert f"{path}:4: missing image" in message
    assert [r["id"] for r in E.load_benchmark("mathvista", str(path), skip_bad=True)] == ["1"]


# ----------------------------------------------------------------------------- scoring: known responses, exact numbers

def scored(bench, path, responses):
    records = E.load_benchmark(bench, str(path))
    return [E.score_sample(bench, record, completion(*response) if isinstance(response, tuple) else
                           completion(response)) for record, response in zip(records, responses)]


def accuracies(breakdown):
    """{dimension: {label: (correct, total)}}, checking that the counts are ints (JSON numbers)."""
    assert all(type(entry[key]) is int for by_label in breakdown.values() for entry in by_label.values()
               for key in ("correct", "total"))
    return {dimension: {label: (entry["correct"], entry["total"]) for label, entry in by_label.items()}
            for dimension, by_label in breakdown.items()}


def test_mathvista_accuracy_and_official_breakdown(bench_dir):
    rows = scored("mathvista", bench_dir / "mathvista.parquet",
                  [(text, 20 + 10 * i, finish) for i, (_, text, finish) in enumerate(MATHVISTA)])
    assert [r["correct"] for r in rows] == [True, True, True, False, False, True]
    assert [r["extracted"] for r in rows] == ["B", "7", "1.46", "A", None, "12.0"]
    summary = E.summarize("mathvista", rows)
    assert summary["accuracy"] == 4 / 6
    assert accuracies(summary["breakdown"]) == {
        "task": {"FQA": (1, 1), "GPS": (2, 2), "MWP": (1, 1), "TQA": (0, 1), "VQA": (0, 1)},
        "skill": {"ALG": (1, 1), "ARI": (2, 2), "GEO": (2, 2), "LOG": (0, 1), "NUM": (0, 1), "SCI": (0, 1),
                  "STA": (1, 1)}}
    assert list(summary["breakdown"]["task"]) == ["FQA", "GPS", "MWP", "TQA", "VQA"]  # the official order
    assert summary["format_rate"] == 4 / 6 and summary["truncation_rate"] == 1 / 6
    assert summary["mean_tokens"] == 45  # 20, 30, ..., 70
    assert "samples_per_prompt" in summary and "pass@1" not in summary
    assert "official rules" in summary["scored_by"]


def test_mathverse_accuracy_by_problem_version(bench_dir):
    rows = scored("mathverse", bench_dir / "mathverse.json", [response for _, response in MATHVERSE])
    assert [r["correct"] for r in rows] == [True, True, False, False, True, True]
    summary = E.summarize("mathverse", rows)
    assert summary["accuracy"] == 4 / 6
    assert accuracies(summary["breakdown"]) == {
        "version": {"Text Dominant": (2, 2), "Text Lite": (1, 1), "Vision Intensive": (0, 1),
                    "Vision Dominant": (0, 1), "Vision Only": (1, 1)},
        "subject": {"Functions": (1, 1), "Plane Geometry": (3, 5)}}
    assert list(summary["breakdown"]["version"]) == list(E.MATHVERSE_VERSIONS)


def test_mmmath_accuracy_by_difficulty(bench_dir):
    rows = scored("mmmath", bench_dir / "mmmath.jsonl", [response for _, response in MMMATH])
    assert [r["correct"] for r in rows] == [True, True, False, True]
    assert [r["gold"] for r in rows] == ["6", "\\frac{1}{2}", "3", "60^{\\circ}"]
    assert [r["extracted"] for r in rows] == ["6", "0.5", "4", "60"]
    summary = E.summarize("mmmath", rows)
    assert summary["accuracy"] == 3 / 4
    assert accuracies(summary["breakdown"]) == {
        "difficulty": {"easy": (1, 1), "medium": (2, 2), "hard": (0, 1)},
        "grade": {"seven": (1, 1), "eight": (2, 2), "nine": (0, 1)},
        "knowledge": {"Trans": (0, 1), "Shape": (2, 3), "Func": (1, 1)}}


def synthetic_record(kind, answer, answer_type, choices=None):
    return {"id": f"test-{kind}-{answer}", "images": [], "question": "?", "answer": answer, "choices": choices,
            "answer_type": answer_type, "meta": {"kind": kind}}


def test_synthetic_scored_by_the_training_reward():
    cases = [
        (synthetic_record("count", "2", "integer"), completion(block("2"))),
        (synthetic_record("most_frequent", "B", "choice", ["red", "blue", "green", "yellow"]),
         completion(block("B or C"))),  # hedging scores 0 under the training reward
        (synthetic_record("most_shape", "circle", "text"), completion(block("circle"), finish="length")),  # truncated: 0
        (synthetic_record("sum", "3", "integer"), completion("<answer> Final Answer:3 </answer>")),  # no <think>
        (synthetic_record("most_shape", "square", "text"), completion(block("square"))),
    ]
    rows = [E.score_sample("synthetic", record, c) for record, c in cases]
    assert [r["correct"] for r in rows] == [True, False, False, False, True]
    summary = E.summarize("synthetic", rows)
    assert summary["accuracy"] == 2 / 5 and summary["format_rate"] == 4 / 5 and summary["truncation_rate"] == 1 / 5
    assert accuracies(summary["breakdown"]) == {
        "kind": {"count": (1, 1), "sum": (0, 1), "most_frequent": (0, 1), "most_shape": (1, 2)}}
    assert "hedged" in summary["scored_by"]


def test_pass_at_n_and_mean_at_n():
    record_a, record_b = synthetic_record("count", "2", "integer"), synthetic_record("sum", "5", "integer")
    rows = [E.score_sample("synthetic", record, completion(block(answer), sample=k))
            for record, answers in ((record_a, "233"), (record_b, "467")) for k, answer in enumerate(answers)]
    summary = E.summarize("synthetic", rows)
    assert summary["samples_per_prompt"] == 3 and summary["prompts"] == 2
    assert summary["pass@3"] == 1 / 2 and summary["mean@3"] == summary["accuracy"] == 1 / 6
    assert accuracies(summary["breakdown"]) == {"kind": {"count": (1, 3), "sum": (0, 3)}}


def test_accuracy_by_response_length_in_the_papers_buckets():
    """The CI analysis (docs/method.md §3): share and accuracy of responses of 0-4K, 4-8K and 8K+
    tokens, or any edges; a length on an edge belongs to the bucket below it."""
    record = synthetic_record("count", "2", "integer")
    lengths_answers = [(100, "2"), (4096, "3"), (4097, "2"), (9000, "3"), (16000, "3")]
    rows = [E.score_sample("synthetic", record, completion(block(answer), tokens, sample=k))
            for k, (tokens, answer) in enumerate(lengths_answers)]
    assert [row["tokens"] for row in rows] == [100, 4096, 4097, 9000, 16000]
    assert E.summarize("synthetic", rows)["by_length"] == {
        "0-4096": {"share": 0.4, "accuracy": 0.5, "samples": 2},
        "4097-8192": {"share": 0.2, "accuracy": 1.0, "samples": 1},
        ">8192": {"share": 0.4, "accuracy": 0.0, "samples": 2}}
    assert E.summarize("synthetic", rows[:2], edges=(128,))["by_length"] == {
        "0-128": {"share": 0.5, "accuracy": 1.0, "samples": 1}, ">128": {"share": 0.5, "accuracy": 0.0, "samples": 1}}
    assert E.length_edges("128,256") == (128, 256)
    for bad in ("256,128", "0,128", "128,128", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="increasing positive integers"):
            E.length_edges(bad)


def test_markdown_table_one_row_per_model_and_redraws_marked():
    rows = [E.score_sample("synthetic", synthetic_record("count", "2", "integer"), completion(block("2"), 30)),
            E.score_sample("synthetic", synthetic_record("sum", "5", "integer"), completion(block("4"), 10))]
    before = {"model": "base-final", **E.summarize("synthetic", rows)}
    after = {"model": "ci-final", "settings": {"retry_until_answer": 5}, **E.summarize("synthetic", rows[:1])}
    table = E.markdown_table([before, after]).splitlines()
    assert table[0] == "| model | accuracy | count | sum | format | truncated | tokens |"
    assert table[2] == "| base-final | 50.0 | 100.0 | 0.0 | 100.0 | 0.0 | 20 |"
    assert table[3] == "| ci-final | 100.0 (redrawn ≤5x) | 100.0 | - | 100.0 | 0.0 | 30 |"
    assert "up to 5 times" in table[-1] and "rewards.reward" in table[-2]


def test_sample_until_answer_redraws_only_missing_answers():
    def sampler(texts):
        draws, calls = iter(texts), []

        def sample(prompts, n):
            calls.append((len(prompts), n))
            return [G.Completion(p, k, [1], [], "stop", next(draws)) for p in range(len(prompts)) for k in range(n)]
        return sample, calls

    texts = ["no tags", block("2"), block("3"), "still none", "again none", block("4"), block("5")]
    sample, calls = sampler(texts)
    completions, attempts = E.sample_until_answer(sample, ["p0", "p1"], n=2, retries=5)
    # p0 -> [no tags, 2], p1 -> [3, still none]; redraws: p0#0 -> again none, p1#1 -> 4; then p0#0 -> 5; done
    assert calls == [(2, 2), (2, 1), (1, 1)]
    assert [c.text for c in completions] == [block("5"), block("2"), block("3"), block("4")]
    assert [(c.prompt_index, c.sample) for c in completions] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert attempts == [3, 1, 1, 2]

    sample, calls = sampler(texts)
    completions, attempts = E.sample_until_answer(sample, ["p0", "p1"], n=2, retries=1)
    assert calls == [(2, 2), (2, 1)] and completions[0].text == "again none" and attempts == [2, 1, 1, 2]


class FakeJudgeServer:
    """chat_client's OpenAIBackend as the Judge uses it: `ask(Request) -> Reply`, replies by a rule."""

    def __init__(self, reply):
        self.reply, self.prompts = reply, []

    def ask(self, request):
        self.prompts.append(request.prompt)
        return chat_client.Reply(self.reply(request.prompt))


def test_judge_extracts_mathvista_answers_only_where_the_rules_find_none(bench_dir):
    records = E.load_benchmark("mathvista", str(bench_dir / "mathvista.parquet"))
    server = FakeJudgeServer(lambda prompt: "7")
    judge = E.Judge(server, "judge-x")
    told = E.score_sample("mathvista", records[1], completion("I counted seven apples in all."), judge=judge)
    assert told["correct"] and told["extracted"] == "7" and told["judged_by"] == "judge-x"
    assert server.prompts[0].endswith(records[1]["question"] + "\nModel response: I counted seven apples in all."
                                      "\nExtracted answer:")  # the official prompt's `query` and the response
    with_unit = E.score_sample("mathvista", records[1], completion(block("7 apples")), judge=judge)
    assert with_unit["correct"] and with_unit["judged_by"] == "judge-x"  # the integer cast fails: the judge reads it
    assert server.prompts[1].endswith("\nModel response: 7 apples\nExtracted answer:")  # the answer block only
    without_judge = E.score_sample("mathvista", records[1], completion(block("7 apples")))
    assert not without_judge["correct"] and without_judge["extracted"] == "7 apples"
    by_rule = E.score_sample("mathvista", records[0], completion(block("B")), judge=judge)
    assert by_rule["correct"] and by_rule["judged_by"] is None and len(server.prompts) == 2
    summary = E.summarize("mathvista", [told, by_rule])
    assert summary["judge"] == ["judge-x"] and summary["accuracy"] == 1.0
    assert E.summarize("mathvista", [by_rule])["judge"] is None


def test_judge_extracts_and_judges_mathverse(bench_dir):
    records = E.load_benchmark("mathverse", str(bench_dir / "mathverse.json"))
    server = FakeJudgeServer(lambda prompt: "1" if prompt.startswith("Below are") else "null")
    judge = E.Judge(server, "judge-x")
    consistent = E.score_sample("mathverse", records[4], completion(block("thirty degrees")), judge=judge)
    assert consistent["correct"] and consistent["judged_by"] == "judge-x"
    assert "[Question]: " + FULL_QUESTION in server.prompts[-1]  # Vision Only: the judge reads question_for_eval
    assert "[Standard Answer]: B\n[Model_answer]: thirty degrees\nJudgement:" in server.prompts[-1]
    prefetched = E.score_sample("mathverse", records[0], completion(block("B")), judge=judge)
    assert prefetched["correct"] and prefetched["judged_by"] is None and len(server.prompts) == 1
    nothing = E.score_sample("mathverse", records[3], completion("I cannot tell."), judge=judge)
    assert not nothing["correct"] and nothing["extracted"] is None and nothing["judged_by"] == "judge-x"
    assert server.prompts[-1].endswith("Model response: I cannot tell.\nExtracted answer:") and len(server.prompts) == 2


def test_model_names():
    assert E.model_name("runs/toy/ci/final") == "ci-final"
    assert E.model_name("runs/toy/grpo/step_100/") == "grpo-step_100"
    assert E.model_name("/models/Vision-R1-7B") == "Vision-R1-7B"
    assert E.model_name("runs/toy/grpo/long/stage1/final") == "long-stage1-final"


# ----------------------------------------------------------------------------- the command line

def scripted_generate(responses):
    """A generate.generate that answers each prompt with responses[its question text] (a KeyError
    means the prompt was not the benchmark's prompt field), as (text, finish reason) pairs."""
    def fake(model, prompts, *, eos_ids, n=1, tokenizer=None, **sampling):
        out = []
        for p, prompt in enumerate(prompts):
            chat = tokenizer.decode(prompt["input_ids"], skip_special_tokens=False)
            assert chat.count("<|image_pad|>") > 0 and "<|im_start|>system" in chat  # image + template's system turn
            text, finish = responses[chat.split("<|vision_end|>")[-1].split("<|im_end|>")[0]]
            ids = tokenizer.encode(text) + [eos_ids[0]] * (finish == "stop")
            out += [G.Completion(p, k, ids, [], finish, text) for k in range(n)]
        return out
    return fake


def read_rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_cli_scores_benchmark_files_end_to_end(tiny_world, bench_dir, tmp_path, monkeypatch, capsys):
    vista = E.load_benchmark("mathvista", str(bench_dir / "mathvista.parquet"))
    verse = E.load_benchmark("mathverse", str(bench_dir / "mathverse.parquet"))
    mm = E.load_benchmark("mmmath", str(bench_dir / "mmmath.jsonl"))
    responses = {r["question"]: (text, finish) for r, (_, text, finish) in zip(vista, MATHVISTA)}
    responses |= {r["question"]: (text, "stop") for r, (_, text) in zip(verse, MATHVERSE)}
    responses |= {r["question"]: (text, "stop") for r, (_, text) in zip(mm, MMMATH)}
    monkeypatch.setattr(G, "generate", scripted_generate(responses))
    out = tmp_path / "eval"
    summaries = E.main(["--model", os.path.join(tiny_world, "model"), "--out", str(out),
                        "--bench", "mathvista", "--data", str(bench_dir / "mathvista.parquet"),
                        "--bench", "mathverse", "--data", str(bench_dir / "mathverse.parquet"),
                        "--bench", "mmmath", "--data", str(bench_dir / "mmmath.jsonl"), "--batch-size", "4"])
    assert [(s["bench"], s["accuracy"]) for s in summaries] == [("mathvista", 4 / 6), ("mathverse", 4 / 6),
                                                                ("mmmath", 3 / 4)]
    for summary, expected_ids in zip(summaries, (vista, verse, mm)):
        run_dir = out / summary["bench"] / "model"
        rows = read_rows(run_dir / "samples.jsonl")
        assert [row["id"] for row in rows] == [r["id"] for r in expected_ids]
        assert summary == {"model": "model", "settings": summary["settings"], **E.summarize(summary["bench"], rows)}
        assert json.loads((run_dir / "summary.json").read_text(encoding="utf-8")) == summary
        assert summary["settings"]["temperature"] == 0.6 and summary["settings"]["top_p"] == 0.95
        assert summary["settings"]["max_new_tokens"] == 16000 and summary["settings"]["n"] == 1
        assert not list(run_dir.glob("samples.rank*"))
    mathvista_report = (out / "mathvista" / "model" / "report.md").read_text(encoding="utf-8")
    assert "temperature 0.6, top-p 0.95, up to 16000 new tokens, prompt field `query`" in mathvista_report
    # ALL; FQA GPS MWP TQA VQA; ALG ARI GEO LOG NUM SCI STA; format, truncated
    assert ("| model | 66.7 | 100.0 | 100.0 | 100.0 | 0.0 | 0.0 | 100.0 | 100.0 | 100.0 | 0.0 | 0.0 | 0.0 | 100.0 "
            "| 66.7 | 16.7 |") in mathvista_report
    printed = capsys.readouterr().out
    versions = "| Text Dominant | Text Lite | Vision Intensive | Vision Dominant | Vision Only |"
    assert "| model | accuracy " + versions in printed
    assert "| model | accuracy | easy | medium | hard | seven | eight | nine | Trans | Shape | Func |" in printed


def test_cli_records_the_judge(tiny_world, bench_dir, tmp_path, monkeypatch):
    verse = E.load_benchmark("mathverse", str(bench_dir / "mathverse.json"))
    monkeypatch.setattr(G, "generate", scripted_generate({r["question"]: (text, "stop")
                                                          for r, (_, text) in zip(verse, MATHVERSE)}))
    clients = []

    def client(url, model, api_key=None, **options):
        clients.append((url, model, api_key, options))
        return FakeJudgeServer(lambda prompt: "1")  # judges every answer consistent

    monkeypatch.setattr(chat_client, "OpenAIBackend", client)
    monkeypatch.setenv("OPENAI_API_KEY", "key")
    (summary,) = E.main(["--model", os.path.join(tiny_world, "model"), "--bench", "mathverse", "--data",
                         str(bench_dir / "mathverse.json"), "--out", str(tmp_path), "--judge",
                         "http://127.0.0.1:9/v1", "--judge-model", "gpt-4o-mini"])
    assert clients == [("http://127.0.0.1:9/v1", "gpt-4o-mini", "key", {"max_tokens": 512, "temperature": 0.0})]
    assert summary["judge"] == ["gpt-4o-mini"]
    assert summary["settings"]["judge"] == "gpt-4o-mini at http://127.0.0.1:9/v1"
    # every answer block is consistent to this judge; "The answer is B." has none and the judge extracts "1"
    assert summary["accuracy"] == 1.0
    report = (tmp_path / "mathverse" / "model" / "report.md").read_text(encoding="utf-8")
    assert "Model judge where the official pipeline asks GPT: gpt-4o-mini." in report


def test_cli_before_and_after_on_the_synthetic_world_resumes(tiny_world, tmp_path, monkeypatch):
    """The real model end to end: greedy, 4 test problems, 6 tokens (accuracy ~0 with random weights)."""
    base = os.path.join(tiny_world, "model")
    after = tmp_path / "ci" / "final"
    shutil.copytree(base, after)  # stands in for the SFT checkpoint: a second row, its own folder
    out = tmp_path / "eval"
    argv = ["--model", base, "--model", str(after), "--bench", "synthetic", "--out", str(out), "--greedy",
            "--data", os.path.join(tiny_world, "data", "test.jsonl"), "--limit", "4", "--max-new-tokens", "6",
            "--batch-size", "2"]
    summaries = E.main(argv)
    assert [s["model"] for s in summaries] == ["model", "ci-final"]
    records = data.load_problems(os.path.join(tiny_world, "data", "test.jsonl"))[:4]
    samples = out / "synthetic" / "model" / "samples.jsonl"
    rows = read_rows(samples)
    assert [row["id"] for row in rows] == [r["id"] for r in records]
    summary = summaries[0]
    assert summary["accuracy"] == sum(row["correct"] for row in rows) / 4
    assert summary["truncation_rate"] == sum(row["truncated"] for row in rows) / 4
    assert summary["mean_tokens"] == sum(row["tokens"] for row in rows) / 4
    assert all(row["tokens"] <= 6 for row in rows)
    assert sum(entry["total"] for entry in summary["breakdown"]["kind"].values()) == 4

    # the responses are the model's greedy continuations of question + image under the chat template
    processor = data.ChatProcessor(base)
    direct = G.generate(M.load_model(base).eval(), [processor.encode_problem(r) for r in records[:2]],
                        eos_ids=processor.eos_token_ids, max_new_tokens=6, greedy=True, tokenizer=processor.tokenizer)
    assert [row["response"] for row in rows[:2]] == [c.text for c in direct]

    # a rerun is refused before any work; with --resume it generates nothing and changes nothing
    content = samples.read_text(encoding="utf-8")

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished evaluation sampled again")

    monkeypatch.setattr(G, "generate", must_not_run)
    files = sorted(path for path in out.rglob("*") if path.is_file())
    before = [path.read_bytes() for path in files]
    with pytest.raises(SystemExit, match=f"^{out / 'synthetic' / 'model'} holds a run already: --resume continues"):
        E.main(argv)
    assert [path.read_bytes() for path in files] == before
    argv.append("--resume")
    assert E.main(argv)[0] == summary
    assert samples.read_text(encoding="utf-8") == content

    # an interrupted run (last row lost, a rank file cut mid-line) resumes with exactly the missing prompt
    lines = content.splitlines(keepends=True)
    samples.write_text("".join(lines[:3]), encoding="utf-8")
    (samples.parent / "samples.rank1.jsonl").write_text(lines[3][:20], encoding="utf-8")
    sampled = []

    def counted(model, prompts, **kwargs):
        sampled.append(len(prompts))
        return real_generate(model, prompts, **kwargs)

    monkeypatch.setattr(G, "generate", counted)
    assert E.main(argv)[0]["prompts"] == 4
    assert sampled == [1]
    assert [row["id"] for row in read_rows(samples)] == [r["id"] for r in records]

    with pytest.raises(SystemExit, match="max_new_tokens: 6 -> 7"):
        E.main([*argv, "--max-new-tokens", "7"])


def test_two_ranks_share_the_prompts(tiny_world, tmp_path):
    out = tmp_path / "eval"
    torchrun("evaluate.py", "--model", os.path.join(tiny_world, "model"), "--bench", "synthetic", "--data",
             os.path.join(tiny_world, "data", "test.jsonl"), "--limit", "5", "--max-new-tokens", "4", "--greedy",
             "--out", out)
    run_dir = out / "synthetic" / "model"
    rows = read_rows(run_dir / "samples.jsonl")
    records = data.load_problems(os.path.join(tiny_world, "data", "test.jsonl"))[:5]
    assert [row["id"] for row in rows] == [r["id"] for r in records]  # both shards, folded in benchmark order
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["prompts"] == 5 and summary["mean_tokens"] == sum(row["tokens"] for row in rows) / 5
    assert not list(run_dir.glob("samples.rank*"))
