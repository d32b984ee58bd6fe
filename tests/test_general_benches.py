"""The general benchmarks of the LlamaV-CI table (MMStar, ChartQA, MME, HallusionBench): each rule
of scoring.py on hand-built cases, and miniature files in the released layouts loaded and scored
through evaluate.py with hand-computed accuracies and official scores."""

import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data
import evaluate as E
import generate as G
import scoring as S
from tests.test_evaluate import accuracies, block, completion, png, read_rows, scripted_generate

# ----------------------------------------------------------------------------- the rules

ANIMALS = {"A": "a dog", "B": "a cat", "C": "a bird"}


@pytest.mark.parametrize("prediction, letter", [
    ("B", "B"), ("(C)", "C"), ("The answer is B.", "B"), ("B: a cat", "B"),
    ("A or B", None),  # two letters stand as words, and two option texts are named
    ("It is a cat.", "B"),  # no letter: the one option text inside the answer
    ("a dog or a cat", None), ("Cannot determine the answer", "Z"), ("Z", "Z"), ("", None)])
def test_mmstar_choice_follows_vlmevalkit_can_infer(prediction, letter):
    assert S.mmstar_choice(prediction, ANIMALS) == letter


def test_mmstar_options_read_the_hugging_face_question():
    question = "What is shown?\nOptions: A: a dog, B: a cat, sitting, C: 5"
    assert S.mmstar_options(question) == {"A": "a dog", "B": "a cat, sitting", "C": "5"}
    assert S.mmstar_options("What is shown?") == {}
    released = ("Which option describe the object relationship in the image correctly?\nOptions: A: The suitcase "
                "is on the book., B: The suitcase is beneath the cat., C: 3, 4, and 5, D: None")
    assert S.mmstar_options(released) == {"A": "The suitcase is on the book.", "B": "The suitcase is beneath the cat.",
                                          "C": "3, 4, and 5", "D": "None"}


@pytest.mark.parametrize("target, prediction, correct", [
    ("50", "52", True), ("50", "47.5", True), ("50", "53", False),  # 4%, 5%, 6% off
    ("12%", "0.12", True), ("0.12", "12%", True), ("12%", "12", False),  # "12%" reads 0.12
    ("0", "0.0", False), ("0", "0", True),  # a gold of 0 is compared as text
    ("Yes", " yes ", True), ("Asia", "asia.", False)])
def test_chartqa_relaxed_correctness(target, prediction, correct):
    assert S.chartqa_relaxed_correct(target, prediction) is correct


@pytest.mark.parametrize("prediction, label", [
    ("Yes", "yes"), ("no", "no"), ("Yes, there is a dog.", "yes"), ("No.", "no"),
    ("Not at all", "no"),  # "not " holds "no"
    ("There is no dog", "other"), ("I think yes", "other")])
def test_mme_answer_reads_the_first_four_characters(prediction, label):
    assert S.mme_answer(prediction) == label


@pytest.mark.parametrize("prediction, label", [
    ("Yes, it is.", "Yes"), ("No.", "No"), ("yes and no", "Unknown"), ("I am not sure", "Unknown"),
    ("No-one is there", "No"), ("(yes)", "Yes"), ("Nope", "Unknown")])
def test_yes_or_no_follows_yorn_extraction(prediction, label):
    assert S.yes_or_no(prediction) == label


def test_mme_scores_sum_acc_and_acc_plus_per_subtask():
    results = [("existence", "e1", True), ("existence", "e1", True), ("existence", "e2", True),
               ("existence", "e2", False), ("code_reasoning", "c1", False), ("code_reasoning", "c1", True)]
    scores = S.mme_scores(results)
    # existence: acc 3/4 = 75, acc+ 1/2 = 50; code_reasoning: acc 1/2 = 50, acc+ 0/1 = 0
    assert scores == {"perception": 125.0, "cognition": 50.0, "total": 175.0,
                      "subtasks": {"existence": 125.0, "code_reasoning": 50.0}}


# ----------------------------------------------------------------------------- miniature files

