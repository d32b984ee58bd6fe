"""Benchmark scoring rules for MathVista, MathVerse, MM-Math and the general benchmarks of the
LlamaV-CI table (MMStar, ChartQA, MME, HallusionBench), as pure functions.

Each benchmark is scored the way its own evaluation code scores it, with the GPT steps
replaced by rules (docs/method.md §4):

- MathVista (lupantech/MathVista, evaluation/calculate_score.py): the extraction is
  normalised to the answer type (option letter -> option text, nearest option by edit
  distance, int / float-with-precision casts, list -> str) and compared to the gold
  answer string with ==. `score_mathvista` reproduces `normalize_extracted_answer` +
  `safe_equal` exactly; the extraction comes from `extract_mathvista_answer` (the
  `<answer>` block, else the official quick-extract rules; no GPT call).
- MathVerse: the `<answer>` block; an answer equal to the gold answer is correct (the official
  scorer's rule-based match, score_answer_s2.py --quick_match); otherwise rules stand in for its
  GPT judgement: the options an answer names for multiple choice, symbolic equivalence
  (rewards.is_equivalent) for free form.
- MM-Math (kge-sun/MM-Math, eval.py, AutoScoringJudge.judge at precision 1e-2, as VLMEvalKit
  calls it): on what Vision-R1's evaluation reads (`<answer> Final Answer:(.*?) </answer>`, else
  the whole response), every official rule and quirk, with sympy's ANTLR LaTeX parser
  (check_scoring.py measures the agreement with eval.py itself).
- MMStar: VLMEvalKit's exact matching (vlmeval/utils/matching_util.py `can_infer`); ChartQA:
  relaxed accuracy (pix2struct `relaxed_correctness`); MME: eval_tool/calculation.py
  (`parse_pred_ans`, acc + acc+ per subtask); HallusionBench: its utils.py aAcc / fAcc / qAcc,
  answers read by VLMEvalKit's `YOrN_Extraction` where the official pipeline asks GPT-4.

The stricter reward of rewards.py (hedged answers score 0) is the training signal;
these functions are the benchmarks' own rules.
"""

import math
import re
import signal
from collections import defaultdict
from contextlib import contextmanager

import antlr4
import sympy
from sympy.parsing.latex._antlr.latexlexer import LaTeXLexer
from sympy.parsing.latex._antlr.latexparser import LaTeXParser
from sympy.parsing.latex._parse_latex_antlr import MathErrorListener, convert_relation

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

_MATHVERSE_OPTION = re.compile(r"^[ \t]*([A-Z])[ \t]*[:.：][ \t]*(.*?)[ \t]*$", re.MULTILINE)  # "B:" may be empty
_MATHVERSE_LABEL = re.compile(r"\(?([A-Z])\)?[.:：]?\s*(.*)", re.DOTALL)
_MATHVERSE_SEPARATOR = re.compile(r"\s*(?:\n|,|;|&|\band\b)\s*")


def mathverse_options(question):
    """Option letter -> option text, from the lines after the last "Choices:" (or "Choice:").

    mathverse_options("Find x.\\nChoices:\\nA:30\\nB:60") == {"A": "30", "B": "60"}
    """
    pieces = re.split(r"\bChoices?\s*:", question)
    return dict(_MATHVERSE_OPTION.findall(pieces[-1])) if len(pieces) > 1 else {}


def mathverse_choice_letter(answer, options):
    """The option one answer names, or None: a letter alone ("B", "(B)", "B."), a letter with
    that option's text ("(B) 30°", "B. 30°"), or an option's text (by rewards.is_equivalent).
    "A or B" and "B. 40°" (B being 30°) name none."""
    answer = answer.strip()
    labelled = _MATHVERSE_LABEL.fullmatch(answer)
    if labelled:
        letter, rest = labelled.groups()
        if not rest or (letter in options and rewards.is_equivalent(rest, options[letter])):
            return letter
    return next((option for option, text in options.items() if rewards.is_equivalent(answer, text)), None)


