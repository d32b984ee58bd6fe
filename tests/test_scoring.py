"""Benchmark scoring: MathVista parity with published official verdicts, every MathVista
normalisation branch, MathVerse and MM-Math rules."""

import gzip
import json
import time
from pathlib import Path

import pytest
import sympy
from sympy.parsing.latex.errors import LaTeXParsingError

import check_scoring
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
    ("C", False), ("40°", False), ("35°", False), ("B. 40°", False),
    ("A or B", False), ("B or C", False), ("B, C", False),   # hedges name more than the gold
])
def test_mathverse_multi_choice(answer, correct):
    assert scoring.score_mathverse(MATHVERSE_CHOICE, answer_block(answer)) == correct


def test_mathverse_options_parse():
    options = scoring.mathverse_options(MATHVERSE_CHOICE["question"])
    assert options == {"A": "25°", "B": "30°", "C": "40°", "D": "50°"}
    assert scoring.mathverse_options("What is x?") == {}
    # "Choice:" and "A." labels, an empty option line that must not swallow the next
    assert scoring.mathverse_options("Bearing?\nChoice:\nA. 090^\\circ T\nB. 180^\\circ T") == {
        "A": "090^\\circ T", "B": "180^\\circ T"}
    assert scoring.mathverse_options("Which?\nChoices:\nA:x\nB:\nC:y") == {"A": "x", "B": "", "C": "y"}


# Multiple-choice golds of the real testmini that are not a bare letter (questions shortened).
@pytest.mark.parametrize("question, gold, right, wrong", [
    ("How would you describe the rate?\nChoices:\nA.constant\nB.decreasing\nC.increasing",
     "(C)", ["(C)", "C", "C.increasing", "increasing"], ["A", "(B)", "B or C"]),
    ("Which two are OPPOSITE of $\\tan (\\theta)$ ?\nChoose 2 answers:\nChoices:\nA:$\\tan (\\pi+\\theta)$\n"
     "B:$\\tan (\\frac{\\pi}{2}-\\theta)$\nC:$\\tan (2 \\pi-\\theta)$\nD:$\\tan (\\pi-\\theta)$",
     "C\nD", ["C\nD", "C, D", "D, C", "C and D"], ["C", "D", "C, D, A", "C or D", "A, D"]),
    ("True or False : The quickest way is through the playground.\nChoice:\nA. False\nB. True",
     "False", ["False", "A", "(A) False"], ["True", "B", "false or true"]),
    ("Find the true bearing of point B from point A.\nChoice:\nA. 090^\\circ T\nB. 180^\\circ T\n"
     "C. 049^\\circ T\nD. 041^\\circ T", "090^\\circ T", ["090^\\circ T", "A", "A. 090^\\circ T"],
     ["B", "180^\\circ T", "049^\\circ T"]),
])
def test_mathverse_golds_that_are_not_a_letter(question, gold, right, wrong):
    record = {"question_type": "multi-choice", "answer": gold, "question": question}
    assert [scoring.score_mathverse(record, answer_block(a)) for a in right] == [True] * len(right)
    assert [scoring.score_mathverse(record, answer_block(a)) for a in wrong] == [False] * len(wrong)


def test_mathverse_every_testmini_gold_given_verbatim_is_correct():
    """The official rule-based match (answer == extraction) on the real text-only testmini."""
    records = check_scoring.mathverse_records()
    assert len(records) == 788
    assert [r["sample_index"] for r in records if not scoring.score_mathverse(r, answer_block(r["answer"]))] == []


@pytest.mark.parametrize("gold, answer, correct", [
    ("\\frac{1}{2}", "0.5", True),
    ("2\\sqrt{3}", "\\sqrt{12}", True),
    ("3", "3", True),
    ("3", "4", False),
    ("x^2+2x+1", "(x+1)^2", True),
    ("Area $=113.1 \\mathrm{~cm}^{2}$", "Area $=113.1 \\mathrm{~cm}^{2}$", True),  # verbatim
    ("777 ", "777", True),
])
def test_mathverse_free_form(gold, answer, correct):
    record = {"question_type": "free-form", "answer": gold, "question": "Find it."}
    assert scoring.score_mathverse(record, answer_block(answer)) == correct


