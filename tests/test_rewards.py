"""Tests for rewards.py: a hand-labelled table (tests/data/reward_cases.jsonl), big hostile
inputs built here, the time bound, and the public helpers.

Times are the CPU time of the calling thread (time.thread_time): the checker is single-threaded,
so on an idle core that is its wall time, and it does not count other jobs on a shared machine.
The time limit is a multiple of an ordinary comparison timed on the same machine (ordinary_comparison_s),
so it means the same on a slow core as on a fast one.
"""
import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import rewards
from rewards import extract_answer, format_ok, is_equivalent, reward, zero_reward

TABLE = os.path.join(os.path.dirname(__file__), "data", "reward_cases.jsonl")
CASE_FIELDS = {"why", "answer", "response", "gold", "choices", "type", "precision", "truncated",
               "style", "reward", "expected"}


def ordinary_comparison_s(repeats=5):
    """CPU seconds of one ordinary symbolic comparison, 'y=2x+1' vs '2y=4x+2' (math-verify solves
    both), best of `repeats` with the parse cache cleared: the unit of the time limit."""
    best = float("inf")
    for _ in range(repeats):
        rewards._parse_symbolic.cache_clear()
        start = time.thread_time()
        assert is_equivalent("y=2x+1", "2y=4x+2")
        best = min(best, time.thread_time() - start)
    return best


# Measured on a 2-core AVX2 machine (0.07-0.10 s an ordinary comparison there): the slowest allowed
# answer against a simple gold or itself plus one costs 18-24 ordinary comparisons, one slow part
# against another (the lists test) 23-29; the limit leaves a margin of about 1.5 for a noisy machine.
TIME_LIMIT_S = 40 * ordinary_comparison_s()
LIST_TIME_LIMIT_S = rewards.PARTS_BUDGET_S + TIME_LIMIT_S  # a list may spend its parts budget, then a part


def load_cases(path):
    """Rows of the table; a bad row fails with its file and line."""
    cases = []
    with open(path, encoding="utf-8") as table:
        for line_number, line in enumerate(table, start=1):
            where = f"{path}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not JSON ({error})") from None
            unknown = set(row) - CASE_FIELDS
            if unknown or ("answer" in row) == ("response" in row) or "expected" not in row:
                raise ValueError(f"{where}: needs one of answer/response and expected; unknown {sorted(unknown)}")
            cases.append(pytest.param(row, id=f"{line_number}-{row['why']}"))
    return cases


def score(row):
    """Score one table row with the reward it names, returning (reward, CPU seconds)."""
    response = row.get("response")
    if response is None:  # an answer alone is wrapped in a well-formed response
        response = f"<think>Let me work it out.</think><answer> Final Answer:{row['answer']} </answer>"
    score_fn = zero_reward if row.get("reward") == "zero" else reward
    start = time.thread_time()
    value = score_fn(response, row["gold"], choices=row.get("choices"), answer_type=row.get("type"),
                     truncated=row.get("truncated", False), style=row.get("style", "vision-r1"),
                     precision=row.get("precision"))
    return value, time.thread_time() - start


CASES = load_cases(TABLE)


def test_table_is_large_and_covers_the_answer_types():
    rows = [case.values[0] for case in CASES]
    assert len(rows) >= 150
    for prefix in ["multi-choice", "letter gold", "integer", "float, precision 1", "float, precision 2",
                   "text", "list", "free form", "format", "truncated", "zero", "r1 style", "hostile",
                   "several boxes", "labelled", "set/interval", "chain", "guard", "long decimal"]:
        assert any(row["why"].startswith(prefix) for row in rows), prefix
    assert {row["expected"] for row in rows} == {0, 0.5, 1}


@pytest.mark.parametrize("row", CASES)
def test_table(row):
    value, seconds = score(row)
    assert value == row["expected"]
    assert seconds < TIME_LIMIT_S


# Hostile inputs too big for the table: (why, response, gold, style, expected reward).
def _wrap(answer, think="Let me work it out."):
    return f"<think>{think}</think><answer> Final Answer:{answer} </answer>"