def mathverse_named_options(answer, options):
    """The set of options an answer names, None when some part of it names none. Several
    correct options are written one per line in the gold ("C\\nD"), and as "C, D" or "C and D"
    in answers; a hedge ("A or B") names none.

    mathverse_named_options("C\\nD", {}) == {"C", "D"}; mathverse_named_options("False",
    {"A": "True", "B": "False"}) == {"B"}
    """
    whole = mathverse_choice_letter(answer, options)
    if whole is not None:
        return {whole}
    parts = _MATHVERSE_SEPARATOR.split(answer.strip())
    named = {mathverse_choice_letter(part, options) for part in parts} if len(parts) > 1 else {None}
    return None if None in named else named


def score_mathverse(record, response):
    """MathVerse verdict from the `<answer>` block (no block scores 0).

    An answer equal to the gold answer (both stripped) is correct: that is the official scorer's
    rule-based match (score_answer_s2.py, quick_match), the one verdict the official pipeline
    reaches without GPT. Otherwise rules stand in for the GPT judgement: multi-choice, the
    answer names the gold's options (mathverse_named_options; "(C)", "C\\nD" and option texts
    such as "False" are golds too); free-form, the answer is equivalent to the gold
    (rewards.is_equivalent).
    """
    answer = rewards.extract_answer(response)
    if answer is None:
        return False
    gold = record["answer"].strip()
    if answer.strip() == gold:
        return True
    if record["question_type"] == "multi-choice":
        options = mathverse_options(record["question"])
        gold_options = mathverse_named_options(gold, options)
        return gold_options is not None and mathverse_named_options(answer, options) == gold_options
    return rewards.is_equivalent(answer, gold)


# ----------------------------------------------------------------------------- MM-Math
#
# The official judge is kge-sun/MM-Math eval.py, class AutoScoringJudge, called as VLMEvalKit's
# MMMath.evaluate calls it (the pipeline Vision-R1 evaluated with): judge(gold solution, prediction)
# at precision 1e-2. Vision-R1's evaluation (its vlmeval/inference.py) makes the prediction the text
# of `<answer> Final Answer:(.*?) </answer>` when the response has that block, else the whole
# response. Each function below names the eval.py function it mirrors, quirks included; the one
# departure is a time limit (the official judge can run forever on some inputs; here they score 0).

MMMATH_PRECISION = 1e-2  # eval.py --precision default; VLMEvalKit's judge default
MMMATH_TIME_LIMIT_S = 5  # per response: sympy on hostile input must not stall evaluation
VISION_R1_ANSWER = re.compile(r"<answer> Final Answer:(.*?) </answer>", re.DOTALL)  # its evaluation's regex
_PI = sympy.Symbol("pi")  # what the official parser makes of \pi (eval.py `self.pi`)

# eval.py `sepcial_symbol_replace`, applied in this order (the order matters: "cm" also eats "cm^{2}").
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


class _LaTeXLexer(LaTeXLexer):
    def checkVersion(self, toolVersion):  # noqa: N802 (ANTLR's name); see parse_latex
        pass


class _LaTeXParser(LaTeXParser):
    def checkVersion(self, toolVersion):  # noqa: N802
        pass


def parse_latex(text):
    """sympy.parsing.latex.parse_latex, the ANTLR parser eval.py calls, with its readings:
    parse_latex("1\\\\frac{1}{2}") == 1/2 (a product), "2π" and "−3" do not parse, "\\\\ne" is a
    product of symbols, "\\\\pi" is the Symbol pi, nothing is evaluated (9^{9^{9}} stays a power).

    sympy ships the parser generated by ANTLR 4.11 and refuses any other runtime; math-verify
    pins runtime 4.13, which reads the same serialized grammar, so only the version check is
    skipped (check_scoring.py compares verdicts against eval.py run under runtime 4.11).
    """
    text = text.strip()
    errors = MathErrorListener(text)
    lexer = _LaTeXLexer(antlr4.InputStream(text))
    lexer.removeErrorListeners()
    lexer.addErrorListener(errors)
    parser = _LaTeXParser(antlr4.CommonTokenStream(lexer))
    parser.removeErrorListeners()
    parser.addErrorListener(errors)
    return convert_relation(parser.math().relation())


