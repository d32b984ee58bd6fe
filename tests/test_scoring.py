"""Benchmark scoring: MathVista parity with published official verdicts, every MathVista
normalisation branch, MathVerse and MM-Math rules."""

import gzip
import json
import time
from pathlib import Path

import pytest

import scoring

DATA = Path(__file__).parent / "data" / "mathvista"


def mathvista(question_type="free_form", answer_type="integer", answer="3", choices=None, precision=None):
    return {"pid": "t", "question_type": question_type, "answer_type": answer_type, "precision": precision,
            "choices": choices, "answer": answer}


def answer_block(answer):
    return f"<think> Let me work it out. </think><answer> Final Answer:{answer} </answer>"


# ----------------------------------------------------------------------------- MathVista

def test_mathvista_matches_published_official_verdicts():
    with gzip.open(DATA / "instructblip2_vicuna_13b.json.gz", "rt", encoding="utf-8") as f:
        records = json.load(f)
    assert len(records) == 1000
    verdicts = [scoring.score_mathvista(r, r["extraction"]) for r in records]
    disagreements = [r["pid"] for r, verdict in zip(records, verdicts) if verdict != r["true_false"]]
    # The one disagreement is a published verdict the current official scorer contradicts:
    # pid 917 (integer answer "1", extraction "1.5") was scored when integers were cast with
    # int("1.5"), which fails; calculate_score.py now casts with int(float(x)) -> "1" == "1".
    assert disagreements == ["917"]
    assert 1 - len(disagreements) / len(records) >= 0.998
    # The published testmini accuracy of this model (MathVista paper: InstructBLIP 25.3%), recomputed
    # from the published verdicts; the current scorer adds pid 917.
    assert sum(r["true_false"] for r in records) == 253
    assert sum(verdicts) == 254


@pytest.mark.parametrize("extraction, prediction", [
    ("B", "4"),                # option letter -> option text
    ("(C) 5", "5"),            # "(X) text" -> letter X
    ("answer (c)", "5"),       # the letter in parentheses is upper-cased
    ("5", "5"),                # option text itself (edit distance 0)
    ("4.1", "4"),              # nearest option by edit distance
    ("E", "3"),                # letter beyond the options: nearest text, first of ties
    ("", "3"),                 # empty extraction still picks the nearest (first) option
    (None, "3"),               # non-strings are str()-ed: "None" is nearest to "3"
])
def test_mathvista_multi_choice(extraction, prediction):
    record = mathvista("multi_choice", "text", answer="4", choices=["3", "4", "5"])
    assert scoring.normalize_mathvista_extraction(extraction, record) == prediction
    assert scoring.score_mathvista(record, extraction) == (prediction == "4")


def test_mathvista_nearest_option_from_published_record():
    # pid 5 of the vendored file: "E" on ["97", "102", "107", "122"] is published as correct.
    record = mathvista("multi_choice", "text", answer="97", choices=["97", "102", "107", "122"])
    assert scoring.nearest_choice("E", record["choices"]) == "97"
    assert scoring.score_mathvista(record, "E")


def test_mathvista_ignore_empty_extractions_flag():
    record = mathvista("multi_choice", "text", answer="3", choices=["3", "4"])
    assert scoring.score_mathvista(record, "  ")
    assert not scoring.score_mathvista(record, "  ", ignore_empty_extractions=True)


def test_mathvista_multi_choice_without_choices_is_an_error():
    with pytest.raises(ValueError, match="pid t"):
        scoring.score_mathvista(mathvista("multi_choice", "text", choices=[]), "A")


@pytest.mark.parametrize("extraction, prediction", [
    ("3", "3"), ("3.7", "3"), ("-2.5", "-2"), ("1e3", "1000"), (" 12 ", "12"),
    ("12 cm", None), ("three", None), (None, None), ("inf", None),
])
def test_mathvista_integer(extraction, prediction):
    assert scoring.normalize_mathvista_extraction(extraction, mathvista(answer="3")) == prediction


