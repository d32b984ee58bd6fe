"""Answer checking and rewards for Vision-R1 (docs/method.md §3, §4).

One checker serves GRPO and evaluation, because GRPO learns exactly what the reward pays for
and the benchmark reports exactly what the judge accepts.

- format_ok / extract_answer: the response format `<think> ... </think><answer> Final Answer:X
  </answer>` (style "vision-r1") or `<think> ... </think>` followed by a `\\boxed{X}` ("r1").
- is_equivalent: is the extracted answer X the gold answer? One section per answer type:
  multiple choice, numbers, free-form math (math-verify, bounded), text, lists.
- reward: the hard formatting result reward, 1 iff format and answer are both right (§3);
  zero_reward: the Vision-R1-Zero baseline's 0.5 x format + 0.5 x accuracy.

Nothing from a response is ever eval-ed or executed. Every call is bounded in time without
signals (so it works from any thread): answers longer than MAX_ANSWER_CHARS are wrong, big
numbers are rejected before conversion, and math-verify only ever sees short answers whose
nesting, exponents and LaTeX commands have been checked first (see _symbolic_safe).
"""
import functools
import logging
import re
import threading
import time
from decimal import ROUND_HALF_UP, Decimal, localcontext
from fractions import Fraction

import math_verify
import sympy
from sympy.core.function import AppliedUndef

# We bound math-verify's inputs ourselves and call it with its signal-based timeouts off;
# it warns about exactly that on every first call, so quiet its logger.
logging.getLogger("math_verify").setLevel(logging.ERROR)

# The DeepSeek-R1-Zero system prompt with the Vision-R1 answer block, for the Zero baseline (§3).
R1_ZERO_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
    "process here </think><answer> Final Answer: answer here </answer>."
)

STYLES = ("vision-r1", "r1")
ANSWER_TYPES = ("choice", "integer", "float", "text", "expression", "list")

MAX_ANSWER_CHARS = 1000  # a final answer is a letter, a number or a short expression
MAX_NUMBER_DIGITS = 30  # beyond this a number is not an answer, and int() of it is slow
MAX_SYMBOLIC_CHARS = 80  # math-verify sees nothing longer,
MAX_SYMBOLIC_DEPTH = 4  # nothing nested deeper ({[ ... ]}),
MAX_SYMBOLIC_POWERS = 3  # at most three short exponents (no towers),
MAX_SYMBOLIC_VARIABLES = 2  # at most two variables (three in linear equations)
MAX_SYMBOLIC_FUNCTIONS = 2  # and at most two of sin, cos, ..., log, only without variables
MAX_ITEMS = 32  # values compared one by one in a list answer (or entries of a matrix)
PARTS_BUDGET_S = 0.25  # CPU seconds one call may spend on the parts of a list, tuple or matrix
FLOAT_PLACES = 6  # a decimal showing this many places is compared at that many (math-verify's float_rounding)