HUGE_NUMBER = "9" * 100_000
HOSTILE = [
    ("100k-digit answer", _wrap(HUGE_NUMBER), "7", "vision-r1", 0.0),
    ("100k-digit answer equal to a 100k-digit gold", _wrap(HUGE_NUMBER), HUGE_NUMBER, "vision-r1", 0.0),
    ("100k-digit number in the thinking, right answer", _wrap("7", think=HUGE_NUMBER), "7", "vision-r1", 1.0),
    ("10k nested braces in the answer", _wrap("{" * 10_000 + "7" + "}" * 10_000), "7", "vision-r1", 0.0),
    ("10k nested braces in the thinking, right answer", _wrap("7", think="{" * 10_000 + "}" * 10_000), "7",
     "vision-r1", 1.0),
    ("10k unbalanced boxed in the answer", _wrap("\\boxed{" * 10_000 + "7"), "7", "vision-r1", 0.0),
    ("10k unbalanced boxed after thinking", "<think>a</think>" + "\\boxed{" * 10_000 + "7", "7", "r1", 0.0),
    ("10k nested boxed, balanced", "<think>a</think>" + "\\boxed{" * 10_000 + "7" + "}" * 10_000, "7", "r1", 0.0),
    ("1000 nested fractions", _wrap("\\frac{" * 1000 + "1" + "}{2}" * 1000), "0", "vision-r1", 0.0),
    ("tower of 1000 exponents", _wrap("2^{" * 1000 + "2" + "}" * 1000), "4", "vision-r1", 0.0),
    ("10k think tags", "<think>" * 10_000 + "</think><answer> Final Answer:7 </answer>", "7", "vision-r1", 0.0),
    ("50k answer tags", "<think>a</think>" + "<answer>" * 50_000 + "7</answer>", "7", "vision-r1", 0.0),
    ("64k of closing tags", "<think>a" + "</think>" * 8_000 + "<answer>7</answer>", "7", "vision-r1", 0.0),
    ("1000 hedges", _wrap(" or ".join(["7"] * 1000)), "7", "vision-r1", 0.0),
    ("undecodable bytes around a right answer",
     _wrap("7", think=b"\xff\xfe\x80".decode("utf-8", "surrogateescape")), "7", "vision-r1", 1.0),
    ("raw bytes with broken UTF-8",
     b"<think>\xff\xfe</think><answer> Final Answer:7 </answer>", "7", "vision-r1", 1.0),
    ("random-looking debris", _wrap("\x00\x1b[31m\ufffd\udcff}{\\\\boxed{$$^_^"), "7", "vision-r1", 0.0),
]


@pytest.mark.parametrize("why, response, gold, style, expected", HOSTILE, ids=[case[0] for case in HOSTILE])
def test_hostile_inputs_are_fast_and_scored(why, response, gold, style, expected):
    for score_fn in (reward, zero_reward):
        start = time.thread_time()
        value = score_fn(response, gold, style=style)
        assert time.thread_time() - start < TIME_LIMIT_S
        if score_fn is reward:
            assert value == expected


# The slowest answers that still pass the symbolic bounds, found by fuzzing random expressions
# built from sums, products, fractions, powers, functions, relations and tuples.
SLOW_BUT_ALLOWED = [
    "(x+y)^3(x-y)^3(2x+y)^3",
    "\\frac{(x+1)^3}{(x-1)^3}+\\frac{1}{(x+y)^3}",
    "\\frac{(x+1)(x+2)(x+3)(x+4)}{(x-1)(x-2)(x-3)(x-4)(y+1)}",
    "(x-1)^2+(y-2)^2=5",
    "(x+1)^3(x+2)^3(x+3)^3=1",
    "\\sqrt{(x+1)^3(x+2)^3(x+3)^3}=y",
    "999999999999999^{99}",
    "(999999999999999, 2^{99})",
    "((2)(\\sin(1))((3)(\\sqrt{2})(3)(2)(999999999999999))(0.5 0.5)(\\cos{1}))((3)^{3})",
    "((\\frac{3}{999999999999999}+0.5)^{-3}\\cdot ((\\pi)(2)(3))^{3}, \\sqrt{2})",
    # sums and linear equations in three variables, which the bounds let through since
    "\\sum_{k=-99}^{99} (k+\\frac{1}{999999999999999})(2k-\\frac{3}{7})(k+99)",
    "\\sum_{k=1}^{n} \\frac{(3k-1)(k+2)(5k+7)}{999999999999999}",
    "\\frac{x}{999999999999999}+\\frac{y}{\\sqrt{3}}+\\frac{z}{7}=\\pi(x+y+z+\\sqrt{2})",
]


def test_lists_and_matrices_of_slow_parts_stay_under_the_limit():
    """Each part is bounded, their number only by the call's parts budget (rewards.PARTS_BUDGET_S)."""
    slow = SLOW_BUT_ALLOWED[:3]
    for count in (2, 5, 16):
        gold = ", ".join(f"({i}, {slow[i % 3]})" for i in range(count))
        pred = ", ".join(f"({i}, {slow[(i + 1) % 3]}+1)" for i in range(count))
        matrix = "\\begin{pmatrix}" + "\\\\".join("&".join(slow[(i + j) % 3] for j in range(4)) for i in range(4))
        for answer, reference in [(pred, gold), (matrix.replace("3", "2") + "\\end{pmatrix}", matrix + "\\end{pmatrix}")]:
            start = time.thread_time()
            assert not is_equivalent(answer, reference)
            assert time.thread_time() - start < LIST_TIME_LIMIT_S, count