@pytest.mark.parametrize("precision, extraction, answer, correct", [
    (1, "1.24", "1.2", True),
    (1, "1.26", "1.3", True),
    (1, "1.2 m", "1.2", False),
    (1.0, "0", "0.0", True),        # precision read as int, as the official int(precision)
    (2, "0.214", "0.21", True),
    (2, "0.7", "0.70", False),      # official compares strings: str(round(0.7, 2)) is "0.7"
    (2, "51.035", "51.03", True),   # float rounding of 51.035 (binary 51.03499...)
])
def test_mathvista_float_with_precision(precision, extraction, answer, correct):
    record = mathvista(answer_type="float", answer=answer, precision=precision)
    assert scoring.score_mathvista(record, extraction) == correct


def test_mathvista_text_and_list():
    assert scoring.score_mathvista(mathvista(answer_type="text", answer="Linear"), "Linear")
    assert not scoring.score_mathvista(mathvista(answer_type="text", answer="Linear"), "linear")
    listed = mathvista(answer_type="list", answer="[1, 2, 3]")
    assert scoring.score_mathvista(listed, "[1, 2, 3]")
    assert not scoring.score_mathvista(listed, "[1,2,3]")  # string equality, as official


@pytest.mark.parametrize("response, record, extraction", [
    (answer_block("B"), mathvista("multi_choice", "text", choices=["3", "4"]), "B"),
    (answer_block("3.5 cm"), mathvista(answer_type="float", precision=1), "3.5 cm"),
    ("quarter", mathvista("multi_choice", "text", choices=["half", "quarter"]), "quarter"),
    ("12", mathvista(), "12"),
    ("1.50", mathvista(answer_type="float", precision=1), "1.5"),
    ('Counting them all. The answer is "7".', mathvista(), "7"),
    ("The figure shows seven objects, so seven.", mathvista(), ""),
    ("", mathvista(), ""),
])
def test_extract_mathvista_answer(response, record, extraction):
    assert scoring.extract_mathvista_answer(response, record) == extraction


def test_mathvista_response_to_verdict():
    record = mathvista("multi_choice", "text", answer="145°", choices=["135°", "140°", "145°", "150°"])
    def verdict(answer):
        return scoring.score_mathvista(record, scoring.extract_mathvista_answer(answer_block(answer), record))

    assert verdict("C") and verdict("(C) 145°") and verdict("145°")
    assert not verdict("B")


def test_mathvista_abbreviations_cover_the_official_breakdown():
    assert sorted(scoring.MATHVISTA_TASKS) == ["FQA", "GPS", "MWP", "TQA", "VQA"]
    assert scoring.MATHVISTA_SKILLS["STA"] == "statistical reasoning"
    assert len(set(scoring.MATHVISTA_SKILLS.values())) == 7


def test_edit_distance():
    assert scoring.edit_distance("kitten", "sitting") == 3
    assert scoring.edit_distance("", "abc") == 3
    assert scoring.edit_distance("60°", "60°") == 0


# ----------------------------------------------------------------------------- MathVerse

MATHVERSE_CHOICE = {
    "question_type": "multi-choice", "answer": "B",
    "question": "As shown in the figure, find the angle.\nChoices:\nA:25°\nB:30°\nC:40°\nD:50°",
}


@pytest.mark.parametrize("answer, correct", [
    ("B", True), ("(B)", True), ("B. 30°", True), ("B: 30°", True), ("30°", True),
    ("C", False), ("40°", False), ("35°", False),
])
def test_mathverse_multi_choice(answer, correct):
    assert scoring.score_mathverse(MATHVERSE_CHOICE, answer_block(answer)) == correct


def test_mathverse_options_parse():
    options = scoring.mathverse_options(MATHVERSE_CHOICE["question"])
    assert options == {"A": "25°", "B": "30°", "C": "40°", "D": "50°"}
    assert scoring.mathverse_options("What is x?") == {}