def vision_r1_prediction(response):
    """The text Vision-R1's evaluation hands a benchmark judge: the stripped X of the first
    `<answer> Final Answer:X </answer>` (spaces and case exactly so), else the whole response.

    vision_r1_prediction("<think>..</think><answer> Final Answer:2.5 </answer>") == "2.5";
    "<answer>Final Answer: 2.5</answer>" (no spaces) is returned whole.
    """
    if "<answer>" in response:
        match = VISION_R1_ANSWER.search(response)
        if match:
            return match.group(1).strip()
    return response


def _mmmath_spans(text):
    """eval.py `extract_boxed_content`: the content of every \\boxed{...}, else the $...$ spans of
    the last line, else []. An unclosed \\boxed{ raises ValueError, as there."""
    spans = []
    for match in re.finditer(r"\\boxed{", text):
        depth, end = 1, match.end()
        while depth and end < len(text):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        if depth:
            raise ValueError("Mismatched braces in LaTeX string.")
        spans.append(text[match.end():end - 1])
    return spans or re.findall(r"\$(.*?)\$", text.strip().split("\n")[-1])


def mmmath_final_answer(text):
    """The answer span the official judge reads, for display: the spans joined by ",", None when
    there is none or a \\boxed{ is never closed.

    mmmath_final_answer("\\\\boxed{1} and \\\\boxed{x^{2}}") == "1,x^{2}"
    """
    try:
        spans = _mmmath_spans(text)
    except ValueError:
        return None
    return ",".join(spans) if spans else None


def _mmmath_official_span(text):
    """eval.py `extract_boxed_content` as the judge uses it: every span followed by "," (so
    "\\\\boxed{10m}" reads "10m,", and the trailing comma then stops the unit rule of
    mmmath_clean), or the whole text when there is no span."""
    spans = _mmmath_spans(text)
    return "".join(span + "," for span in spans) if spans else text