MMSTAR = [  # (row, response, correct)
    ({"index": 0, "question": "What animal is it?\nOptions: A: a dog, B: a cat, C: a bird, D: a fish", "answer": "B",
      "category": "coarse perception", "l2_category": "image scene and topic"}, block("B"), True),
    ({"index": 1, "question": "Which is larger?\nOptions: A: 5, B: 8, C: 2, D: 1", "answer": "B",
      "category": "math", "l2_category": "numeric commonsense and calculation"}, block("8"), True),
    ({"index": 2, "question": "What color?\nOptions: A: red, B: blue, C: green, D: white", "answer": "A",
      "category": "coarse perception", "l2_category": "image style & quality"}, "It is A or B", False),
]
CHARTQA = [
    ({"type": "human_test", "question": "What is the value of 2019?", "answer": "50"}, block("52"), True),
    ({"type": "augmented_test", "question": "What share is blue?", "answer": "12%"}, block("0.125"), True),
    ({"type": "human_test", "question": "Is the line rising?", "answer": "Yes"}, block("No"), False),
    ({"type": "augmented_test", "question": "What is the minimum?", "answer": "0"}, block("0.0"), False),
]
MME = [
    ({"question_id": "existence/e1.png", "question": "Is there a dog? Please answer yes or no.", "answer": "Yes",
      "category": "existence"}, "Yes", True),
    ({"question_id": "existence/e1.png", "question": "Is there a cat? Please answer yes or no.", "answer": "No",
      "category": "existence"}, "No, there is not.", True),
    ({"question_id": "existence/e2.png", "question": "Is there a car? Please answer yes or no.", "answer": "Yes",
      "category": "existence"}, block("yes"), True),
    ({"question_id": "existence/e2.png", "question": "Is there a bus? Please answer yes or no.", "answer": "No",
      "category": "existence"}, "There is no bus.", False),  # "other"
    ({"question_id": "code_reasoning/c1.png", "question": "Does it print 3? Please answer yes or no.", "answer": "Yes",
      "category": "code_reasoning"}, block("No"), False),
    ({"question_id": "code_reasoning/c1.png", "question": "Does it print 4? Please answer yes or no.", "answer": "No",
      "category": "code_reasoning"}, block("No"), True),
]


def hallusion(category, subcategory, figure_id, question_id, gt_answer, visual_input=1):
    """A row of the official HallusionBench.json (filename relative to it, null without a figure)."""
    filename = f"./hallusion_bench/{category}/{subcategory}/0_{figure_id}.png" if visual_input else None
    return {"category": category, "subcategory": subcategory, "visual_input": str(visual_input), "set_id": "0",
            "figure_id": str(figure_id), "sample_note": "note", "question_id": str(question_id),
            "question": f"Is statement {question_id} true of figure {figure_id}?", "gt_answer_details": "details",
            "gt_answer": gt_answer, "filename": filename}


HALLUSIONBENCH = [
    (hallusion("VD", "illusion", 0, 0, "1"), "Yes", True),
    (hallusion("VD", "illusion", 0, 1, "0"), block("No"), True),
    (hallusion("VD", "illusion", 1, 0, "0"), "Yes", False),
    (hallusion("VD", "illusion", 1, 1, "1"), "yes", True),
    (hallusion("VS", "chart", 0, 0, "1", visual_input=0), "Yes.", True),  # asked without a figure
    (hallusion("VS", "chart", 1, 0, "1"), "Yes", True),
    (hallusion("VS", "chart", 2, 0, "0", visual_input=2), "Yes and no", False),  # Unknown
]


@pytest.fixture(scope="module")
def general_dir(tmp_path_factory):
    """mmstar.parquet, chartqa.parquet and mme.parquet (images embedded, as the Hugging Face
    exports), hallusionbench.json (the official file, images beside it)."""
    root = tmp_path_factory.mktemp("general")
    for i, (name, rows) in enumerate((("mmstar", MMSTAR), ("chartqa", CHARTQA), ("mme", MME))):
        table = [{**row, "image": {"bytes": png((40 * i, 20 * j, 90)), "path": None}}
                 for j, (row, _, _) in enumerate(rows)]
        pq.write_table(pa.Table.from_pylist(table), root / f"{name}.parquet")
    for j, (row, _, _) in enumerate(HALLUSIONBENCH):
        if row["filename"]:
            (root / row["filename"]).parent.mkdir(parents=True, exist_ok=True)
            (root / row["filename"]).write_bytes(png((10, 20 * j, 30)))
    (root / "hallusionbench.json").write_text(json.dumps([row for row, _, _ in HALLUSIONBENCH], indent=4))
    return root


def scored(bench, path, cases):
    records = E.load_benchmark(bench, str(path))
    return [E.score_sample(bench, record, completion(text)) for record, (_, text, _) in zip(records, cases)]


def test_mmstar_loads_and_scores_by_option(general_dir):
    records = E.load_benchmark("mmstar", str(general_dir / "mmstar.parquet"))
    assert [r["id"] for r in records] == ["0", "1", "2"] and len(records[0]["images"]) == 1
    rows = scored("mmstar", general_dir / "mmstar.parquet", MMSTAR)
    assert [r["correct"] for r in rows] == [c for _, _, c in MMSTAR]
    assert [r["extracted"] for r in rows] == ["B", "B", None]  # "8" is option B's text
    summary = E.summarize("mmstar", rows)
    assert summary["accuracy"] == pytest.approx(2 / 3) and "official" not in summary
    assert accuracies(summary["breakdown"])["category"] == {"coarse perception": (1, 2), "math": (1, 1)}