@pytest.mark.parametrize("gold, answer, correct", [
    ("\\frac{1}{2}", "0.5", True),
    ("2\\sqrt{3}", "\\sqrt{12}", True),
    ("3", "3", True),
    ("3", "4", False),
    ("x^2+2x+1", "(x+1)^2", True),
])
def test_mathverse_free_form_symbolic(gold, answer, correct):
    record = {"question_type": "free-form", "answer": gold, "question": "Find it."}
    assert scoring.score_mathverse(record, answer_block(answer)) == correct


def test_mathverse_needs_the_answer_block():
    record = {"question_type": "free-form", "answer": "3", "question": "Find it."}
    assert not scoring.score_mathverse(record, "After all that, the answer is 3.")


# ----------------------------------------------------------------------------- MM-Math

@pytest.mark.parametrize("text, span", [
    ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{1} and \\boxed{x^{2}}", "1,x^{2}"),
    ("\\boxed{4}\nCheck: $5$", "4"),                       # \boxed{} wins over the last line
    ("first $1$\nso the answer is $2\\sqrt{3}$", "2\\sqrt{3}"),  # only the last line's $...$
    ("the answer is 4", None),
    ("\\boxed{4", None),                                   # unclosed \boxed{: no answer
])
def test_mmmath_final_answer(text, span):
    assert scoring.mmmath_final_answer(text) == span


@pytest.mark.parametrize("gold, response, correct", [
    ("\\boxed{\\frac{1}{2}}", answer_block("0.5"), True),
    ("\\boxed{\\frac{1}{2}}", answer_block("$\\frac{2}{4}$"), True),
    ("\\boxed{3.14}", "\\boxed{3.149}", True),           # |diff| 0.009 <= 1e-2 * 1.01
    ("\\boxed{3.14}", "\\boxed{3.16}", False),           # |diff| 0.02
    ("\\boxed{50}", "\\boxed{0.5}", True),               # official percent leniency: gold / 100
    ("\\boxed{6cm}", "\\boxed{6}", True),                # units dropped
    ("\\boxed{60^{\\circ}}", "\\boxed{60}", True),       # degree sign dropped
    ("\\boxed{\\pm 2}", "\\boxed{2, -2}", True),         # ± stands for two answers
    ("\\boxed{1}, \\boxed{2}", "\\boxed{2,1}", True),    # parts match in any order
    ("\\boxed{1}, \\boxed{2}", "\\boxed{1}", False),     # part counts must agree
    ("\\boxed{2x+1}", "\\boxed{1+2x}", True),
    ("\\boxed{y=2x+1}", "\\boxed{y=1+2x}", True),
    ("\\boxed{\\sqrt{12}}", "so\nthe side is $2\\sqrt{3}$", True),
    ("\\boxed{(1,2]}", "\\boxed{(1,3]}", False),
    ("\\boxed{4}", "the answer is 4", False),            # no block, no \boxed{}, no $...$
])
def test_score_mmmath(gold, response, correct):
    assert scoring.score_mmmath({"answer": gold}, response) == correct


def test_mmmath_clean_follows_the_official_order():
    assert scoring.mmmath_clean("6\\text{cm}") == "6"
    assert scoring.mmmath_clean("x \\in (1,2)") == "(1,2)"
    assert scoring.mmmath_clean("\\sin30") == "\\sin((30/180)\\pi)"


def test_mmmath_hostile_input_is_time_bounded(monkeypatch):
    monkeypatch.setattr(scoring, "MMMATH_TIME_LIMIT_S", 0.5)
    start = time.monotonic()
    assert not scoring.score_mmmath({"answer": "\\boxed{3}"}, "\\boxed{9^{9^{9^{9}}}}")
    assert not scoring.score_mmmath({"answer": "\\boxed{3}"}, "\\boxed{" + "(" * 5000 + "}")
    assert time.monotonic() - start < 5