def mmmath_clean(answer):
    """eval.py `sepcial_symbol_replace`: drop units, degree signs and LaTeX spacing.

    mmmath_clean("6\\\\text{cm}") == "6"; mmmath_clean("60^{\\\\circ}") == "60"; mmmath_clean("10m,") == "10m"
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
    """eval.py `split_by_comma`: split at commas outside brackets: "(1,2), 3" -> ["(1,2)", "3"]."""
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
    """eval.py `trans_plus_minus_sign`: "\\\\pm 2" stands for two answers, "+ 2" and "- 2"."""
    expanded = []
    for part in parts:
        expanded += [part.replace("\\pm", "+"), part.replace("\\pm", "-")] if "\\pm" in part else [part]
    return expanded


def _chain_to_interval(answer):
    """eval.py `trans_greater_sign_to_interval`, used when there are exactly two "<":
    "a<x<b" is "(a, b)" (so "0<x\\\\le 1" has one "<" and stays)."""
    pieces = answer.split("<")
    return f"({pieces[0]}, {pieces[-1]})"


def _numbers_equal(gold, answer, precision):
    """eval.py `numerical_equal`: Python floats (so "1e3", "inf" read too) within precision x 1.01
    of the gold, the gold / 100 or the gold x 100."""
    reference, value = float(gold), float(answer)
    return any(abs(target - value) <= precision * 1.01 for target in (reference / 100, reference, reference * 100))


def _can_compute_power(expression):
    """eval.py `can_compute_power`: a top-level number power with an exponent over 1000 is refused;
    a top-level power of anything but numbers too."""
    if not isinstance(expression, sympy.Pow):
        return True
    base, exponent = expression.as_base_exp()
    return bool(base.is_number and exponent.is_number and abs(exponent.evalf()) <= 1000)


def _expressions_equal(gold, answer, precision):
    """eval.py `expression_equal`, on what follows the first "=" of each side: identical parses;
    else, with \\\\pi as a float, both without symbols and within precision x 1.01, or both with
    symbols and a simplified difference below 1e-3 (a difference that keeps symbols raises
    TypeError, which the caller reads as "not equal", as eval.py's `is_equal` does)."""
    gold = (gold.split("=")[1] if "=" in gold else gold).strip()
    answer = (answer.split("=")[1] if "=" in answer else answer).strip()
    gold_expr, answer_expr = sympy.sympify(parse_latex(gold)), sympy.sympify(parse_latex(answer))
    if gold_expr == answer_expr:
        return True
    gold_expr, answer_expr = gold_expr.subs(_PI, math.pi), answer_expr.subs(_PI, math.pi)
    gold_symbolic, answer_symbolic = gold_expr.has(sympy.Symbol), answer_expr.has(sympy.Symbol)
    if gold_symbolic != answer_symbolic:
        return False
    if not gold_symbolic:
        try:
            if not (_can_compute_power(gold_expr) and _can_compute_power(answer_expr)):
                return False
            return bool(abs(gold_expr.evalf() - answer_expr.evalf()) <= precision * 1.01)
        except Exception:  # eval.py: a comparison sympy cannot make is "not equal"
            return False
    try:
        difference = sympy.simplify(gold_expr - answer_expr).evalf()
    except Exception:
        return False
    return bool(abs(difference) < 1e-3)


def _equations_equal(gold, answer):
    """eval.py `equation_equal`: each side "lhs = rhs" (exactly one "=") as simplify(lhs - rhs) of
    Eq(lhs, rhs); equal when one difference is a non-zero integer multiple of the other."""
    def difference(equation):
        lhs, rhs = equation.split("=")
        relation = sympy.Eq(parse_latex(lhs), parse_latex(rhs))
        return sympy.simplify(relation.lhs - relation.rhs)

    gold_diff, answer_diff = difference(gold), difference(answer)
    ratios = (sympy.simplify(gold_diff / answer_diff), sympy.simplify(answer_diff / gold_diff))
    return any(ratio.is_Integer and ratio != 0 for ratio in ratios)


def _intervals_equal(gold, answer, precision):
    """eval.py `interval_equal`: identical, or the same number of "\\\\cup" pieces, each with the
    same first and last character and endpoints equal by _expressions_equal (pieces are not
    stripped, so "(1,2) \\\\cup (3,4)" fails to parse and raises)."""
    if gold == answer:
        return True
    gold_pieces, answer_pieces = gold.split("\\cup"), answer.split("\\cup")
    if len(gold_pieces) != len(answer_pieces):
        return False
    for gold_piece, answer_piece in zip(gold_pieces, answer_pieces):
        if (gold_piece[0], gold_piece[-1]) != (answer_piece[0], answer_piece[-1]):
            return False
        ends = zip(gold_piece.strip("[]()").split(","), answer_piece.strip("[]()").split(","))
        if not all(_expressions_equal(g, a, precision) for g, a in ends):
            return False
    return True


def _is_interval(part):
    return part.startswith(("(", "[")) and part.endswith((")", "]"))


def _mmmath_parts_equal(gold, answer, precision):
    """eval.py `is_equal` for one comma-separated part: identical and non-empty; both intervals
    (an interval that fails to parse makes the pair unequal); numbers; expressions (unless both
    sides hold "="); equations. A check that raises says "not equal"."""
    if gold == answer and gold != "":
        return True
    if _is_interval(gold) and _is_interval(answer):
        try:
            if _intervals_equal(gold, answer, precision):
                return True
        except Exception:
            return False
    checks = [lambda: _numbers_equal(gold, answer, precision), lambda: _equations_equal(gold, answer)]
    if not ("=" in gold and "=" in answer):
        checks.insert(1, lambda: _expressions_equal(gold, answer, precision))
    for check in checks:
        try:
            if check():
                return True
        except Exception:  # sympy / float raise on text they cannot read: not equal
            continue
    return False


def mmmath_judge(gold, prediction, precision=MMMATH_PRECISION):
    """eval.py `AutoScoringJudge.judge(gold, prediction, precision)`.

    Both texts are read (_mmmath_official_span) and cleaned (mmmath_clean); identical -> equal.
    Otherwise Chinese words are dropped unless they are the whole answer, "a<x<b" becomes an
    interval, the comma-separated parts (with "\\\\pm" expanded) must pair up one to one: gold
    parts are visited in eval.py's order (index 0, then every next index modulo what is left),
    each taking the first unpaired predicted part equal to it.

    mmmath_judge("\\\\boxed{1}, \\\\boxed{3}", "\\\\boxed{3} \\\\boxed{1}") is True;
    mmmath_judge("\\\\boxed{10m}", "10m") is False (the trailing comma of "10m," keeps the "m").
    """
    try:
        gold, prediction = (mmmath_clean(_mmmath_official_span(text)) for text in (gold, prediction))
    except ValueError:  # an unclosed \boxed{: eval.py's preprocess raises and judge says False
        return False
    if gold == prediction:
        return True
    chinese = r"[\u4e00-\u9fff]+"
    gold = gold if re.fullmatch(chinese, gold) else re.sub(chinese, "", gold)
    prediction = prediction if re.fullmatch(chinese, prediction) else re.sub(chinese, "", prediction)
    gold = _chain_to_interval(gold) if gold.count("<") == 2 else gold
    prediction = _chain_to_interval(prediction) if prediction.count("<") == 2 else prediction
    gold_parts = _expand_plus_minus(_split_top_level(gold))
    predicted_parts = _expand_plus_minus(_split_top_level(prediction))
    if len(gold_parts) != len(predicted_parts):
        return False
    index = -1
    while gold_parts:
        index = (index + 1) % len(gold_parts)
        gold_part = gold_parts[index]
        match = next((part for part in predicted_parts if _mmmath_parts_equal(gold_part, part, precision)), None)
        if match is None:
            return False
        gold_parts.remove(gold_part)  # list.remove: the first equal string, as eval.py
        predicted_parts.remove(match)
    return True


def score_mmmath(record, response):
    """MM-Math verdict as the official pipeline gives it: mmmath_judge(record["answer"], the
    response as vision_r1_prediction reads it).

    record["answer"] is the gold solution (its \\boxed{} parts are the answer). Work on one
    response is capped at MMMATH_TIME_LIMIT_S (SIGALRM, so call it from the main thread);
    running out of time scores 0, where the official judge would not return.
    """
    prediction = vision_r1_prediction(rewards._as_text(response))
    try:
        with _time_limit(MMMATH_TIME_LIMIT_S):
            return mmmath_judge(record["answer"], prediction)
    except _OutOfTime:
        return False


# ----------------------------------------------------------------------------- general benchmarks
#
# MMStar, ChartQA, MME and HallusionBench, the general benchmarks of Vision-R1-LlamaV-CI's table.
# Each rule reads `benchmark_prediction(response)`: the `<answer>` block when there is one, else
# the whole response (the prediction Vision-R1's evaluation hands VLMEvalKit).

MME_SUBTASKS = {  # MME eval_tool/calculation.py `eval_type_dict`
    "perception": ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                   "artwork", "OCR"),
    "cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"),
}
_VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                    "?", "!")