@pytest.mark.parametrize("answer", SLOW_BUT_ALLOWED)
def test_worst_allowed_symbolic_answers_stay_under_the_limit(answer):
    assert rewards._symbolic_safe(answer)
    for gold in ["5", "\\sqrt{2}+1", "y=2x+1", "x>2", answer, answer + "+1"]:
        for pred, ref in [(answer, gold), (gold, answer)]:
            start = time.thread_time()
            is_equivalent(pred, ref)
            assert time.thread_time() - start < TIME_LIMIT_S, (pred, ref)


JUNK_TOKENS = ["{", "}", "(", ")", "[", "]", "\\boxed{", "\\frac{", "\\sqrt", "^", "_", "=", "<", ",", " or ",
               "1", "9" * 40, "0.5", "x", "y", "B", "(C)", "\\pi", "\\sin", "\\le", "%", "\u00b0", "\u2212",
               "\udcff", "\x00", "$", "\\text{cm}", "</answer>", " ", "!", "/", "\\\\", "\\left(", "^{}"]


def test_random_junk_never_raises_and_stays_fast():
    """200 random token soups, scored as every answer type: no exception, no slow call."""
    rng = random.Random(0)
    for _ in range(200):
        junk = "".join(rng.choice(JUNK_TOKENS) for _ in range(rng.randint(1, 12)))
        for gold, answer_type in [("1", None), ("0.5", "float"), ("B", "choice"), ("cm", "text"), ([1, 2], "list"),
                                  ("x^2+1", None), ("x=1", None)]:
            start = time.thread_time()
            is_equivalent(junk, gold, choices=["1", "x"] if answer_type == "choice" else None,
                          answer_type=answer_type, precision=1 if answer_type == "float" else None)
            reward(_wrap(junk), gold, answer_type=answer_type)
            assert time.thread_time() - start < TIME_LIMIT_S, junk


@pytest.mark.parametrize("answer, safe", [
    ("2\\sqrt{3}", True), ("y=-\\frac{1}{2}x^{2}+2x+6", True), ("(x-1)^2+(y-2)^2=5", True), ("2^{10}", True),
    ("(-\\infty, -\\frac{1}{2})\\cup(3, +\\infty)", True),
    ("2^{2^{9}}", False), ("9^{999}", False), ("x^{10}", False), ("x^4", False), ("((x+1)^2)^2", False),
    ("(x+y+z)^2", False),
    ("100!", False), ("\\int_0^1 x dx", False), ("y=\\sin x", False),
    ("\\frac{\\frac{\\frac{\\frac{\\frac{1}{2}}{2}}{2}}{2}}{2}", False),
    ("1234567890123456", False), ("x" * 81, False), ("\u03c0", False), ("x^{}", False),
    ("\\sum_{k=1}^{10} k", True), ("\\sum_{k=1}^{n} k^2", True),  ("\\sum_{k=1}^{100} k", False),
    ("\\sum_{k=1}^{10} kx", False),  ("\\sum_{k=1}^{9} k+\\sum_{k=1}^{9} k", False), ("\\sum_{k=1}^{9} k=45", False),
    ("x+y+z=6", True), ("\\frac{x}{6}+\\frac{y}{3}+\\frac{z}{2}=1", True), ("x^2+y+z=6", False), ("x+y+z", False),
    ("a+b+c+d=1", False),
])
def test_symbolic_gate(answer, safe):
    assert rewards._symbolic_safe(answer) == safe


def test_generated_correct_forms_are_accepted_and_near_misses_refused():
    """check_scoring.py's generated answers of each kind the reward used to refuse (several boxes,
    labels, sets and inequalities, chains, forms past the old bounds, long decimals): every right
    form is accepted, every near miss refused, and nothing math-verify's default verdict accepts
    among the right forms is refused."""
    import math_verify

    import check_scoring
    rows = check_scoring.reward_cases(per_kind=3, seed=1)
    assert {kind for kind, *_ in rows} == set(check_scoring.REWARD_KINDS)
    verdicts = [(kind, gold, answer, right, reward(_wrap(answer), gold) == 1.0) for kind, gold, answer, right in rows]
    assert [row[:3] for row in verdicts if row[3] != row[4]] == []
    reference = [math_verify.verify(math_verify.parse(f"${gold}$"), math_verify.parse(f"${answer}$"))
                 for _, gold, answer, right, _ in verdicts if right]
    assert sum(reference) > 0.6 * len(reference)  # the oracle agrees these forms are right