def test_chartqa_loads_and_scores_relaxed_accuracy_by_split(general_dir):
    rows = scored("chartqa", general_dir / "chartqa.parquet", CHARTQA)
    assert [r["correct"] for r in rows] == [c for _, _, c in CHARTQA]
    summary = E.summarize("chartqa", rows)
    assert summary["accuracy"] == 0.5
    assert accuracies(summary["breakdown"]) == {"split": {"human": (1, 2), "augmented": (1, 2)}}


def test_mme_loads_and_sums_perception_and_cognition(general_dir):
    records = E.load_benchmark("mme", str(general_dir / "mme.parquet"))
    assert [r["id"] for r in records] == [f"mme-{i}" for i in range(1, 7)]  # the two questions share question_id
    rows = scored("mme", general_dir / "mme.parquet", MME)
    assert [r["correct"] for r in rows] == [c for _, _, c in MME]
    assert [r["extracted"] for r in rows] == ["yes", "no", "yes", "other", "no", "no"]
    summary = E.summarize("mme", rows)
    # existence: acc 75 + acc+ 50; code_reasoning: acc 50 + acc+ 0
    assert summary["official"] == {"perception": 125.0, "cognition": 50.0, "total": 175.0,
                                   "subtasks": {"existence": 125.0, "code_reasoning": 50.0}}
    assert accuracies(summary["breakdown"]) == {"subtask": {"existence": (3, 4), "code_reasoning": (1, 2)}}
    table = E.markdown_table([{**summary, "model": "m"}])
    assert "| perception | cognition | total |" in table and "| 125.0 | 50.0 | 175.0 |" in table
    # a second pass with every answer right (existence 200, code_reasoning 200): the mean of the passes
    second = [{**row, "sample": 1, "correct": True} for row in rows]
    assert E.summarize("mme", rows + second)["official"]["total"] == pytest.approx((175 + 400) / 2)


def test_hallusionbench_loads_the_official_json_and_scores_a_f_q_accuracy(general_dir):
    records = E.load_benchmark("hallusionbench", str(general_dir / "hallusionbench.json"))
    assert records[0]["id"] == "VD_illusion_0_0_0" and records[0]["answer"] == "Yes"
    assert [len(r["images"]) for r in records] == [1, 1, 1, 1, 0, 1, 1]
    rows = scored("hallusionbench", general_dir / "hallusionbench.json", HALLUSIONBENCH)
    assert [r["correct"] for r in rows] == [c for _, _, c in HALLUSIONBENCH]
    official = E.summarize("hallusionbench", rows)["official"]
    # aAcc 5/7; fAcc: VD figure 0 right, VD figure 1 wrong, VS figure 1 right, VS figure 2 wrong (the VS
    # question without a figure is no figure) = 2/4; qAcc: VD question 1 right on both figures, VD question 0
    # and VS question 0 not = 1/3
    assert official == pytest.approx({"aAcc": 500 / 7, "fAcc": 50.0, "qAcc": 100 / 3})


@pytest.mark.parametrize("bench, row, reason", [
    ("mmstar", {**MMSTAR[0][0], "answer": "E"}, "bad answer: 'E' is not one of the question's options (A, B, C, D)"),
    ("mme", {**MME[0][0], "answer": "Maybe"}, "bad answer: 'Maybe' is not Yes or No"),
    ("hallusionbench", {**HALLUSIONBENCH[4][0], "gt_answer": "2"}, "bad gt_answer: '2' is not 1 or 0"),
    ("mme", {key: value for key, value in MME[0][0].items() if key != "category"}, "missing field: category")])
def test_bad_rows_are_refused_with_the_reason(tmp_path, bench, row, reason):
    path = tmp_path / f"{bench}.jsonl"
    path.write_text(json.dumps({**row, "image": None}) + "\n")
    with pytest.raises(data.DataError, match=re.escape(f"{bench}.jsonl:1: {reason}")):
        E.load_benchmark(bench, str(path))


def test_cli_writes_the_official_scores(tiny_world, general_dir, tmp_path, monkeypatch, capsys):
    records = E.load_benchmark("mme", str(general_dir / "mme.parquet"))
    responses = {record["question"]: (text, "stop") for record, (_, text, _) in zip(records, MME)}
    monkeypatch.setattr(G, "generate", scripted_generate(responses))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    [summary] = E.main(["--model", os.path.join(tiny_world, "model"), "--out", str(tmp_path), "--bench", "mme",
                        "--data", str(general_dir / "mme.parquet")])
    assert summary["official"]["total"] == 175.0 and summary["accuracy"] == 4 / 6
    rows = read_rows(tmp_path / "mme" / "model" / "samples.jsonl")
    assert rows[0]["pairing"] == {"subtask": "existence", "image": "existence/e1.png"}
    assert json.loads((tmp_path / "mme" / "model" / "summary.json").read_text())["official"] == summary["official"]
    printed = capsys.readouterr().out
    assert "| model | accuracy | perception | cognition | total | existence | code_reasoning |" in printed
    assert "| model | 66.7 | 125.0 | 50.0 | 175.0 | 75.0 | 50.0 |" in printed