def benchmark_prediction(response):
    """The text a general benchmark's rule reads: the `<answer>` block (rewards.extract_answer), else
    the whole response. "<think>..</think><answer> Final Answer:B </answer>" -> "B"."""
    answer = rewards.extract_answer(response)
    return rewards._as_text(response) if answer is None else answer


def mmstar_options(question):
    """Option letter -> text of an MMStar question as the Hugging Face export writes it (the
    options after the last "Options:", "A: x, B: y, ..."), letters taken in order from A.

    mmstar_options("Which?\\nOptions: A: red, B: a cat, sitting, C: 5") == {"A": "red", "B": "a cat, sitting", "C": "5"}
    """
    text = question.rsplit("Options:", 1)[-1].strip() if "Options:" in question else ""
    labels, letter = [], "A"
    for match in re.finditer(r"(?:^|,)\s*([A-Z]):\s", text):
        if match.group(1) == letter:
            labels.append(match)
            letter = chr(ord(letter) + 1)
    ends = [match.start() for match in labels[1:]] + [len(text)]
    return {match.group(1): text[match.end():end].strip() for match, end in zip(labels, ends)}


def _infer_option(answer, options):
    """VLMEvalKit `can_infer_option`: with .()[],:;!*#{} read as spaces, the one option letter that
    stands as a word; "Z" for a refusal or a lone Z; None otherwise (none, or several letters)."""
    refusals = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                "I'm sorry, but without the image provided", "Cannot determine the answer")
    if any(refusal in answer for refusal in refusals):
        return "Z"
    words = re.sub(r"[.()\[\],:;!*#{}]", " ", answer).split()
    named = [letter for letter in options if letter in words]
    if len(named) == 1:
        return named[0]
    return "Z" if not named and "Z" in words else None


