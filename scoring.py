"""Benchmark scoring rules for MathVista, MathVerse and MM-Math, as pure functions.

Each benchmark is scored the way its own evaluation code scores it, with the GPT steps
replaced by rules (docs/method.md §4):

- MathVista (lupantech/MathVista, evaluation/calculate_score.py): the extraction is
  normalised to the answer type (option letter -> option text, nearest option by edit
  distance, int / float-with-precision casts, list -> str) and compared to the gold
  answer string with ==. `score_mathvista` reproduces `normalize_extracted_answer` +
  `safe_equal` exactly; the extraction comes from `extract_mathvista_answer` (the
  `<answer>` block, else the official quick-extract rules; no GPT call).
- MathVerse: the official GPT extraction + GPT 0/1 judgement is replaced by the
  `<answer>` block and rule checks: option letter or option text for multiple choice,
  symbolic equivalence (rewards.is_equivalent) for free form.
- MM-Math (kge-sun/MM-Math, eval.py, AutoScoringJudge): every `\\boxed{}` (else the
  `$...$` spans of the last line), the official unit and symbol clean-up, order-free
  matching of comma-separated parts, numeric equality within 1e-2 (absolute, x1.01,
  also accepting the gold /100 or x100), else sympy equivalence.

The stricter reward of rewards.py (hedged answers score 0) is the training signal;
these functions are the benchmarks' own rules.
"""

import re
import signal
from contextlib import contextmanager

import sympy
from latex2sympy2_extended import latex2sympy

import rewards

# Abbreviations of the official MathVista breakdown (metadata "task" and "skills").
MATHVISTA_TASKS = {
    "FQA": "figure question answering",
    "GPS": "geometry problem solving",
    "MWP": "math word problem",
    "TQA": "textbook question answering",
    "VQA": "visual question answering",
}
MATHVISTA_SKILLS = {
    "ALG": "algebraic reasoning",
    "ARI": "arithmetic reasoning",
    "GEO": "geometry reasoning",
    "LOG": "logical reasoning",
    "NUM": "numeric commonsense",
    "SCI": "scientific reasoning",
    "STA": "statistical reasoning",
}


# ----------------------------------------------------------------------------- MathVista

def edit_distance(a, b):
    """Levenshtein distance over code points (python-Levenshtein's `distance`).

    edit_distance("kitten", "sitting") == 3
    """
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def nearest_choice(prediction, choices):
    """Official `get_most_similar`: the choice at the smallest edit distance, first one on ties.

    nearest_choice("E", ["97", "102", "107", "122"]) == "97"   (distances 2, 3, 3, 3)
    """
    distances = [edit_distance(prediction, choice) for choice in choices]
    return choices[distances.index(min(distances))]


def normalize_mathvista_extraction(extraction, record, ignore_empty_extractions=False):
    """Official `normalize_extracted_answer`: the extraction in the form of the gold answer.

    multi_choice: "(C) 5" -> letter C -> choices[2]; a letter within the options -> that
    option's text; anything else -> the nearest option by edit distance (so even an empty
    extraction picks an option, unless ignore_empty_extractions, the official flag).
    integer: str(int(float(x))), so "3.7" -> "3"; float: str(round(float(x), precision)),
    so "1.26" -> "1.3"; list: str(x). Failed casts give None, which equals no answer.
    free_form text is returned unchanged (the current official code leaves that branch
    unassigned; no testmini record takes it, and the earlier version returned it as is).
    """
    choices = record["choices"]
    if record["question_type"] == "multi_choice":
        if not choices:
            raise ValueError(f"MathVista pid {record.get('pid')}: multi_choice record without choices")
        extraction = extraction.strip() if isinstance(extraction, str) else str(extraction)
        if ignore_empty_extractions and not extraction:
            return None
        letters = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letters:
            extraction = letters[0].upper()
        option_letters = [chr(ord("A") + i) for i in range(len(choices))]
        if extraction in option_letters:
            return choices[option_letters.index(extraction)]
        return nearest_choice(extraction, choices)
    try:
        if record["answer_type"] == "integer":
            return str(int(float(extraction)))
        if record["answer_type"] == "float":
            return str(round(float(extraction), int(record["precision"])))
    except (TypeError, ValueError, OverflowError):
        return None
    if record["answer_type"] == "list":
        return str(extraction)
    return extraction