def test_mathverse_needs_the_answer_block():
    record = {"question_type": "free-form", "answer": "3", "question": "Find it."}
    assert not scoring.score_mathverse(record, "After all that, the answer is 3.")


# ----------------------------------------------------------------------------- MM-Math

def official_mmmath(pairs):
    """The official verdicts (tests/official/mmmath_eval.py, MM-Math's eval.py unchanged) of
    (gold solution, response) pairs, the response read as Vision-R1's evaluation reads it."""
    return check_scoring.official_verdicts(pairs, parse_latex=scoring.parse_latex)


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


@pytest.mark.parametrize("response, prediction", [
    ("<think>a</think><answer> Final Answer:2.5 </answer>", "2.5"),
    ("<think>a</think><answer> Final Answer: \\boxed{2.5}  </answer>", "\\boxed{2.5}"),
    ("<answer> Final Answer:1 </answer><answer> Final Answer:2 </answer>", "1"),   # the first block
    ("<think>a</think><answer>Final Answer: 2.5</answer>", "<think>a</think><answer>Final Answer: 2.5</answer>"),
    ("<answer> final answer:2.5 </answer>", "<answer> final answer:2.5 </answer>"),
    ("<answer> 2.5 </answer>", "<answer> 2.5 </answer>"),
    ("so \\boxed{2.5}", "so \\boxed{2.5}"),
])
def test_vision_r1_prediction_reads_only_its_exact_block(response, prediction):
    assert scoring.vision_r1_prediction(response) == prediction


# (gold solution, response, official verdict): one row per class where the official judge's rules,
# quirks or parser decide, each checked against the official code itself below.
MMMATH_CASES = [
    # several boxes: all are joined, in any order
    ("\\boxed{1}, \\boxed{3}", answer_block("\\boxed{1}, \\boxed{3}"), True),
    ("\\boxed{1}, \\boxed{3}", answer_block("3, 1"), True),
    ("\\boxed{1,3}", "so \\boxed{3} or \\boxed{1}", True),
    ("\\boxed{1}, \\boxed{3}", answer_block("\\boxed{3}"), False),
    # the trailing comma after a box stops the unit rule; "cm" goes everywhere
    ("\\boxed{10m}", answer_block("10m"), False),
    ("\\boxed{10m}", answer_block("\\boxed{10m}"), True),
    ("\\boxed{10}", answer_block("10m"), True),
    ("\\boxed{6cm}", answer_block("6"), True),
    ("\\boxed{60^{\\circ}}", answer_block("60"), True),
    ("\\boxed{60^{\\circ}}", answer_block("60°"), False),               # ° is not cleaned
    # the parser's readings
    ("\\boxed{\\frac{3}{2}}", answer_block("1\\frac{1}{2}"), False),   # a mixed number is a product
    ("\\boxed{-3}", answer_block("\u22123"), False),                   # a Unicode minus does not parse
    ("\\boxed{2\\pi}", answer_block("2\u03c0"), False),
    ("\\boxed{2\\pi}", answer_block("6.28"), True),                    # \pi as a float, within 1e-2
    ("\\boxed{x \\neq 1}", answer_block("x \\ne 1"), False),
    ("\\boxed{\\frac{1}{2}}", answer_block("\\dfrac{1}{2}"), True),
    # tolerance and percent leniency
    ("\\boxed{3.14}", answer_block("3.149"), True),
    ("\\boxed{3.14}", answer_block("3.16"), False),
    ("\\boxed{50}", answer_block("0.5"), True),
    ("\\boxed{\\sqrt{3}}", answer_block("1.73"), True),
    # \pm, intervals, chains, equations
    ("\\boxed{\\pm 2}", answer_block("2, -2"), True),
    ("\\boxed{-1<x<3}", answer_block("(-1,3)"), True),
    ("\\boxed{(1,2)\\cup(3,4)}", answer_block("(1,2) \\cup (3,4)"), False),  # pieces are not stripped
    ("\\boxed{(1,2]}", answer_block("(1,3]"), False),
    ("\\boxed{y=2x+1}", answer_block("y=1+2x"), True),
    ("\\boxed{y=2x+1}", answer_block("2y=4x+2"), True),
    ("\\boxed{y=2x+1}", answer_block("2x+1"), True),
    ("\\boxed{是}", answer_block("是"), True),
    ("\\boxed{是}", answer_block("否"), False),
    # answer blocks the official regex cannot read: the whole response is judged
    ("\\boxed{2.5}", "<think>a</think><answer>Final Answer: 2.5</answer>", False),
    ("\\boxed{2.5}", "<think>a</think><answer> final answer:2.5 </answer>", False),
    ("\\boxed{2.5}", "<think>a</think><answer> 2.5 </answer>", False),
    ("\\boxed{2.5}", "<think>\\boxed{7}</think><answer> 2.5 </answer>", False),
    ("\\boxed{2.5}", "It rises 1 over a run of 2.\nSo it is $2.5$", True),   # the last line's $...$
    ("\\boxed{4}", "the answer is 4", False),
    ("\\boxed{4}", "\\boxed{4", False),                                      # unclosed \boxed{
]