def _infer_text(answer, options):
    """VLMEvalKit `can_infer_text`: the one option whose text (lower case) is inside the answer."""
    named = [letter for letter, text in options.items() if str(text).lower() in answer.lower()]
    return named[0] if len(named) == 1 else None


def mmstar_choice(prediction, options):
    """The option letter VLMEvalKit's exact matching reads (vlmeval/utils/matching_util.py `can_infer`:
    the option letter, else the option text), None when it reads none (scored wrong, as its "Z").
    MMStar (Lin-Chen/MMStar) is scored by VLMEvalKit: correct when this letter is the answer.

    mmstar_choice("(B) a cat", {"A": "a dog", "B": "a cat"}) == "B"; "A or B" -> None;
    "It is a dog." -> "A" (by the option text)
    """
    return _infer_option(prediction, options) or _infer_text(prediction, options)


def _chartqa_float(text):
    """pix2struct `_to_float`: float(text), "12%" as 0.12, None when it does not parse."""
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def chartqa_relaxed_correct(target, prediction, max_relative_change=0.05):
    """ChartQA relaxed accuracy (pix2struct/metrics.py `relaxed_correctness`, the rule of the
    ChartQA paper, as VLMEvalKit and lmms-eval score it): numbers within 5% of a non-zero gold
    (relative change |p - t| / |t| <= 0.05), otherwise a case-insensitive exact match. The
    prediction is stripped (VLMEvalKit); a gold of 0 is compared as text.

    chartqa_relaxed_correct("50", "52") is True (4%); ("50", "53") False; ("12%", "0.12") True;
    ("0", "0.0") False; ("Yes", "yes") True
    """
    prediction = prediction.strip()
    predicted, gold = _chartqa_float(prediction), _chartqa_float(target)
    if predicted is not None and gold:
        return abs(predicted - gold) / abs(gold) <= max_relative_change
    return prediction.lower() == target.lower()


def mme_answer(prediction):
    """MME eval_tool/calculation.py `parse_pred_ans` on the lower-cased prediction: "yes" or "no"
    as it is, else "yes" / "no" found in its first four characters (yes first), else "other".

    mme_answer("Yes, there is a dog.") == "yes"; mme_answer("Not at all") == "no" (prefix "not ");
    mme_answer("There is no dog") == "other"
    """
    prediction = prediction.lower()
    if prediction in ("yes", "no"):
        return prediction
    return next((label for label in ("yes", "no") if label in prediction[:4]), "other")