def score_mathvista(record, extraction, ignore_empty_extractions=False):
    """Official verdict: normalised extraction == gold answer string (`safe_equal`).

    record as in MathVista's testmini.json (question_type, answer_type, precision,
    choices, answer). score_mathvista({"question_type": "free_form", "answer_type":
    "float", "precision": 1, "choices": None, "answer": "1.2"}, "1.24") is True.
    """
    prediction = normalize_mathvista_extraction(extraction, record, ignore_empty_extractions)
    return prediction == record["answer"]


def extract_mathvista_answer(response, record):
    """The rule-based part of the official `extract_answer`, without its GPT fallback.

    The `<answer> Final Answer:X </answer>` block, when present, is the extraction (X).
    Otherwise the official quick rules run on the whole response: an exact option text,
    an int / float literal, or `The answer is "X".`; where the official pipeline would ask
    GPT, "" is returned (no extraction; see normalize_mathvista_extraction for what ""
    becomes on a multiple-choice question).
    """
    block = rewards.extract_answer(response)
    if block is not None:
        return block
    if response == "":
        return ""
    if record["question_type"] == "multi_choice" and response in record["choices"]:
        return response
    try:
        if record["answer_type"] == "integer":
            return str(int(response))
        if record["answer_type"] == "float":
            return str(float(response))
    except ValueError:
        pass
    quoted = re.search(r'The answer is "(.*)"\.', response)
    return quoted.group(1) if quoted else ""


# ----------------------------------------------------------------------------- MathVerse

def mathverse_options(question):
    """Option letter -> option text, from the "Choices:" lines of a MathVerse question.

    mathverse_options("Find x.\\nChoices:\\nA:30\\nB:60") == {"A": "30", "B": "60"}
    """
    listing = question.split("Choices:", 1)[-1] if "Choices:" in question else ""
    return dict(re.findall(r"^\s*([A-Z])\s*[:.：]\s*(.*?)\s*$", listing, flags=re.MULTILINE))


def mathverse_choice_letter(answer, question):
    """The option an answer names: a leading letter ("B", "(B) 30°", "B. 30°") or an
    option's text (by rewards.is_equivalent); None when it names none."""
    letter = re.match(r"^\s*\(?([A-Z])\)?(?=$|[\s.:：,)])", answer)
    if letter:
        return letter.group(1)
    for option_letter, text in mathverse_options(question).items():
        if rewards.is_equivalent(answer, text):
            return option_letter
    return None


def score_mathverse(record, response):
    """MathVerse verdict from the `<answer>` block (no block scores 0).

    multi-choice: the named option equals the gold letter; free-form: the answer is
    symbolically equivalent to the gold answer (rewards.is_equivalent), standing in for
    the official GPT extraction and GPT consistency judgement.
    """
    answer = rewards.extract_answer(response)
    if answer is None:
        return False
    gold = record["answer"].strip()
    if record["question_type"] == "multi-choice":
        return mathverse_choice_letter(answer, record["question"]) == gold
    return rewards.is_equivalent(answer, gold)


# ----------------------------------------------------------------------------- MM-Math

MMMATH_TOLERANCE = 1e-2  # eval.py --precision default; compared absolutely, times 1.01
MMMATH_TIME_LIMIT_S = 5  # per response: sympy on hostile input must not stall evaluation
MMMATH_MAX_PART_CHARS = 300  # longer parts are compared as strings only, never parsed

# eval.py's clean-up, applied in this order (the order matters: "cm" also eats "cm^{2}").
_MMMATH_UNITS = ("\\text{cm}^2", "\\text{cm}", "\\,cm", "\\text{ cm}", "cm", "\\text{分米}^2", "cm^{2}",
                 "60 \\text{ cm}^2", "\\ \\text{m}", "\\text{米}")
_MMMATH_SYMBOLS = {"\\left": "", "\\right": "", "厘米": "", "，": ",", "$": "", "（": "(", "）": ")",
                   "\\infty": "oo", "\\colon ": ":", "＋": "+", "\\, ": "", "\\,": "", "^\\circ": "",
                   "^{\\circ}": ""}