def _as_text(value):
    """Responses may arrive as bytes with broken UTF-8 (decoded without failing) or None."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


# ----------------------------------------------------------------------------------------------
# Response format and answer extraction

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_VISION_R1_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>(.*?)</answer>", re.DOTALL)
_FINAL_ANSWER_PREFIX = re.compile(r"\s*final\s*answer\s*:", re.IGNORECASE)
_BOXED_OPEN = re.compile(r"\\boxed\s*\{")
_BRACE = re.compile(r"[{}]")


def _check_style(style):
    if style not in STYLES:
        raise ValueError(f"unknown response style {style!r}; expected one of {STYLES}")


def _strip_final_answer(body):
    """' Final Answer:B ' -> 'B' (the prefix the Vision-R1 data puts before every answer)."""
    prefix = _FINAL_ANSWER_PREFIX.match(body)
    return (body[prefix.end():] if prefix else body).strip()


def _boxed_contents(text):
    """Contents of the outermost balanced \\boxed{...} of `text`, in order.

    One pass with a stack of open braces, so 10k nested braces or an unclosed \\boxed{ cost
    linear time. 'x \\boxed{1} \\boxed{\\frac{3}{4}}' -> ['1', '\\frac{3}{4}'];
    '\\boxed{\\boxed{4}}' -> ['\\boxed{4}']; '\\boxed{5' -> [].
    """
    boxed_braces = {m.end() - 1 for m in _BOXED_OPEN.finditer(text)}
    if not boxed_braces:
        return []
    open_braces, spans = [], []
    for brace in _BRACE.finditer(text):
        if brace.group() == "{":
            open_braces.append(brace.start())
        elif open_braces:
            start = open_braces.pop()
            if start in boxed_braces:
                while spans and spans[-1][0] > start:  # a box inside this one
                    spans.pop()
                spans.append((start + 1, brace.start()))
    return [text[start:end] for start, end in spans]


def format_ok(text, style="vision-r1"):
    """Does the whole response follow the format the reward pays for (docs/method.md §3)?

    vision-r1: matches `<think>.*?</think>\\s*<answer>.*?</answer>` with each tag exactly once,
      nothing but whitespace outside, and a non-empty answer after 'Final Answer:'.
      '<think>3+4</think><answer> Final Answer:7 </answer>' -> True; a second <think>, text after
      </answer>, or '<answer> Final Answer: </answer>' -> False.
    r1: one leading <think>...</think> block, then text whose last \\boxed{...} is non-empty.
    """
    _check_style(style)
    text = _as_text(text).strip()
    if style == "r1":
        if text.count("<think>") != 1 or text.count("</think>") != 1 or not text.startswith("<think>"):
            return False
        boxes = _boxed_contents(text.split("</think>", 1)[1])
        return bool(boxes) and boxes[-1].strip() != ""
    # Counting the tags first also keeps the regex linear: with each tag present once there is
    # nothing for the lazy groups to backtrack over.
    if any(text.count(tag) != 1 for tag in _TAGS):
        return False
    match = _VISION_R1_FORMAT.fullmatch(text)
    return match is not None and _strip_final_answer(match.group(1)) != ""


def extract_answer(text, style="vision-r1"):
    """The final answer X of a response, or None when it has none.

    vision-r1: the body of the first <answer>...</answer> block (first, as the official
      evaluation regex `<answer> Final Answer:(.*?) </answer>` takes), 'Final Answer:' stripped,
      and if the body holds balanced \\boxed{...}, their distinct non-empty contents joined by ', '
      (an answer of several values may box each one).
      '<answer> Final Answer:\\boxed{12} </answer>' -> '12'; '\\boxed{1},\\boxed{2}' -> '1, 2'.
    r1: the last balanced \\boxed{...} after </think> (or anywhere, when there is no </think>).
    Extraction does not check the format: evaluation scores malformed responses too.
    """
    _check_style(style)
    text = _as_text(text)
    if style == "r1":
        boxes = _boxed_contents(text.rsplit("</think>", 1)[-1])
        answer = boxes[-1] if boxes else None
    else:
        start = text.find("<answer>")
        end = text.find("</answer>", start + len("<answer>")) if start >= 0 else -1
        if end < 0:
            return None
        answer = _strip_final_answer(text[start + len("<answer>"):end])
        boxes = [box.strip() for box in _boxed_contents(answer)]
        if boxes:  # the same value boxed twice is one value
            answer = ", ".join(box for box in dict.fromkeys(boxes) if box)
    answer = None if answer is None else answer.strip()
    return answer or None


# ----------------------------------------------------------------------------------------------
# Normalisation shared by all answer types

_UNICODE_MATH = {
    "\u2212": "-", "\u00d7": r"\times ", "\u00b7": r"\cdot ", "\u00f7": r"\div ",
    "\u03c0": r"\pi ", "\u221a": r"\sqrt", "\u221e": r"\infty ", "\u2264": r"\le ",
    "\u2265": r"\ge ", "\u2260": r"\ne ", "\u2248": r"\approx ", "\u00b0": "",
}
_LATEX_CLEANUP = [  # (pattern, replacement), applied in order
    # a unit after a value: '11\\pi \\text{ cm}^2' -> '11\\pi', '113.1 \\mathrm{~cm}^{2}' -> '113.1'
    (re.compile(r"(?<=\S)\s*\\(?:text|mathrm|mbox)\s*\{[~\s]*[A-Za-z]+\s*\}(?:\^\s*\{?[23]\}?)?\s*\$?\s*$"), ""),
    (re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}"), r" \1 "),
    (re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\degree"), ""),  # 45^\circ -> 45 (degree signs)
    (re.compile(r"\\?%"), ""),  # 25\% -> 25 (percent signs)
    (re.compile(r",\s*\\!\s*"), ","),  # 11,\! 111 -> 11,111 (a thousands separator)
    (re.compile(r"\\left(?![A-Za-z])|\\right(?![A-Za-z])|\\displaystyle|\\?\$"), ""),
    (re.compile(r"\*\*(.+?)\*\*"), r"\1"),  # markdown bold, but 2**3 stays
    (re.compile(r"\\[dtc]frac"), r"\\frac"),
    (re.compile(r"(?<!\\)\\[,;:! ]|\\q?quad|~"), " "),  # not the row break of '1 \\\\ 2'

    (re.compile(r"\s+"), " "),
    (re.compile(r" (?=\^)"), ""),  # 'cm ^2' -> 'cm^2'
]


def _clean(answer):
    """Strip typesetting that never changes an answer's value.

    '$\\dfrac{3}{4}\\,\\text{cm}$' -> '\\frac{3}{4} cm'; '45^{\\circ}' -> '45'; '**B**' -> 'B';
    '\\cfrac{1}{2}' -> '\\frac{1}{2}'.
    """
    answer = "".join(_UNICODE_MATH.get(ch, ch) for ch in answer)
    for pattern, replacement in _LATEX_CLEANUP:
        answer = pattern.sub(replacement, answer)
    return answer.strip().rstrip(".").strip()


_THOUSANDS_COMMA = re.compile(r"\d,\d{3}(?!\d)")


def _separator_width(answer, i):
    """Width of the item separator starting at answer[i], or 0."""
    if answer[i] == ";" or (answer[i] == "," and not _THOUSANDS_COMMA.match(answer, max(i - 1, 0))):
        return 1
    for word in (" or ", " and "):
        if answer[i:i + len(word)].lower() == word:
            return len(word)
    return 0


def _split_items(answer):
    """Split at top level on ',', ';', ' or ', ' and ' (not inside brackets, not 1,000).

    'A or B' -> ['A', 'B']; '(1, 2)' -> ['(1, 2)']; '1,000' -> ['1,000'];
    '\\frac{1}{2}, 3' -> ['\\frac{1}{2}', '3'].
    """
    items, depth, start, i = [], 0, 0, 0
    while i < len(answer):
        ch = answer[i]
        width = 0
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(depth - 1, 0)
        elif depth == 0:
            width = _separator_width(answer, i)
        if width:
            items.append(answer[start:i])
            start = i = i + width
        else:
            i += 1
    items.append(answer[start:])
    return [item.strip() for item in items if item.strip()]


_PLUS_MINUS = re.compile(r"\\pm|\\mp|\u00b1")
_ORDER = re.compile(r"(<|>|\\leq?(?![A-Za-z])|\\geq?(?![A-Za-z]))")
_OPEN = {"<": "(", ">": "(", "\\le": "[", "\\leq": "[", "\\ge": "[", "\\geq": "["}
_CLOSE = {"<": ")", ">": ")", "\\le": "]", "\\leq": "]", "\\ge": "]", "\\geq": "]"}
_FLIP = {"<": ">", ">": "<", "\\le": "\\ge", "\\leq": "\\geq", "\\ge": "\\le", "\\geq": "\\leq"}


def _as_interval(inequality):
    """(variable, interval) of 'x < a', 'a \\le x' or 'a < x \\le b', else None.

    'x<-1' -> ('x', '(-\\infty,-1)'); '3\\le x' -> ('x', '[3,\\infty)'); '0<x<1' -> ('x', '(0,1)').
    """
    parts = [part.strip() for part in _ORDER.split(inequality)]
    if len(parts) == 5 and parts[1] in ("<", "\\le", "\\leq") and parts[3] in ("<", "\\le", "\\leq"):
        low, low_sign, variable, high_sign, high = parts
        return (variable, f"{_OPEN[low_sign]}{low},{high}{_CLOSE[high_sign]}") if len(variable) == 1 else None
    if len(parts) != 3:
        return None
    variable, sign, bound = parts if len(parts[0]) == 1 and parts[0].isalpha() else (parts[2], _FLIP.get(parts[1]), parts[0])
    if not (len(variable) == 1 and variable.isalpha() and sign and bound):
        return None
    if sign in ("<", "\\le", "\\leq"):
        return variable, f"(-\\infty,{bound}{_CLOSE[sign]}"
    return variable, f"{_OPEN[sign]}{bound},\\infty)"


def _union_of_inequalities(answer):
    """'x<-1 or x>3' -> '(-\\infty,-1)\\cup(3,\\infty)': inequalities in one variable listed as
    alternatives are one set; anything else is returned unchanged."""
    items = _split_items(answer)
    intervals = [_as_interval(item) for item in items]
    if len(items) < 2 or None in intervals or len({variable for variable, _ in intervals}) != 1:
        return answer
    return "\\cup".join(interval for _, interval in intervals)


def _is_hedge(pred, gold):
    """An answer naming more values than the gold answer hedges, and is wrong.

    ('A or B', 'A'), ('2, 3', '2'), ('2 \\pm 1', '3') are hedges; ('(2, 3)', '(2, 3)') is not.
    """
    if _PLUS_MINUS.search(pred) and not _PLUS_MINUS.search(gold):
        return True
    def count(answer):
        return len(_split_items(_strip_set_braces(_union_of_inequalities(answer))))

    return count(pred) > count(gold)


def _strip_set_braces(answer):
    """'\\{1, 2\\}' and '{1, 2}' -> '1, 2' (a set is compared as its items); '{1}{2}' and
    anything else unchanged."""
    width = 2 if answer.startswith("\\{") and answer.endswith("\\}") else 1
    inner = answer[width:-width]
    if answer[width - 1:width] == "{" and answer.endswith("}") and _nesting_depth(inner, floor=True) >= 0:
        return inner.strip()
    return answer


_EQUALS = re.compile(r"(?<![<>!=\\])=(?!=)|\\approx(?![A-Za-z])")
_INEQUALITY = re.compile(r"[<>]|\\(?:le|ge|leq|geq|lt|gt|ne|neq|in)(?![A-Za-z])")
# What a label may hold besides letters: subscripts, function calls f(2), geometry marks.
_LABEL_MARKS = re.compile(r"_\{[^{}]*\}|_\w|[A-Za-z]\s*\([^()]*\)|[{}|']|\\(?:angle|measuredangle|triangle|overline|"
                          r"overrightarrow|widehat|vec|odot|sin|cos|tan|cot|sec|csc|log|ln)(?![A-Za-z])")
_LABEL = re.compile(r"[A-Za-z\s(),]*[A-Za-z][A-Za-z\s(),]*")


def _top_level_matches(pattern, answer):
    """Matches of `pattern` outside brackets: in '\\sum_{k=1}^{9} k' the '=' is not one."""
    depth, depth_at = 0, []
    for ch in answer:
        depth_at.append(depth)
        depth += (ch in "([{") - (ch in ")]}")
    return [m for m in pattern.finditer(answer) if depth_at[m.start()] == 0]


def _is_relation(answer):
    return bool(_top_level_matches(_EQUALS, answer) or _INEQUALITY.search(answer))


def _labelled_value(answer):
    """The value a labelled answer or a chain states: its last side, when the first side only
    names something (letters, subscripts, f(2), angle marks) or is empty.

    'x = 5+5+1 = 11' -> '11'; '(p,q)=(3,2)' -> '(3,2)'; '\\angle ABC = 45' -> '45';
    'a_{10} = 7' -> '7'; '\\approx 3.14' -> '3.14'; '2x = 6', 'x+y=1', 'x \\le 2' unchanged.
    """
    signs = _top_level_matches(_EQUALS, answer)
    if not signs or _INEQUALITY.search(answer):
        return answer
    label = answer[:signs[0].start()].strip()
    marks_dropped = _LABEL_MARKS.sub(lambda m: m.group()[0] if m.group()[0].isalpha() else " ", label)
    if label and not _LABEL.fullmatch(marks_dropped):
        return answer
    return answer[signs[-1].end():].strip()


def _drop_labels(pred, gold):
    """Compare values, not labels, where only one side is labelled (math-verify's rule: the gold's
    form decides): ('AB = 4', '4') -> ('4', '4'); ('4', 'Area = 4') -> ('4', '4');
    ('P(1, 2)', '(1,2)') -> ('(1, 2)', '(1,2)'); two relations stay as they are ('y = 2',
    'x = 2' differ)."""
    if not _is_relation(gold):
        pred = _labelled_value(pred)
        if gold.startswith("("):
            pred = re.sub(r"^[A-Z]'?\s*(?=\()", "", pred)  # a named point: 'P(1, 2)'
    if not _is_relation(pred):
        gold = _labelled_value(gold)
    return pred, gold


# ----------------------------------------------------------------------------------------------
# Numbers: integers, decimals, thousands separators, simple fractions, units, precision

_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+"
_PLAIN_NUMBER = re.compile(rf"(?P<num>{_NUMBER})(?:\s*/\s*(?P<den>{_NUMBER}))?")
_LATEX_FRACTION = re.compile(
    rf"(?P<sign>[-+]?)\\frac\s*(?:\{{\s*(?P<num>{_NUMBER})\s*\}}\s*\{{\s*(?P<den>{_NUMBER})\s*\}}"
    r"|(?P<num_digit>\d)(?P<den_digit>\d))"
)
_UNIT_WORD = re.compile(r"[A-Za-z]+(?:\^\{?[23]\}?|[\u00b2\u00b3])?")


def _is_units(rest):
    """Is the text after a number only units? ' cm', ' m/s', ' square units', 'cm^2' -> True.

    A single letter glued to the number is a variable, not a unit: '2x' is not 2.
    """
    words = rest.replace("/", " ").split()
    if words and not rest[:1].isspace() and len(words[0]) == 1:
        return False
    return all(_UNIT_WORD.fullmatch(word) for word in words)


def _to_fraction(number):
    """'1,234.5' -> Fraction(2469, 2); None beyond MAX_NUMBER_DIGITS digits."""
    number = number.replace(",", "")
    if sum(ch.isdigit() for ch in number) > MAX_NUMBER_DIGITS:
        return None
    return Fraction(number)


def parse_number(answer):
    """Exact value of a plain numeric answer, or None.

    '1,000' -> 1000; '-3.50 cm' -> -7/2; '3/4' -> 3/4; '\\frac{3}{4}' -> 3/4; 'x = 45^\\circ'
    -> 45; 'x = 5+6 = 11' -> 11; '25%' -> 25 (a percent answer is compared as written); '2x',
    '2 or 3' -> None.
    """
    answer = _labelled_value(_clean(_as_text(answer)))
    match = _LATEX_FRACTION.match(answer) or _PLAIN_NUMBER.match(answer)
    if match is None or not _is_units(answer[match.end():]):
        return None
    groups = match.groupdict()
    numerator = _to_fraction(groups["num"] or groups.get("num_digit") or "")
    denominator = _to_fraction(groups["den"] or groups.get("den_digit") or "1")
    if numerator is None or denominator is None or denominator == 0:
        return None
    value = numerator / denominator
    return -value if groups.get("sign") == "-" else value


def _decimal_places(number_text):
    """'1.25' -> 2, '3' -> 0."""
    digits = re.search(r"\.(\d+)", number_text)
    return len(digits.group(1)) if digits else 0


def _round(value, places):
    """Round half up to `places` decimals: 1.45 -> 1.5, 2/3 at 2 -> 0.67 (MathVista precision)."""
    with localcontext() as context:
        context.prec = MAX_NUMBER_DIGITS + places + 20  # enough for every digit quantize keeps
        if isinstance(value, Fraction):
            value = Decimal(value.numerator) / Decimal(value.denominator)
        return Decimal(value).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)


def _same_number(pred_value, gold_value, pred, gold):
    """Exact values are equal when equal, except that a decimal showing FLOAT_PLACES or more
    places stands for the value it rounds to at FLOAT_PLACES: ('0.0833333333333333',
    '\\frac{1}{12}') -> True; ('0.33', '\\frac{1}{3}') and ('0.0834', '\\frac{1}{12}') -> False."""
    if pred_value == gold_value:
        return True
    if max(_decimal_places(pred), _decimal_places(gold)) < FLOAT_PLACES:
        return False
    return _round(pred_value, FLOAT_PLACES) == _round(gold_value, FLOAT_PLACES)


def _numbers_equal(pred, gold, precision=None):
    """Numeric answers (MathVista integer / float).

    With `precision`, both sides are rounded to that many decimals: ('1.45', '1.5', 1) -> True.
    Without it, values must be equal exactly ('1.50' == '3/2' == '\\frac{3}{2}'; long decimals as
    _same_number says), except that an irrational answer is rounded to the decimals the gold
    answer shows: ('2\\sqrt{3}', '3.46') -> True, but ('\\pi', '3') -> False.
    A gold answer that is not a plain number is compared as an expression.
    """
    gold_value = parse_number(gold)
    if gold_value is None:
        return _expressions_equal(pred, gold)
    pred_value = parse_number(pred)
    if pred_value is None:
        pred_value = _symbolic_number(_clean(pred))
        if pred_value is None:
            return False
        if precision is None and not isinstance(pred_value, Fraction):
            precision = _decimal_places(_clean(gold)) or None
    if precision is None:
        return _same_number(pred_value, gold_value, _clean(pred), _clean(gold))
    if abs(pred_value) >= 10 ** MAX_NUMBER_DIGITS:  # too big to be rounded to the gold answer
        return False
    return _round(pred_value, precision) == _round(gold_value, precision)


# ----------------------------------------------------------------------------------------------
# Free-form math (MathVerse, MM-Math): string match, then numbers, then math-verify (bounded)

_SYMBOLIC_CHARS = re.compile(r"[A-Za-z0-9\s+\-*/=<>()\[\]{}|^_.,:'\\]*")
_LATEX_COMMAND = re.compile(r"\\([A-Za-z]+|.)")
_FUNCTIONS = frozenset("sin cos tan cot sec csc log ln".split())
_SAFE_COMMANDS = _FUNCTIONS | frozenset(
    "frac sqrt pi cdot times div pm mp le leq ge geq lt gt ne neq infty cup cap in circ "
    "alpha beta gamma theta phi varphi lambda mu sigma omega { }".split()
)
_LONG_DIGIT_RUN = re.compile(r"\d{16}")
# A sum with small integer or single-letter limits: '\sum_{k=1}^{10}', '\sum_{i=0}^{n}'.
_SUM = re.compile(r"\\sum_\{\s*([a-z])\s*=\s*(-?\d{1,2}|[a-z])\s*\}\s*\^\s*(?:\{\s*(\d{1,2}|[a-z])\s*\}|(\d|[a-z]))")
MAX_LINEAR_VARIABLES = 3  # 'x+y+z=6': equations of degree 1 may have three variables
MAX_SUM_DEGREE = 3  # '\\sum_{k=1}^{n} k^3': sums of polynomials of degree <= 3 only
# base, then exponent in braces or a single character: '2^{10}' -> ('2', '10', '')
_POWER = re.compile(r"(.)\^\s*(?:\{\s*([^{}]*?)\s*\}|(.))", re.DOTALL)
_NUMBER_EXPONENT = re.compile(r"[-+]?\d{1,2}")  # 2^{10}, 10^{-3}
_SMALL_EXPONENT = re.compile(r"[-+]?[1-3]")  # x^2, (x+1)^{-1}


def _nesting_depth(text, floor=False):
    """'\\frac{(1+2)}{3}' -> 2; with floor, the lowest depth instead: '1), (2' -> -1."""
    depth = deepest = lowest = 0
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        deepest, lowest = max(deepest, depth), min(lowest, depth)
    return lowest if floor else deepest


def _power_base_start(answer, caret):
    """Index where the base of the power at answer[caret] == '^' starts: '(x+1)^2' -> 0."""
    depth = 0
    for i in range(caret - 1, -1, -1):
        depth += (answer[i] in ")]}") - (answer[i] in "([{")
        if depth <= 0:
            return i
    return 0


def _short_exponents(answer):
    """At most MAX_SYMBOLIC_POWERS exponents, each short and none inside another power's base
    or exponent (no towers): up to two digits on a number ('2^{10}', '10^{-3}'), else one
    digit up to 3 ('x^2', '(x+1)^{-1}'), which keeps what sympy expands small."""
    powers = list(_POWER.finditer(answer))
    if len(powers) != answer.count("^") or len(powers) > MAX_SYMBOLIC_POWERS:
        return False
    for power in powers:
        base, braced, single = power.groups()
        exponent = single if braced is None else braced
        if "^" in answer[_power_base_start(answer, power.start() + 1):power.start() + 1]:
            return False
        if not (_SMALL_EXPONENT.fullmatch(exponent) or (base.isdigit() and _NUMBER_EXPONENT.fullmatch(exponent))):
            return False
    return True


def _symbolic_safe(answer):
    """May math-verify (latex2sympy + sympy simplify/solve, no timeout) see this answer?

    sympy has no time bound of its own: '(a+b+c+d)^9' takes most of a second to simplify, a log
    of a cosine next to a variable several seconds, towers or huge powers forever. So only short
    ASCII answers built from whitelisted LaTeX commands go through: nested at most
    MAX_SYMBOLIC_DEPTH deep, literals under 16 digits, at most MAX_SYMBOLIC_VARIABLES variables,
    at most MAX_SYMBOLIC_FUNCTIONS function calls and only in answers without variables, and
    short exponents (_short_exponents); one sum, of its index alone, with limits of two digits
    or one letter (_SUM); MAX_LINEAR_VARIABLES variables in an equation without powers, which must be linear
    once parsed. Relations are checked once parsed (_degrees_small).
    '2\\sqrt{3}', 'y=-\\frac{1}{2}x^{2}+2x+6', '\\sin(\\frac{\\pi}{3})', '\\sum_{k=1}^{10} k',
    'x+y+z=6' pass; '2^{2^{9}}', '9^{999}', '(x+y+z)^2', '100!', '\\int_0^1 x dx', '2\\sin x',
    '\\sum_{k=1}^{999} k' and five nested \\frac do not.
    The slowest answers that pass are timed in tests/test_rewards.py.
    """
    if len(answer) > MAX_SYMBOLIC_CHARS or not answer.isascii() or not _SYMBOLIC_CHARS.fullmatch(answer):
        return False
    sums = _SUM.findall(answer)
    sum_letters = {letter for limits in sums for letter in limits if letter.isalpha()}
    # a sum's limits are checked here and leave its index and letter limits as variables
    answer = _SUM.sub(lambda sum_: " \\cdot " + " ".join(g for g in sum_.groups() if g and g.isalpha()), answer)
    commands = _LATEX_COMMAND.findall(answer)
    if any(command not in _SAFE_COMMANDS for command in commands):
        return False
    functions = sum(command in _FUNCTIONS for command in commands)
    variables = set(re.findall(r"[A-Za-z]", _LATEX_COMMAND.sub(" ", answer)))
    if sums and (len(sums) > 1 or "=" in answer or not variables <= sum_letters
                 or not set(commands) <= {"frac", "cdot", "times", "{", "}"}):
        return False  # one sum of its index alone (its degree is checked once parsed, _degrees_small)
    linear_equation = "=" in answer and "^" not in answer and len(variables) <= MAX_LINEAR_VARIABLES
    if (len(variables) > MAX_SYMBOLIC_VARIABLES and not linear_equation) or functions > MAX_SYMBOLIC_FUNCTIONS:
        return False
    if functions and variables:  # simplify on '\frac{3}{x+\ln(\cos 2)}' takes seconds
        return False
    if _LONG_DIGIT_RUN.search(answer) or _nesting_depth(answer) > MAX_SYMBOLIC_DEPTH:
        return False
    return _short_exponents(answer)


@functools.lru_cache(maxsize=4096)
def _parse_symbolic(answer):
    """math-verify parse of a bounded answer -> tuple of sympy objects, () when its degrees are
    not small (_degrees_small), sums worked out (cached: gold answers and a group's samples
    repeat)."""
    parsed = tuple(math_verify.parse(
        f"${answer}$",
        extraction_config=[math_verify.LatexExtractionConfig()],
        fallback_mode="no_fallback",
        parsing_timeout=None,
    ))
    if not _degrees_small(parsed):
        return ()
    # a sum of a polynomial has a closed form sympy finds at once; math-verify would also try others
    return tuple(item.doit() if isinstance(item, sympy.Basic) and item.has(sympy.Sum) else item for item in parsed)


def _total_degree(expression):
    """Total degree of the numerator of a rational function, None when it is not one (or has no
    variables): 'x^2 y - 1' -> 3; '\\sin x' -> None."""
    calls = expression.atoms(AppliedUndef)  # f(x) counts as one variable, as math-verify reads it
    numerator, _ = sympy.fraction(sympy.together(expression.subs({call: sympy.Dummy() for call in calls})))
    if not numerator.free_symbols or not numerator.is_polynomial(*numerator.free_symbols):
        return None
    return sympy.Poly(numerator, *numerator.free_symbols).total_degree()


def _degrees_small(parsed):
    """Are all relations in a parsed answer polynomial of total degree <= 2, everything of
    degree <= 1 where there are more than MAX_SYMBOLIC_VARIABLES variables, and every sum of a
    polynomial of degree <= MAX_SUM_DEGREE?

    math-verify compares 'y=2x+1' with '2y=4x+2' by solving both; sympy solves a quadratic at
    once but may spend seconds on '(x+1)^3(x+2)^3=1' (degree 6), which the string bounds allow.
    It sums a cubic at once, a rational function of k (roots of k^3+7) for minutes.
    """
    for expression in parsed:
        if not isinstance(expression, sympy.Basic):
            continue
        for summation in expression.atoms(sympy.Sum):
            summand, symbols = summation.function, summation.function.free_symbols
            if symbols and not (summand.is_polynomial(*symbols)
                                and sympy.Poly(summand, *symbols).total_degree() <= MAX_SUM_DEGREE):
                return False
        relations = [relation for relation in expression.atoms(sympy.core.relational.Relational)
                     if isinstance(relation.lhs, sympy.Expr) and isinstance(relation.rhs, sympy.Expr)]  # not x = [1, 2]
        for relation in relations:
            difference = relation.lhs - relation.rhs
            degree = _total_degree(difference) if difference.free_symbols else 0  # '5+5+1 = 11' in a chain
            if degree is None or degree > 2:
                return False
        if len(expression.free_symbols) > MAX_SYMBOLIC_VARIABLES:
            sides = [side for relation in relations for side in (relation.lhs, relation.rhs)]
            if not relations or any((_total_degree(side) or 0) > 1 for side in sides):
                return False
    return True


def _symbolic_equal(pred, gold):
    """math-verify equivalence of two cleaned answers, or False when either is unsafe."""
    if not (_symbolic_safe(pred) and _symbolic_safe(gold)):
        return False
    try:
        pred_parsed, gold_parsed = _parse_symbolic(pred), _parse_symbolic(gold)
        if not (pred_parsed and gold_parsed):
            return False
        # allow_set_relation_comp: '-2 \le x \le 7' is the set [-2, 7], '0 < f(x) < 1' is (0, 1)
        return math_verify.verify(list(gold_parsed), list(pred_parsed), timeout_seconds=None,
                                  allow_set_relation_comp=True)
    except Exception:  # sympy raises many kinds of error on odd input: not provably equal
        return False


def _symbolic_number(answer):
    """A real constant written in LaTeX: '2\\sqrt{3}' -> Decimal('3.4641...'); '\\frac{9}{3}' ->
    Fraction(3); anything else -> None."""
    if not _symbolic_safe(answer):
        return None
    try:
        for parsed in _parse_symbolic(answer):
            if isinstance(parsed, sympy.Basic):
                parsed = parsed.doit()  # '\\frac{1}{1+\\frac{1}{2}}' is parsed unevaluated; sums have small limits (_SUM)
            if getattr(parsed, "is_Rational", False):
                return Fraction(int(parsed.p), int(parsed.q))
            if getattr(parsed, "is_number", False) and parsed.is_real:
                return Decimal(str(parsed.evalf(MAX_NUMBER_DIGITS)))
    except Exception:  # as in _symbolic_equal
        return None
    return None


def _compact(answer):
    return re.sub(r"\s+", "", answer)


_call = threading.local()  # .deadline: CPU time (time.thread_time) the running is_equivalent call has


def _out_of_time():
    """Has the running call spent PARTS_BUDGET_S? Each comparison is bounded (_symbolic_safe), the
    number of parts of a list, tuple or matrix is not: they are compared while this says no."""
    deadline = getattr(_call, "deadline", None)
    return deadline is not None and time.thread_time() > deadline


def _parts_equal(pairs):
    """Every (pred part, gold part) equal, in order, within the call's parts budget."""
    return all(not _out_of_time() and _expressions_equal(pred, gold) for pred, gold in pairs)


def _tuple(answer):
    """(opening, closing, elements) of '(a, b)' or '[a, b)' with two or more elements, else None."""
    if len(answer) < 2 or answer[0] not in "([" or answer[-1] not in ")]" or _nesting_depth(answer[1:-1], floor=True) < 0:
        return None
    elements = _split_items(answer[1:-1])
    return (answer[0], answer[-1], elements) if len(elements) > 1 else None


_MATRIX = re.compile(r"[(\[]?\s*\\begin\{([pbvBV]?matrix|array)\}(?:\{[^{}]*\})?(.*?)\\end\{\1\}\s*[)\]]?", re.DOTALL)


def _matrix(answer):
    """('matrix' or 'determinant', rows of entry strings) of a LaTeX matrix, else None.

    '\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}' -> ('matrix', [['1', '2'], ['3', '4']]); bmatrix,
    matrix and array are matrices too; vmatrix is a determinant.
    """
    match = _MATRIX.fullmatch(answer)
    if match is None:
        return None
    rows = [[entry.strip() for entry in row.split("&")] for row in match.group(2).split("\\\\") if row.strip()]
    return "determinant" if match.group(1)[0] in "vV" else "matrix", rows


def _matrices_equal(pred, gold):
    """Same kind and shape, entries equal one by one (no sympy Matrix, so no determinant or
    inverse is ever computed)."""
    (pred_kind, pred_rows), (gold_kind, gold_rows) = pred, gold
    if pred_kind != gold_kind or [len(row) for row in pred_rows] != [len(row) for row in gold_rows]:
        return False
    entries = [(p, g) for pred_row, gold_row in zip(pred_rows, gold_rows) for p, g in zip(pred_row, gold_row)]
    return len(entries) <= MAX_ITEMS and _parts_equal(entries)


def _items_equal(pred_items, gold_items):
    """Several values (roots, points, the values of several boxes): the same number of them,
    paired one to one in any order; '(17, 18), (1, 2)' vs '(1,2),(17,18)' -> True. Pairing
    that runs past the call's parts budget (_out_of_time) says no."""
    if len(pred_items) != len(gold_items) or len(gold_items) > MAX_ITEMS:
        return False
    unpaired = list(pred_items)
    for gold_item in gold_items:
        match = next((item for item in unpaired if _compact(item) == _compact(gold_item)), None)
        for item in unpaired if match is None else ():
            if _out_of_time():
                return False
            if _expressions_equal(item, gold_item):
                match = item
                break
        if match is None:
            return False
        unpaired.remove(match)
    return True


def _expressions_equal(pred, gold):
    """Free-form math, tried in order: the same text; several values (_items_equal); labels
    dropped (_drop_labels: 'AB = 4' for '4'); matrices entry by entry; points and intervals
    element by element; numbers (_same_number); math-verify (bounded).
    '\\frac{1}{2}x^2+3x-4' vs 'x^2/2 + 3x - 4' -> True."""
    pred, gold = _clean(pred), _clean(gold)
    if _compact(pred) == _compact(gold):
        return True
    pred, gold = _union_of_inequalities(pred), _union_of_inequalities(gold)
    pred_items, gold_items = _split_items(_strip_set_braces(pred)), _split_items(_strip_set_braces(gold))
    if len(pred_items) > 1 or len(gold_items) > 1:
        return _items_equal(pred_items, gold_items)
    pred, gold = _drop_labels(pred, gold)
    if _compact(pred) == _compact(gold):
        return True
    pred_matrix, gold_matrix = _matrix(pred), _matrix(gold)
    if pred_matrix or gold_matrix:
        return bool(pred_matrix and gold_matrix) and _matrices_equal(pred_matrix, gold_matrix)
    pred_tuple, gold_tuple = _tuple(pred), _tuple(gold)
    if pred_tuple and gold_tuple:  # points and intervals: same brackets, elements in order
        return pred_tuple[:2] == gold_tuple[:2] and len(pred_tuple[2]) == len(gold_tuple[2]) and _parts_equal(
            zip(pred_tuple[2], gold_tuple[2]))
    if _is_relation(pred) and _is_relation(gold):  # 'y = 2' is not 'x = 2': math-verify compares both sides
        return _symbolic_equal(pred, gold)
    pred_value, gold_value = parse_number(pred), parse_number(gold)
    if pred_value is not None and gold_value is not None:
        return _same_number(pred_value, gold_value, pred, gold)
    return _symbolic_equal(pred, gold)


# ----------------------------------------------------------------------------------------------
# Text answers: case- and whitespace-insensitive

def _normalize_text(answer):
    """'  The  Sun. ' -> 'the sun'; '"yes"' -> 'yes'."""
    return " ".join(_clean(answer).lower().split()).strip("\"'`").strip()


def _texts_equal(pred, gold):
    return _normalize_text(pred) == _normalize_text(gold)


# ----------------------------------------------------------------------------------------------
# Multiple choice: letters vs option texts, either direction

_OPTION_LETTER = re.compile(
    r"(?:(?:option|choice)\s+)?(?:\((?P<enclosed>[A-Za-z])\)|(?P<letter>[A-Za-z])(?P<mark>[.:)])?)(?P<rest>.*)",
    re.IGNORECASE | re.DOTALL,
)


def _read_letter(answer):
    """'B' -> ('B', ''); '(B) 15' -> ('B', '15'); 'B. 15' -> ('B', '15'); 'Be', 'a cat' -> None.

    A letter followed by text needs a mark ('(B)', 'B.', 'B:', 'B)') to be an option label, so
    that a word or a sentence is never read as its first letter.
    """
    match = _OPTION_LETTER.fullmatch(_clean(answer))
    if match is None:
        return None
    marked = match.group("enclosed") or match.group("mark")
    if match.group("rest") and not marked:
        return None
    return (match.group("enclosed") or match.group("letter")).upper(), match.group("rest").strip()


def _option_indices(answer, choices, prefer_text):
    """Which options may `answer` name? Letters count by position (A = 0), texts by value.

    With choices ['10', '15', '20']: 'B', '(B)', 'b', 'B. 15', '15', '15.0' -> {1};
    'B. 20' -> set() (the letter and the text disagree); 'A or B' -> set().
    A gold answer (prefer_text=True) that equals an option text names that option only, which
    settles options that are themselves letters.
    """
    by_text = {i for i, choice in enumerate(choices or ()) if _values_equal(answer, choice)}
    if prefer_text and by_text:
        return by_text
    letter = _read_letter(answer)
    if letter is None:
        return by_text
    index, rest = ord(letter[0]) - ord("A"), letter[1]
    if choices is None:
        return {index}
    if index < len(choices) and (not rest or _values_equal(rest, choices[index])):
        return by_text | {index}
    return by_text


def _choices_equal(pred, gold, choices):
    """Does `pred` name the gold option? (MathVista multi-choice, MathVerse letters)."""
    gold_options = _option_indices(gold, choices, prefer_text=True)
    if not gold_options:  # gold is neither a letter nor an option: compare values directly
        return _values_equal(pred, gold)
    return bool(gold_options & _option_indices(pred, choices, prefer_text=False))


# ----------------------------------------------------------------------------------------------
# Lists (MathVista 'list'): same length, same order, element by element

def _strip_outer_brackets(answer):
    """'[1, 2]' -> '1, 2'; '(1, 2)' -> '1, 2'; '(1)+(2)' unchanged."""
    answer = answer.strip()
    if len(answer) < 2 or answer[0] + answer[-1] not in ("[]", "()", "{}"):
        return answer
    depth = 0
    for i, ch in enumerate(answer):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth == 0 and i < len(answer) - 1:
            return answer
    return answer[1:-1]


def _list_items(answer):
    if isinstance(answer, (list, tuple)):
        return [_as_text(item) for item in answer]
    return _split_items(_strip_outer_brackets(_clean(_as_text(answer))))


def _lists_equal(pred, gold, precision=None):
    pred_items, gold_items = _list_items(pred), _list_items(gold)
    return len(pred_items) == len(gold_items) and all(
        is_equivalent(p, g, precision=precision) for p, g in zip(pred_items, gold_items)
    )


# ----------------------------------------------------------------------------------------------
# Dispatch

_LOOKS_MATHEMATICAL = re.compile(r"[\d\\^=+<>_/]")
_GOLD_LETTER = re.compile(r"\(?[A-Z]\)?")


def _infer_type(gold, choices):
    """Answer type of a gold answer when the data does not say.

    choices given -> 'choice'; a list -> 'list'; '12' -> 'integer'; '1.5' -> 'float';
    'B' or '(B)' -> 'choice'; 'y=2x+1' and 'x=2' -> 'expression'; 'left' -> 'text'.
    """
    if choices:
        return "choice"
    if isinstance(gold, (list, tuple)):
        return "list"
    if isinstance(gold, (int, float)):
        return "float" if isinstance(gold, float) else "integer"
    gold = _clean(_as_text(gold))
    value = parse_number(gold)
    if value is not None and not _is_relation(gold):
        return "float" if "." in gold else "integer"
    if _GOLD_LETTER.fullmatch(gold):
        return "choice"
    return "expression" if _LOOKS_MATHEMATICAL.search(gold) else "text"


def _values_equal(pred, gold, answer_type=None, precision=None):
    """Single (non-choice, non-list) values, hedges excluded."""
    pred, gold = _as_text(pred), _as_text(gold)
    if _is_hedge(_clean(pred), _clean(gold)):
        return False
    answer_type = answer_type or _infer_type(gold, None)
    if answer_type in ("integer", "float"):
        return _numbers_equal(pred, gold, precision)
    if answer_type == "text":
        return _texts_equal(pred, gold)
    if answer_type == "choice":  # a letter without its options: compare the letters
        return _choices_equal(pred, gold, None)
    return _expressions_equal(pred, gold)


def is_equivalent(pred, gold, choices=None, answer_type=None, precision=None):
    """Is the predicted final answer the gold answer?

    pred: the extracted answer (str, or None when there was none -> False).
    gold: str, int, float, or a list for list answers.
    choices: option texts, lettered A, B, C... by position (multiple choice).
    answer_type: 'choice', 'integer', 'float', 'text', 'expression' (free-form math), 'list';
      None infers it from gold and choices.
    precision: decimals both sides are rounded to (MathVista float answers).
    Examples: ('(B)', '15', ['10', '15']) -> True; ('1,000', '1000') -> True;
    ('A or B', 'A') -> False; ('YES', 'yes') -> True; ('\\frac{\\sqrt{3}}{2}', '\\sqrt{3}/2') -> True.
    """
    if answer_type is not None and answer_type not in ANSWER_TYPES:
        raise ValueError(f"unknown answer_type {answer_type!r}; expected one of {ANSWER_TYPES} or None")
    if pred is None or gold is None:
        return False
    pred = _as_text(pred).strip()
    if not pred or len(pred) > MAX_ANSWER_CHARS:
        return False
    outermost = getattr(_call, "deadline", None) is None  # a list answer calls this per element
    if outermost:
        _call.deadline = time.thread_time() + PARTS_BUDGET_S
    try:
        answer_type = answer_type or _infer_type(gold, choices)
        if answer_type == "list":
            return _lists_equal(pred, gold, precision)
        gold = _as_text(gold)
        if answer_type == "choice":
            return _choices_equal(pred, gold, choices)
        return _values_equal(pred, gold, answer_type, precision)
    finally:
        if outermost:
            _call.deadline = None


# ----------------------------------------------------------------------------------------------
# Rewards

def reward(text, gold, choices=None, answer_type=None, truncated=False, style="vision-r1", precision=None):
    """Hard formatting result reward (docs/method.md §3): 1.0 iff the response has the format and its
    answer is right, else 0.0. A truncated response (finish reason 'length') scores 0.0 whatever
    it holds: it lost its closing tags by design (repo issue #29).

    '<think>2+2=4</think><answer> Final Answer:4 </answer>' with gold '4' -> 1.0; the same
    without </think> -> 0.0; with answer 5 -> 0.0.
    """
    if truncated or not format_ok(text, style):
        return 0.0
    return float(is_equivalent(extract_answer(text, style), gold, choices, answer_type, precision))


def zero_reward(text, gold, choices=None, answer_type=None, truncated=False, style="vision-r1", precision=None):
    """Vision-R1-Zero baseline reward (docs/method.md §3): 0.5 x format + 0.5 x accuracy, where
    accuracy checks the extracted answer even when the format is broken; truncated -> 0.0.

    Right answer in the right format -> 1.0; right answer with text after </answer> -> 0.5;
    right format, wrong answer -> 0.5.
    """
    if truncated:
        return 0.0
    correct = is_equivalent(extract_answer(text, style), gold, choices, answer_type, precision)
    return 0.5 * format_ok(text, style) + 0.5 * correct


# ----------------------------------------------------------------------------------------------
# The training rewards by name: what GRPO pays for (ptst.Schedule.reward, train_grpo.py --reward).
# Each takes a sampled response (generate.Completion: text, token_ids, finish_reason) and its problem
# record (answer, choices, answer_type, ...) and returns a float. The logged accuracy and the
# synthetic benchmark's score stay `reward`, whatever reward is trained.

def response_reward(rule, completion, problem):
    """`rule` (`reward` or `zero_reward`) of a sampled response to its problem; a response that
    stopped at the length cap (finish reason 'length') is truncated."""
    return rule(completion.text, problem["answer"], problem.get("choices"), problem.get("answer_type"),
                truncated=completion.finish_reason == "length")


def hard(completion, problem):
    """Vision-R1's training reward: the hard formatting result reward (`reward`)."""
    return response_reward(reward, completion, problem)


def zero(completion, problem):
    """Vision-R1-Zero's training reward: 0.5 x format + 0.5 x accuracy (`zero_reward`)."""
    return response_reward(zero_reward, completion, problem)


REWARDS = {"hard": hard, "zero": zero}