def test_reward_from_worker_threads_matches_main_thread():
    """math-verify's own timeouts use signals, which fail off the main thread; ours do not."""
    cases = [(_wrap("\\frac{\\sqrt{6}}{2}"), "\\sqrt{6}/2", None), (_wrap("y = 1 + 3x"), "y=3x+1", None),
             (_wrap("B"), "15", ["10", "15"])]

    def score_case(case):
        text, gold, choices = case
        return reward(text, gold, choices=choices)

    with ThreadPoolExecutor(max_workers=2) as pool:  # threads first, before any result is cached
        in_threads = list(pool.map(score_case, cases))
    assert in_threads == [score_case(case) for case in cases] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("text, style, answer", [
    ("<think>a</think><answer> Final Answer:B </answer>", "vision-r1", "B"),
    ("<think>a</think><answer>  12 cm </answer>", "vision-r1", "12 cm"),
    ("<think>a</think><answer> Final Answer:\\boxed{\\frac{1}{2}} </answer>", "vision-r1", "\\frac{1}{2}"),
    ("<answer> Final Answer:A </answer> then <answer> Final Answer:B </answer>", "vision-r1", "A"),
    ("<think>no closing answer</think><answer> Final Answer:B", "vision-r1", None),
    ("<think>a</think><answer> Final Answer: </answer>", "vision-r1", None),
    ("<think>a</think><answer> Final Answer:\\boxed{} </answer>", "vision-r1", None),
    ("<think>a</think><answer> Final Answer:\\boxed{7 </answer>", "vision-r1", "\\boxed{7"),
    ("<think>\\boxed{1}</think> so \\boxed{2} and \\boxed{3}", "r1", "3"),
    ("<think>\\boxed{1}</think> no box here", "r1", None),
    ("\\boxed{\\boxed{4}}", "r1", "\\boxed{4}"),
    (None, "vision-r1", None),
    # several boxes in the answer block: every value, in order (the r1 style keeps the last box)
    ("<think>a</think><answer> Final Answer:\\boxed{1},\\boxed{2},\\boxed{3} </answer>", "vision-r1", "1, 2, 3"),
    ("<think>a</think><answer> Final Answer:\\boxed{(2, 2)} \\text{ and } \\boxed{(6, 2)} </answer>", "vision-r1",
     "(2, 2), (6, 2)"),
    ("<think>a</think><answer> Final Answer:x=\\boxed{\\boxed{4}}, \\boxed{} </answer>", "vision-r1", "\\boxed{4}"),
])
def test_extract_answer(text, style, answer):
    assert extract_answer(text, style) == answer


def test_format_ok_examples_from_the_docstring():
    assert format_ok("<think>3+4</think><answer> Final Answer:7 </answer>")
    assert not format_ok("<think>3+4</think><answer> Final Answer:7 </answer> extra")
    assert format_ok("<think>a</think> \\boxed{7}", style="r1")
    assert not format_ok("<think>a</think> \\boxed{ }", style="r1")


def test_equivalence_examples_from_the_docstring():
    assert is_equivalent("(B)", "15", ["10", "15"])
    assert is_equivalent("1,000", "1000")
    assert not is_equivalent("A or B", "A")
    assert is_equivalent("YES", "yes")
    assert is_equivalent("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2")
    assert not is_equivalent(None, "7")
    assert not is_equivalent("7", None)


@pytest.mark.parametrize("answer, value", [
    ("1,000", 1000), ("-3.50 cm", -3.5), ("3/4", 0.75), ("\\frac{3}{4}", 0.75), ("x = 45^\\circ", 45),
    ("25%", 25), ("-\\frac34", -0.75), ("15cm", 15), ("2x", None), ("2 or 3", None), ("5^2", None),
    ("1" * 31, None), ("1/0", None),
])
def test_parse_number(answer, value):
    assert rewards.parse_number(answer) == value


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="answer_type"):
        is_equivalent("1", "1", answer_type="number")
    with pytest.raises(ValueError, match="style"):
        reward("<think></think><answer>1</answer>", "1", style="r2")


def test_r1_zero_system_prompt_asks_for_the_vision_r1_tags():
    prompt = rewards.R1_ZERO_SYSTEM_PROMPT
    assert "<think> </think> and <answer> </answer>" in prompt
    assert "Final Answer:" in prompt