@pytest.mark.parametrize("gold, response, verdict", MMMATH_CASES)
def test_score_mmmath(gold, response, verdict):
    assert scoring.score_mmmath({"answer": gold}, response) == verdict


def test_mmmath_cases_are_the_official_verdicts():
    assert official_mmmath([(gold, response) for gold, response, _ in MMMATH_CASES]) == [
        verdict for _, _, verdict in MMMATH_CASES]


def test_mmmath_agrees_with_the_official_judge_on_generated_pairs():
    rows = check_scoring.mmmath_pairs(150, seed=1)
    pairs = [(gold, response) for gold, response, *_ in rows]
    official = official_mmmath(pairs)
    assert [scoring.score_mmmath({"answer": gold}, response) for gold, response in pairs] == official
    assert 0.2 < sum(official) / len(official) < 0.8  # both verdicts well represented


def test_parse_latex_is_sympys_antlr_parser():
    x = sympy.Symbol("x")
    assert scoring.parse_latex("1\\frac{1}{2}").doit() == sympy.Rational(1, 2)  # a product, not 3/2
    assert str(scoring.parse_latex("9^{9^{9}}")) == "9**(9**9)"  # nothing evaluated
    assert scoring.parse_latex("y = 2x") == sympy.Eq(sympy.Symbol("y"), 2 * x)
    assert scoring.parse_latex("\\pi") == sympy.Symbol("pi")
    with pytest.raises(LaTeXParsingError):
        scoring.parse_latex("2\u03c0")


def test_mmmath_clean_follows_the_official_order():
    assert scoring.mmmath_clean("6\\text{cm}") == "6"
    assert scoring.mmmath_clean("x \\in (1,2)") == "(1,2)"
    assert scoring.mmmath_clean("\\sin30") == "\\sin((30/180)\\pi)"
    assert scoring.mmmath_clean("10m,") == "10m"


def test_mmmath_hostile_input_is_time_bounded(monkeypatch):
    monkeypatch.setattr(scoring, "MMMATH_TIME_LIMIT_S", 0.5)
    start = time.monotonic()
    for hostile in ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{9^{9^{9^{9}}}\\pi}", "\\boxed{(x+1)^{100000}}",
                    "\\boxed{" + "(" * 5000 + "}", "\\boxed{" * 3000, "\\boxed{" + "+".join(["x"] * 3000) + "}"]:
        for gold in ["\\boxed{3}", "\\boxed{x}"]:
            assert not scoring.score_mmmath({"answer": gold}, hostile)
    assert time.monotonic() - start < 12