def mme_scores(results):
    """MME's scores (eval_tool/calculation.py): per subtask, acc (questions right, %) plus acc+
    (images with both questions right, %); perception and cognition the sums over their subtasks.

    results: (subtask, image, correct) per question. existence: image 1 right twice, image 2
    once -> acc 75 + acc+ 50 = 125; with code_reasoning 0 -> perception 125, cognition 0, total 125.
    """
    by_image = defaultdict(lambda: defaultdict(list))
    for subtask, image, correct in results:
        by_image[subtask][image].append(bool(correct))
    subtasks = {}
    for subtask, images in by_image.items():
        answers = [correct for image in images.values() for correct in image]
        subtasks[subtask] = 100 * sum(answers) / len(answers) + 100 * sum(map(all, images.values())) / len(images)
    scores = {part: sum(subtasks.get(name, 0.0) for name in names) for part, names in MME_SUBTASKS.items()}
    return {**scores, "total": sum(scores.values()), "subtasks": subtasks}


def _vqa_punctuation(text):
    """VLMEvalKit `process_punctuation` (the VQA evaluation's): each of _VQA_PUNCTUATION dropped
    where the text has it next to a space (or holds a 1,000-style comma), else made a space;
    then up to 32 periods not followed by a digit dropped (its `(?!<=\\d)` is a lookahead that
    always holds, and re.UNICODE lands in `sub`'s count)."""
    thousands = re.search(r"(\d)(,)(\d)", text) is not None
    out = text
    for mark in _VQA_PUNCTUATION:
        out = out.replace(mark, "" if (mark + " " in text or " " + mark in text or thousands) else " ")
    return re.sub(r"\.(?!\d)", "", out, count=32)


def yes_or_no(prediction):
    """VLMEvalKit `YOrN_Extraction` (vlmeval/dataset/utils/yorn.py), the rule its HallusionBench
    scoring uses: "Yes" when the word yes is there and no is not, "No" the other way, else "Unknown".

    yes_or_no("Yes, it is.") == "Yes"; yes_or_no("No.") == "No"; yes_or_no("yes and no") == "Unknown"
    """
    words = _vqa_punctuation(prediction.lower()).split()
    if ("yes" in words) != ("no" in words):
        return "Yes" if "yes" in words else "No"
    return "Unknown"


def hallusionbench_scores(results):
    """HallusionBench's accuracies (tianyi-lab/HallusionBench utils.py), in %: aAcc over questions
    (`get_eval_all`); fAcc over figures (category, subcategory, set_id, figure_id), a figure right
    when all its questions are, VS questions without a figure (figure_id 0) left out
    (`get_eval_fig`); qAcc over questions (category, subcategory, set_id, question_id), right when
    it is answered right on every figure (`get_eval_pair_all`).

    results: dicts with those five fields and `correct`. VD set 0: question 0 right on figures 0
    and 1, question 1 right on figure 0 only -> aAcc 75, fAcc 50 (figure 1 fails), qAcc 50.
    """
    figures, questions = defaultdict(list), defaultdict(list)
    for r in results:
        if not (r["category"] == "VS" and str(r["figure_id"]) == "0"):
            figures[(r["category"], r["subcategory"], str(r["set_id"]), str(r["figure_id"]))].append(r["correct"])
        questions[(r["category"], r["subcategory"], str(r["set_id"]), str(r["question_id"]))].append(r["correct"])
    return {"aAcc": 100 * sum(bool(r["correct"]) for r in results) / len(results),
            "fAcc": 100 * sum(map(all, figures.values())) / len(figures),
            "qAcc": 100 * sum(map(all, questions.values())) / len(questions)}