class _OutOfTime(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` (ours or
    sympy's) swallows it."""


@contextmanager
def _time_limit(seconds):
    """Interrupt the block after `seconds` (SIGALRM: main thread only)."""
    def interrupt(signum, frame):
        raise _OutOfTime()

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def mmmath_final_answer(text):
    """Official answer span: every \\boxed{...} joined by ",", else the $...$ spans of the
    last line joined by ","; None when there is neither or a \\boxed{ is never closed.

    mmmath_final_answer("so \\\\boxed{\\\\frac{1}{2}}") == "\\\\frac{1}{2}"
    """
    parts = []
    for match in re.finditer(r"\\boxed{", text):
        depth, end = 1, match.end()
        while depth and end < len(text):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        if depth:
            return None
        parts.append(text[match.end():end - 1])
    if not parts:
        parts = re.findall(r"\$(.*?)\$", text.strip().split("\n")[-1])
    return ",".join(parts) if parts else None


def mmmath_clean(answer):
    """eval.py `sepcial_symbol_replace`: drop units, degree signs and LaTeX spacing.

    mmmath_clean("6\\\\text{cm}") == "6"; mmmath_clean("60^{\\\\circ}") == "60"
    """
    for unit in _MMMATH_UNITS:
        answer = answer.replace(unit, "")
    answer = re.sub(r"(.+)m$", r"\1", answer.strip())
    if "\\in " in answer:
        answer = answer.split("\\in ")[1]
    for symbol, replacement in _MMMATH_SYMBOLS.items():
        answer = answer.replace(symbol, replacement)
    answer = re.sub(r"(\\sin|\\cos|\\tan)(\d+)", r"\1((\2/180)\\pi)", answer)
    answer = answer.strip("\n,.:;^_=+`!@#%^&*~，。")
    return re.sub(r"\\(?:mathrm|mathbf)\{~?([^}]*)\}", r"\1", answer)


def _split_top_level(answer):
    """Split at commas outside brackets: "(1,2), 3" -> ["(1,2)", "3"]."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(answer):
        depth += (char in "([") - (char in ")]")
        if char == "," and depth == 0:
            parts.append(answer[start:i].strip())
            start = i + 1
    if start < len(answer):
        parts.append(answer[start:].strip())
    return parts


def _expand_plus_minus(parts):
    """"\\pm 2" stands for two answers, "+ 2" and "- 2"."""
    expanded = []
    for part in parts:
        expanded += [part.replace("\\pm", "+"), part.replace("\\pm", "-")] if "\\pm" in part else [part]
    return expanded


def _numbers_equal(gold, answer):
    """eval.py `numerical_equal`: floats within the tolerance, also gold/100 or gold*100."""
    reference, value = float(gold), float(answer)
    targets = (reference / 100, reference, reference * 100)
    return any(abs(target - value) <= MMMATH_TOLERANCE * 1.01 for target in targets)


def _expressions_equal(gold, answer):
    """eval.py `expression_equal` on the right of any "=": identical sympy forms, or both
    constant and within the tolerance, or a symbolic difference below 1e-3."""
    gold_expr = latex2sympy(gold.split("=")[1] if "=" in gold else gold)
    answer_expr = latex2sympy(answer.split("=")[1] if "=" in answer else answer)
    if gold_expr == answer_expr:
        return True
    numeric_pi = sympy.Float(sympy.pi)
    gold_expr, answer_expr = gold_expr.subs(sympy.pi, numeric_pi), answer_expr.subs(sympy.pi, numeric_pi)
    gold_free, answer_free = bool(gold_expr.free_symbols), bool(answer_expr.free_symbols)
    if gold_free != answer_free:
        return False
    if not gold_free:
        return bool(abs(gold_expr.evalf() - answer_expr.evalf()) <= MMMATH_TOLERANCE * 1.01)
    return bool(abs(sympy.simplify(gold_expr - answer_expr).evalf()) < 1e-3)


def _equations_equal(gold, answer):
    """eval.py `equation_equal`: (lhs - rhs) of one is a non-zero integer multiple of the other's."""
    def difference(equation):
        lhs, rhs = equation.split("=")
        return sympy.simplify(latex2sympy(lhs) - latex2sympy(rhs))

    gold_diff, answer_diff = difference(gold), difference(answer)
    ratios = (sympy.simplify(gold_diff / answer_diff), sympy.simplify(answer_diff / gold_diff))
    return any(ratio.is_Integer and ratio != 0 for ratio in ratios)


def _intervals_equal(gold, answer):
    """eval.py `interval_equal`: same brackets and equal endpoints, union by union."""
    gold_pieces, answer_pieces = gold.split("\\cup"), answer.split("\\cup")
    if len(gold_pieces) != len(answer_pieces):
        return False
    for gold_piece, answer_piece in zip(gold_pieces, answer_pieces):
        gold_piece, answer_piece = gold_piece.strip(), answer_piece.strip()
        if (gold_piece[0], gold_piece[-1]) != (answer_piece[0], answer_piece[-1]):
            return False
        ends = zip(gold_piece.strip("[]()").split(","), answer_piece.strip("[]()").split(","))
        if not all(_expressions_equal(g, a) for g, a in ends):
            return False
    return True


def _is_interval(part):
    return part.startswith(("(", "[")) and part.endswith((")", "]"))


def _mmmath_parts_equal(gold, answer):
    """eval.py `is_equal` for one comma-separated part: exact, interval, number,
    expression, equation; a check that cannot parse its input says no, as in eval.py."""
    if gold == answer and gold != "":
        return True
    if max(len(gold), len(answer)) > MMMATH_MAX_PART_CHARS:
        return False
    if _is_interval(gold) and _is_interval(answer):
        try:
            if _intervals_equal(gold, answer):
                return True
        except Exception:  # eval.py gives up on the pair when interval parsing fails
            return False
    both_equations = "=" in gold and "=" in answer
    checks = [_numbers_equal, _equations_equal] if both_equations else [_numbers_equal, _expressions_equal]
    for check in checks:
        try:
            if check(gold, answer):
                return True
        except Exception:  # sympy / float raise on text they cannot read: not equal
            continue
    return False


def _chain_to_interval(answer):
    """"a<x<b" is the interval "(a, b)" (eval.py `trans_greater_sign_to_interval`)."""
    if answer.count("<") != 2:
        return answer
    pieces = answer.split("<")
    return f"({pieces[0]}, {pieces[-1]})"


def mmmath_answers_equal(gold, answer):
    """eval.py `judge` on two cleaned answer spans: the comma-separated parts (with "\\pm"
    expanded) must pair up one to one, in any order (each gold part takes the first
    unpaired part equal to it).

    mmmath_answers_equal("1,\\\\frac{1}{2}", "0.5, 1") is True.
    """
    if gold == answer:
        return True
    # Chinese words are dropped unless they are the whole answer (yes / no answers).
    chinese = r"[\u4e00-\u9fff]+"
    gold = gold if re.fullmatch(chinese, gold) else re.sub(chinese, "", gold)
    answer = answer if re.fullmatch(chinese, answer) else re.sub(chinese, "", answer)
    gold_parts = _expand_plus_minus(_split_top_level(_chain_to_interval(gold)))
    answer_parts = _expand_plus_minus(_split_top_level(_chain_to_interval(answer)))
    if len(gold_parts) != len(answer_parts):
        return False
    for gold_part in gold_parts:
        match = next((part for part in answer_parts if _mmmath_parts_equal(gold_part, part)), None)
        if match is None:
            return False
        answer_parts.remove(match)
    return True


def score_mmmath(record, response):
    """MM-Math verdict: the `<answer>` block, else the official answer span of the response
    (\\boxed{} or the last line's $...$), against the gold solution's span.

    record["answer"] is the gold solution (its \\boxed{} part is taken) or a bare answer.
    Work on one response is capped at MMMATH_TIME_LIMIT_S (SIGALRM, so call it from the
    main thread); running out of time scores 0.
    """
    answer = rewards.extract_answer(response)
    if answer is None:
        answer = mmmath_final_answer(response)
        if answer is None:
            return False
    gold = mmmath_final_answer(record["answer"]) or record["answer"]
    answer = mmmath_final_answer(answer) or answer
    try:
        with _time_limit(MMMATH_TIME_LIMIT_S):
            return mmmath_answers_equal(mmmath_clean(gold), mmmath_clean(answer))
    except _OutOfTime:
        return False
