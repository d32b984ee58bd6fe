"""How far our scorers agree with the benchmarks' official judges, and how many correct answer
forms the training reward accepts, on answer pairs generated here (seeded, so every run sees the
same pairs).

    python check_scoring.py mmmath     # scoring.score_mmmath vs MM-Math's eval.py judge (tests/official)
    python check_scoring.py mathverse  # every MathVerse text-only testmini gold answer, given verbatim
    python check_scoring.py reward     # rewards.reward on correct and wrong bare answers of each kind
    python check_scoring.py            # all three

MM-Math's eval.py calls sympy's ANTLR LaTeX parser, which sympy only runs under antlr4 runtime 4.11
(math-verify pins 4.13). By default the official judge runs in this process with the parser's version
check skipped (scoring.parse_latex); `--official-python PATH` runs it unchanged under another
interpreter with sympy and antlr4-python3-runtime==4.11.1 installed, e.g.
    python -m venv /tmp/mmmath && /tmp/mmmath/bin/pip install sympy==1.14.0 antlr4-python3-runtime==4.11.1
    python check_scoring.py mmmath --official-python /tmp/mmmath/bin/python
"""

import argparse
import gzip
import importlib.util
import json
import random
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).parent
OFFICIAL_MMMATH = ROOT / "tests" / "official" / "mmmath_eval.py"
MATHVERSE_DATA = ROOT / "tests" / "data" / "mathverse" / "testmini_text_only.json.gz"


# ----------------------------------------------------------------------------- the official MM-Math judge

def load_official_mmmath(parse_latex=None):
    """tests/official/mmmath_eval.py as a module; `parse_latex` replaces sympy's in it when given."""
    spec = importlib.util.spec_from_file_location("mmmath_eval", OFFICIAL_MMMATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if parse_latex is not None:
        module.parse_latex = parse_latex
    return module


def vision_r1_read(response):
    """Vision-R1's evaluation (evaluation/evalscope/vlmeval/inference.py), verbatim in effect: the
    answer block when its exact regex matches, else the whole response."""
    if "<answer>" in response:
        new_response = re.search(r"<answer> Final Answer:(.*?) </answer>", response, re.DOTALL)
        if new_response:
            response = new_response.group(1).strip()
    return response


def official_verdicts(pairs, parse_latex=None):
    """The official verdict of each (gold solution, response): AutoScoringJudge().judge(gold,
    Vision-R1's reading, 1e-2), as VLMEvalKit's MMMath.evaluate calls it."""
    judge = load_official_mmmath(parse_latex).AutoScoringJudge()
    verdicts = []
    for gold, response in pairs:
        try:
            verdicts.append(bool(judge.judge(gold, vision_r1_read(response), 1e-2)))
        except Exception:
            verdicts.append(False)
    return verdicts


def official_worker():
    """--official-worker: pairs as JSON on stdin, verdicts as JSON on stdout (sympy's own parser)."""
    pairs = json.load(sys.stdin)
    verdicts = official_verdicts(pairs)
    sys.stdout.write(json.dumps(verdicts))


# ----------------------------------------------------------------------------- MM-Math answer pairs

def _frac(p, q):
    return f"\\frac{{{p}}}{{{q}}}"


def _mmmath_integer(rng, n):
    return [str(n)], [(str(n), "same"), (f"{n}.0", "equivalent"), (_frac(2 * n, 2), "equivalent"),
                      (f"x={n}", "equivalent"), (str(n + 1), "wrong"), (f"{n}.02", "wrong"),
                      (f"{n}.01", "approximate"), (str(100 * n), "wrong")]


def _mmmath_decimal(rng, n):
    value = round(rng.uniform(0.1, 50), 2)
    return [f"{value}"], [(f"{value}", "same"), (f"{value + 0.004:.3f}", "approximate"),
                          (f"{value + 0.05:.2f}", "wrong"), (f"{value:.1f}", "approximate"),
                          (f"{value * 100:.0f}\\%", "notation")]


def _mmmath_fraction(rng, n):
    p, q = rng.choice([(1, 2), (1, 3), (2, 3), (3, 4), (5, 6), (7, 3), (9, 4), (12, 5), (5, 2), (8, 3)])
    whole, rest = divmod(p, q)
    forms = [(_frac(p, q), "same"), (f"\\dfrac{{{p}}}{{{q}}}", "equivalent"), (f"{p}/{q}", "equivalent"),
             (f"{p / q:.2f}", "approximate"), (f"{p / q:.3f}", "approximate"), (_frac(2 * p, 2 * q), "equivalent"),
             (_frac(q, p), "wrong"), (f"{p / q + 0.03:.2f}", "wrong"), (f"\\frac{{{p}}}{{{q}}}\\text{{cm}}", "notation")]
    if whole and rest:
        forms.append((f"{whole}{_frac(rest, q)}", "notation"))  # a mixed number: a product to the parser
    return [_frac(p, q)], forms


def _mmmath_sqrt(rng, n):
    a, b = rng.choice([(2, 3), (3, 2), (2, 2), (4, 3), (1, 5), (3, 3), (2, 5)])
    gold = f"{a if a > 1 else ''}\\sqrt{{{b}}}"
    value = a * b ** 0.5
    return [gold], [(gold, "same"), (f"\\sqrt{{{a * a * b}}}", "equivalent"), (f"{value:.2f}", "approximate"),
                    (f"{value:.1f}", "approximate"), (f"{a if a > 1 else ''}\\sqrt {b}", "equivalent"),
                    (f"{a if a > 1 else ''}√{b}", "notation"), (f"{a + 1}\\sqrt{{{b}}}", "wrong"),
                    (f"\\sqrt{{{a * b}}}", "wrong")]


def _mmmath_pi(rng, n):
    k = rng.randint(2, 12)
    return [f"{k}\\pi"], [(f"{k}\\pi", "same"), (f"\\pi \\cdot {k}", "equivalent"),
                          (f"{k * 3.14159:.2f}", "approximate"), (f"{k}π", "notation"),
                          (f"{k + 1}\\pi", "wrong"), (f"{k}", "wrong"), (_frac(f"{2 * k}\\pi", 2), "equivalent")]


def _mmmath_angle(rng, n):
    degrees = rng.choice([30, 45, 60, 72, 90, 108, 120, 135, 150])
    gold = rng.choice([f"{degrees}^{{\\circ}}", f"{degrees}^\\circ", f"{degrees}°"])
    return [gold], [(gold, "same"), (str(degrees), "equivalent"), (f"{degrees}^{{\\circ}}", "equivalent"),
                    (f"{degrees}°", "notation"), (f"\\angle C={degrees}^\\circ", "equivalent"),
                    (f"{degrees + 10}^\\circ", "wrong"), (f"{degrees}度", "notation")]


def _mmmath_length(rng, n):
    unit = rng.choice(["\\text{cm}", "cm", "m", "\\text{m}", "\\ \\text{m}"])
    return [f"{n}{unit}"], [(f"{n}{unit}", "same"), (str(n), "equivalent"), (f"{n} cm", "notation"),
                            (f"{n}\\,cm", "notation"), (f"{n}m", "notation"), (f"{n} \\text{{m}}", "notation"),
                            (f"{n + 2}{unit}", "wrong"), (f"AB={n}", "equivalent")]


def _mmmath_point(rng, n):
    x, y = rng.randint(-6, 6), rng.randint(-6, 6)
    return [f"({x},{y})"], [(f"({x},{y})", "same"), (f"({x}, {y})", "equivalent"),
                            (f"\\left({x},{y}\\right)", "equivalent"), (f"P({x},{y})", "notation"),
                            (f"({y},{x})", "wrong" if x != y else "same"), (f"({x},{y + 1})", "wrong"),
                            (f"x={x}, y={y}", "notation")]


def _mmmath_two_answers(rng, n):
    a, b = rng.sample(range(1, 20), 2)
    forms = [(f"{a},{b}", "same"), (f"{b}, {a}", "equivalent"), (f"\\boxed{{{a}}}, \\boxed{{{b}}}", "equivalent"),
             (f"\\boxed{{{a}}} \\text{{ or }} \\boxed{{{b}}}", "equivalent"), (f"{a}", "wrong"),
             (f"{a} 或 {b}", "notation"), (f"x_1={a}, x_2={b}", "equivalent"), (f"{a},{b},{a + b}", "wrong")]
    golds = rng.choice([[f"{a}", f"{b}"], [f"{a},{b}"], [f"{a} 或 {b}"]])
    return golds, forms


def _mmmath_plus_minus(rng, n):
    return [f"\\pm {n}"], [(f"\\pm {n}", "same"), (f"{n}, -{n}", "equivalent"), (f"-{n}, {n}", "equivalent"),
                           (f"\\pm{n}", "equivalent"), (f"{n}", "wrong"), (f"±{n}", "notation")]


def _mmmath_line(rng, n):
    k, b = rng.choice([1, 2, -1, -2, 3, "\\frac{1}{2}"]), rng.randint(-5, 5)
    gold = f"y={k}x{b:+d}"
    return [gold], [(gold, "same"), (f"y={b}+{k}x" if b else f"y={k}x", "equivalent"), (f"{k}x{b:+d}", "equivalent"),
                    (f"y={k}x{b + 1:+d}", "wrong"), (f"y = {k} x {b:+d}", "equivalent"),
                    (f"2y=2({k}x{b:+d})", "equivalent"), (f"y={k}x{-b:+d}", "wrong" if b else "same")]


def _mmmath_inequality(rng, n):
    a, b = sorted(rng.sample(range(-9, 10), 2))
    gold = rng.choice([f"{a}<x<{b}", f"x>{a}", f"x\\geq {a}", f"{a}<x\\leq {b}"])
    return [gold], [(gold, "same"), (f"({a},{b})", "equivalent" if gold == f"{a}<x<{b}" else "wrong"),
                    (f"{a} < x < {b}", "equivalent" if gold == f"{a}<x<{b}" else "wrong"),
                    (f"x>{a}", "same" if gold == f"x>{a}" else "wrong"), (f"x>{a + 1}", "wrong"),
                    (f"x \\ge {a}", "notation"), (f"x\\geq{a}", "notation")]


def _mmmath_interval(rng, n):
    a, b = sorted(rng.sample(range(-9, 10), 2))
    gold = rng.choice([f"({a},{b})", f"[{a},{b}]", f"(-\\infty,{a})\\cup({b},+\\infty)", f"[{a},+\\infty)"])
    return [gold], [(gold, "same"), (gold.replace(",", ", "), "equivalent"), (f"({a},{b}]", "wrong"),
                    (f"[{a},{b + 1}]", "wrong"), (f"x\\in {gold}", "equivalent"),
                    (gold.replace("\\cup", " \\cup "), "notation"), (f"{a}<x<{b}", "notation")]


def _mmmath_chinese(rng, n):
    gold, other = rng.choice([("是", "否"), ("相等", "不相等"), ("平行", "垂直"), ("能", "不能")])
    return [gold], [(gold, "same"), (other, "wrong"), (f"\\text{{{gold}}}", "notation"), ("yes", "wrong")]


def _mmmath_percent(rng, n):
    percent = rng.choice([10, 20, 25, 40, 50, 75])
    return [f"{percent}\\%"], [(f"{percent}\\%", "same"), (f"{percent / 100}", "equivalent"),
                               (f"{percent}%", "equivalent"), (f"{percent}", "equivalent"),
                               (f"{percent + 5}\\%", "wrong")]


def _mmmath_negative(rng, n):
    return [f"-{n}"], [(f"-{n}", "same"), (f"−{n}", "notation"), (f"{n}", "wrong"),
                       (f"-{_frac(2 * n, 2)}", "equivalent"), (f"- {n}", "equivalent")]


def _mmmath_expression(rng, n):
    a, b = rng.randint(1, 5), rng.randint(1, 5)
    gold = rng.choice([f"{a}a+{b}b", f"{a}\\sqrt{{2}}+{b}", f"\\frac{{{a}}}{{2}}\\pi-{b}", f"(x+{a})(x-{b})"])
    return [gold], [(gold, "same"), (gold.replace("+", " + "), "equivalent"), (gold + "+1", "wrong"),
                    (gold.replace(f"{b}", f"{b + 1}"), "wrong")]


MMMATH_KINDS = {  # kind -> (rng, n) -> (gold \boxed{} content(s), [(form, label)])
    "integer": _mmmath_integer,
    "decimal": _mmmath_decimal,
    "fraction": _mmmath_fraction,
    "sqrt": _mmmath_sqrt,
    "pi": _mmmath_pi,
    "angle": _mmmath_angle,
    "length": _mmmath_length,
    "point": _mmmath_point,
    "two answers": _mmmath_two_answers,
    "plus-minus": _mmmath_plus_minus,
    "line": _mmmath_line,
    "inequality": _mmmath_inequality,
    "interval": _mmmath_interval,
    "chinese": _mmmath_chinese,
    "percent": _mmmath_percent,
    "negative": _mmmath_negative,
    "expression": _mmmath_expression,
}


def mmmath_answers(rng):
    """One gold answer with forms that the official judge should, or should not, accept:
    (kind, gold \\boxed{} content(s), [(form, label)]) where label says what the form is
    ("same", "equivalent", "approximate", "notation", "wrong")."""
    kind = rng.choice(list(MMMATH_KINDS))
    golds, forms = MMMATH_KINDS[kind](rng, rng.randint(2, 60))
    return kind, golds, forms


REASONING = "<think>\nLet me work through the figure step by step. The given lengths give $3$ and $4$.\n</think>"


def mmmath_response(form, rng):
    """A response whose answer is `form`, in one of the ways responses end: (wrapper, text)."""
    wrapper = rng.choice(["block", "block boxed", "block no spaces", "block lower case", "block no prefix",
                          "boxed at the end", "dollars on the last line", "plain last line", "block and a boxed step",
                          "block with a period"])
    text = {
        "block": f"{REASONING}<answer> Final Answer:{form} </answer>",
        "block boxed": f"{REASONING}<answer> Final Answer:\\boxed{{{form}}} </answer>",
        "block no spaces": f"{REASONING}<answer>Final Answer: {form}</answer>",
        "block lower case": f"{REASONING}<answer> final answer:{form} </answer>",
        "block no prefix": f"{REASONING}<answer> {form} </answer>",
        "boxed at the end": f"{REASONING}\nSo the answer is \\boxed{{{form}}}.",
        "dollars on the last line": f"{REASONING}\nThe answer is ${form}$",
        "plain last line": f"{REASONING}\nThe answer is {form}",
        "block and a boxed step": f"<think>First \\boxed{{3}} then more.</think><answer> Final Answer:{form} </answer>",
        "block with a period": f"{REASONING}<answer> Final Answer:{form}. </answer>",
    }[wrapper]
    return wrapper, text


def mmmath_pairs(count, seed=0):
    """`count` (gold solution, response, kind, label, wrapper) rows."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < count:
        kind, golds, forms = mmmath_answers(rng)
        solution = "By the figure, the answer follows. " + ", ".join(f"\\boxed{{{gold}}}" for gold in golds) + "."
        form, label = rng.choice(forms)
        wrapper, response = mmmath_response(form, rng)
        rows.append((solution, response, kind, label, wrapper))
    return rows


def check_mmmath(count, official_python):
    import scoring
    rows = mmmath_pairs(count)
    pairs = [(gold, response) for gold, response, *_ in rows]
    start = time.perf_counter()
    ours = [scoring.score_mmmath({"answer": gold}, response) for gold, response in pairs]
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    if official_python:
        result = subprocess.run([official_python, __file__, "--official-worker"], input=json.dumps(pairs),
                                capture_output=True, text=True, check=True)
        official = json.loads(result.stdout)
        how = f"eval.py under {official_python} (sympy's own parse_latex)"
    else:
        official = official_verdicts(pairs, parse_latex=scoring.parse_latex)
        how = "eval.py in this process (parse_latex without its antlr version check)"
    official_s = time.perf_counter() - start
    agree = sum(a == b for a, b in zip(ours, official))
    print(f"MM-Math: {len(rows)} generated answer pairs; official judge: {how}")
    print(f"  agreement {agree}/{len(rows)} = {100 * agree / len(rows):.2f}%  "
          f"(official accepts {sum(official)}, ours {sum(ours)}; {ours_s:.0f} s ours, {official_s:.0f} s official)")
    by = defaultdict(Counter)
    for (gold, response, kind, label, wrapper), a, b in zip(rows, ours, official):
        by["kind"][kind, a == b] += 1
        by["wrapper"][wrapper, a == b] += 1
    for dimension in ("kind", "wrapper"):
        names = sorted({name for name, _ in by[dimension]})
        print(f"  by {dimension}: " + ", ".join(f"{name} {by[dimension][name, True]}/"
                                               f"{by[dimension][name, True] + by[dimension][name, False]}"
                                               for name in names))
    for (gold, response, kind, label, wrapper), a, b in zip(rows, ours, official):
        if a != b:
            print(f"  disagree ({kind}, {label}, {wrapper}): ours {a}, official {b}: {gold!r} vs {response[-80:]!r}")
    return agree / len(rows)


# ----------------------------------------------------------------------------- MathVerse

def answer_block(answer):
    return f"<think>Let me work it out.</think><answer> Final Answer:{answer} </answer>"


def mathverse_records():
    with gzip.open(MATHVERSE_DATA, "rt", encoding="utf-8") as f:
        return json.load(f)


def mathverse_choice_forms(record):
    """(right forms, wrong forms) of a multiple-choice answer: letters, "(B) text", texts; wrong
    letters and texts, hedges ("A or B") and lists with a wrong option added."""
    import scoring
    options = scoring.mathverse_options(record["question"])
    gold = sorted(scoring.mathverse_named_options(record["answer"], options))
    if len(gold) > 1:
        right = [", ".join(gold), " and ".join(gold), "\n".join(gold)]
    else:
        right = [gold[0], f"({gold[0]})", f"({gold[0]}) {options[gold[0]]}", f"{gold[0]}. {options[gold[0]]}",
                 options[gold[0]]]
    wrong = []
    for letter, text in options.items():
        if letter not in gold and text:
            wrong += [letter, text, f"{gold[0]}. {text}", " or ".join(gold + [letter]), ", ".join(gold + [letter])]
    return right, wrong


def check_mathverse():
    """Every gold answer given verbatim is correct (the official rule-based match), and the
    multiple-choice forms of mathverse_choice_forms are scored as they should be."""
    import scoring
    records = mathverse_records()
    exact = [scoring.score_mathverse(r, answer_block(r["answer"])) for r in records]
    choice = [r for r in records if r["question_type"] == "multi-choice"]
    right = wrong = right_total = wrong_total = 0
    for record in choice:
        right_forms, wrong_forms = mathverse_choice_forms(record)
        right += sum(scoring.score_mathverse(record, answer_block(form)) for form in right_forms)
        wrong += sum(scoring.score_mathverse(record, answer_block(form)) for form in wrong_forms)
        right_total, wrong_total = right_total + len(right_forms), wrong_total + len(wrong_forms)
    print(f"MathVerse text-only testmini: {len(records)} problems ({len(choice)} multiple choice)")
    print(f"  gold answer verbatim scored correct: {sum(exact)}/{len(records)}")
    print(f"  multiple choice: right forms accepted {right}/{right_total}, wrong forms accepted {wrong}/{wrong_total}")
    for record, verdict in zip(records, exact):
        if not verdict:
            print(f"  gold scored 0: {record['sample_index']} {record['answer']!r}")
    return sum(exact) / len(records)


# ----------------------------------------------------------------------------- training reward

def _decimal(value, places):
    return f"{value:.{places}f}"


def _reward_several_boxes(rng, a, b, c):
    roots = sorted(rng.sample(range(-9, 10), rng.choice([2, 3])))
    shuffled = rng.sample(roots, len(roots))
    gold = ", ".join(map(str, roots))
    boxes = [f"\\boxed{{{r}}}" for r in shuffled]
    right = [",".join(boxes), ", ".join(boxes), " \\text{ and } ".join(boxes), " ".join(boxes),
             ", ".join(f"x_{i + 1}=\\boxed{{{r}}}" for i, r in enumerate(shuffled)),
             ", ".join(f"\\boxed{{x={r}}}" for r in shuffled), " \\text{ or } ".join(boxes),
             " and ".join(f"${box}$" for box in boxes), ", \\quad ".join(boxes)]
    wrong = [", ".join(boxes[:-1]), ", ".join(boxes + ["\\boxed{99}"]), ", ".join(boxes[:-1] + ["\\boxed{99}"])]
    if rng.random() < 0.5:
        points = [(a, b), (c, a)]
        gold = "(%d,%d),(%d,%d)" % (*points[0], *points[1])
        right = [f"\\boxed{{({x}, {y})}} \\text{{ and }} \\boxed{{({u}, {v})}}" for (x, y), (u, v) in
                 (points, points[::-1])] + [f"\\boxed{{({a},{b})}}, \\boxed{{({c},{a})}}"]
        wrong = [f"\\boxed{{({b}, {a})}} \\text{{ and }} \\boxed{{({c}, {a})}}", f"\\boxed{{({a}, {b})}}"]
    return gold, right, wrong


def _reward_labelled(rng, a, b, c):
    return rng.choice([
        (f"({a},{b})", [f"(p,q)=({a},{b})", f"(x, y) = ({a}, {b})", f"P=({a},{b})", f"P({a},{b})"],
         [f"(p,q)=({b},{a})", f"(x, y) = ({a}, {c})"]),
        (f"{a}, {b}", [f"AB={a}, CD={b}", f"AB = {a}, CD = {b}", f"x_1={a}, x_2={b}", f"m={a} \\text{{ and }} n={b}",
                       f"x = {a}, y = {b}"], [f"AB={a}, CD={c}", f"AB={a}"]),
        (f"{a}", [f"\\angle ABC = {a}^\\circ", f"S_{{\\triangle ABC}}={a}", f"BC = {a}", f"\\text{{Area}} = {a}",
                  f"f(2)={a}", f"a_{{10}} = {a}", f"\\overline{{AB}} = {a}", f"|AB| = {a}", f"m\\angle A = {a}^\\circ",
                  f"y_{{max}} = {a}"], [f"\\angle ABC = {b}^\\circ", f"BC = {a}+1", f"2x = {a}"]),
        (f"-\\frac{{{a}}}{{{b + 20}}}", [f"k=-\\frac{{{a}}}{{{b + 20}}}", f"\\sin A = -\\frac{{{a}}}{{{b + 20}}}"],
         [f"k=\\frac{{{a}}}{{{b + 20}}}", f"k=-\\frac{{{b + 20}}}{{{a}}}"]),
        (f"{a}\\sqrt{{3}}", [f"BC={a}\\sqrt{{3}}", f"AC = \\sqrt{{{3 * a * a}}}", f"r={a}\\sqrt{{3}}"],
         [f"BC={a}\\sqrt{{2}}", f"BC={a + 1}\\sqrt{{3}}"]),
        (f"{a}\\pi", [f"V = {a}\\pi", f"S={a}\\pi \\text{{ cm}}^2"], [f"V = {a + 1}\\pi", f"V = {a}"]),
    ])


def _reward_sets_intervals(rng, a, b, c):
    lo, hi = sorted(rng.sample(range(-9, 10), 2))
    return rng.choice([
        (f"x\\in[{lo},{hi}]", [f"{lo}\\le x\\le {hi}", f"[{lo}, {hi}]", f"{lo} \\leq x \\leq {hi}"],
         [f"{lo}<x\\le {hi}", f"[{lo},{hi + 1}]", f"{lo}\\le x<{hi}"]),
        (f"[{lo},{hi}]", [f"{lo}\\le x\\le {hi}", f"x\\in [{lo},{hi}]"], [f"({lo},{hi})", f"{lo}<x<{hi}"]),
        (f"({lo},{hi})", [f"{lo}<f(x)<{hi}", f"{lo}<x<{hi}", f"x\\in({lo},{hi})"], [f"{lo}\\le f(x)<{hi}", f"[{lo},{hi})"]),
        (f"(-\\infty,{lo})\\cup({hi},+\\infty)", [f"x<{lo} \\text{{ or }} x>{hi}", f"(-\\infty, {lo}) \\cup ({hi}, \\infty)"],
         [f"x<{lo} \\text{{ or }} x\\ge {hi}", f"(-\\infty,{lo}]\\cup({hi},+\\infty)"]),
        (f"x>{lo}", [f"({lo},+\\infty)", f"x\\in({lo},\\infty)", f"{lo}<x"], [f"[{lo},+\\infty)", f"x\\geq {lo}", f"x>{hi}"]),
        (f"[{lo},+\\infty)", [f"x\\geq {lo}", f"x \\ge {lo}", f"{lo} \\le x"], [f"x>{lo}", f"({lo},+\\infty)"]),
        (f"x\\le {lo}", [f"(-\\infty,{lo}]", f"(-\\infty, {lo}]"], [f"(-\\infty,{lo})", f"x<{lo}"]),
        (f"\\{{{lo},{hi},{hi + 1}\\}}", [f"\\{{{hi},{lo},{hi + 1}\\}}", f"{lo}, {hi}, {hi + 1}"],
         [f"\\{{{lo},{hi}\\}}", f"\\{{{lo},{hi},{hi + 2}\\}}"]),
    ])


def _reward_chains(rng, a, b, c):
    total = a + b + c
    return rng.choice([
        (f"{total}", [f"x = {a}+{b}+{c} = {total}", f"x \\approx {total}", f"\\approx {total}",
                      f"AB = {a} + {b} + {c} = {total}", f"S = \\frac{{{2 * total}}}{{2}} = {total}"],
                      [f"x = {a}+{b}+{c} = {total + 1}", f"x \\approx {total + 1}", f"x = {total} + 1 = {total + 1}"]),
        ("5", ["AB = \\sqrt{3^2+4^2} = 5", "AB=\\sqrt{25}=5", "x \\approx 5.0"], ["AB = \\sqrt{3^2+4^2} = 6", "x \\approx 5.1"]),
        (f"{a}.{b}", [f"x \\approx {a}.{b}", f"t\\approx {a}.{b} \\text{{ s}}", f"v = {a}.{b}", f"x≈{a}.{b}"],
         [f"x\\approx {a}.{b + 1}"]),
        (f"{total}", [f"= {total}", f"x = \\frac{{{2 * total}}}{{2}} = {total}", f"{total} \\text{{ cm}}",
                      f"S_{{\\triangle ABC}} = \\frac{{1}}{{2}} \\times 2 \\times {total} = {total}"],
         [f"= {total + 2}", f"x = \\frac{{{2 * total}}}{{2}} = {total + 1}"]),
    ])


def _reward_guarded_forms(rng, a, b, c):
    n = rng.randint(3, 12)
    points = [(rng.randint(-9, 9), rng.randint(-9, 9)) for _ in range(rng.randint(8, 12))]
    listing = ", ".join(f"({x}, {y})" for x, y in points)
    shuffled = ", ".join(f"({x}, {y})" for x, y in rng.sample(points, len(points)))
    broken = ", ".join(f"({x}, {y})" for x, y in points[:-1] + [(points[-1][0] + 1, points[-1][1])])
    return rng.choice([
        (f"\\frac{{{a}}}{{{b}}}", [f"\\cfrac{{{a}}}{{{b}}}", f"\\cfrac{{{2 * a}}}{{{2 * b}}}"], [f"\\cfrac{{{b}}}{{{a}}}"]),
        ("\\frac{2}{3}", ["\\cfrac{1}{1+\\cfrac{1}{2}}"], ["\\cfrac{1}{1+\\cfrac{1}{3}}"]),
        (f"\\begin{{pmatrix}}{a}&{b}\\\\{c}&{a + b}\\end{{pmatrix}}",
         [f"\\begin{{bmatrix}}{a} & {b} \\\\ {c} & {a + b}\\end{{bmatrix}}", f"\\begin{{pmatrix}} {a}&{b}\\\\ {c}&{a + b} \\end{{pmatrix}}"],
         [f"\\begin{{pmatrix}}{a}&{c}\\\\{b}&{a + b}\\end{{pmatrix}}", f"\\begin{{pmatrix}}{a}&{b}\\end{{pmatrix}}"]),
        (str(n * (n + 1) // 2), [f"\\sum_{{k=1}}^{{{n}}} k", f"\\sum_{{i=1}}^{{{n}}} i"], [f"\\sum_{{k=1}}^{{{n + 1}}} k", f"\\sum_{{k=2}}^{{{n}}} k"]),
        (f"z={a}-x-y", [f"x+y+z={a}", f"x + y + z - {a} = 0", f"{2 * a}=2x+2y+2z"], [f"x+y+z={a + 1}", f"x+y-z={a}"]),
        ("x+2y+3z=6", ["\\frac{x}{6}+\\frac{y}{3}+\\frac{z}{2}=1", "3z=6-x-2y"], ["\\frac{x}{6}+\\frac{y}{3}+\\frac{z}{3}=1"]),
        (f"\\frac{{{a}}}{{{b}}}", [f"\\tfrac{{{a}}}{{{b}}}", f"\\dfrac{{{3 * a}}}{{{3 * b}}}"], [f"\\tfrac{{{a + b}}}{{{b}}}"]),
        (f"\\begin{{pmatrix}}{a}\\\\{b}\\end{{pmatrix}}", [f"\\left(\\begin{{matrix}}{a}\\\\{b}\\end{{matrix}}\\right)",
                                                     f"\\begin{{bmatrix}} {a} \\\\ {b} \\end{{bmatrix}}"],
         [f"\\begin{{pmatrix}}{b}\\\\{a}\\end{{pmatrix}}", f"\\begin{{pmatrix}}{a}&{b}\\end{{pmatrix}}"]),
        (f"z={a}x+{b}y-{c}", [f"{a}x+{b}y-z={c}", f"z-{a}x-{b}y+{c}=0"], [f"{a}x+{b}y+z={c}", f"{a}x+{b}y-z={c + 1}"]),
        (listing, [shuffled, listing.replace(", ", ",")], [broken, ", ".join(listing.split(", ")[:-2])]),
    ])


def _reward_exact_rationals(rng, a, b, c):
    p, q = rng.choice([(1, 12), (1, 3), (2, 3), (1, 7), (5, 6), (4, 9), (7, 11), (1, 6), (13, 7), (3, 16)])
    long_decimal = _decimal(p / q, rng.choice([8, 10, 12, 16]))
    return rng.choice([
        (f"\\frac{{{p}}}{{{q}}}", [long_decimal, _decimal(p / q, 15), _decimal(p / q, 7), f"x = {long_decimal}"],
         [_decimal(p / q, 2), _decimal(p / q + 1e-4, 10)] + ([_decimal(p / q, 4)] if p * 10 ** 4 % q else [])),
        (f"-\\frac{{{p}}}{{{q}}}", ["-" + long_decimal], [long_decimal, "-" + _decimal(p / q, 3)]),
        (_decimal(p / q, 16), [f"\\frac{{{p}}}{{{q}}}", f"{p}/{q}"], [f"\\frac{{{p + 1}}}{{{q}}}", f"\\frac{{{p}}}{{{q + 1}}}"]),
    ])


REWARD_KINDS = {  # kind -> (rng, a, b, c) -> (gold, right forms, wrong forms); a, b, c distinct in 1..19
    "several boxes": _reward_several_boxes,
    "labelled answers": _reward_labelled,
    "sets, intervals, inequalities": _reward_sets_intervals,
    "chains, approximations": _reward_chains,
    "forms cut off by guards": _reward_guarded_forms,
    "exact rationals vs long decimals": _reward_exact_rationals,
}


def reward_forms(kind, rng):
    """(gold, right forms, wrong forms) of one generated answer of `kind` (REWARD_KINDS): bare
    answers as they appear inside the answer block, right forms equal to the gold, wrong forms
    the near misses of the same shape."""
    a, b, c = rng.sample(range(1, 20), 3)
    return REWARD_KINDS[kind](rng, a, b, c)



def reward_cases(per_kind, seed=0):
    """(kind, gold, answer, right) rows: per_kind generated answers of each kind."""
    rng = random.Random(seed)
    rows = []
    for kind in REWARD_KINDS:
        made = 0
        while made < per_kind:
            gold, right, wrong = reward_forms(kind, rng)
            rows += [(kind, gold, answer, True) for answer in right] + [(kind, gold, answer, False) for answer in wrong]
            made += 1
    return rows


def check_reward(per_kind):
    """rewards.reward on a Vision-R1 response around each generated answer; math-verify's default
    verdict (parse of "$answer$", verify) beside it for reference."""
    import math_verify
    import rewards
    rows = reward_cases(per_kind)
    slowest, results = 0.0, []
    for kind, gold, answer, right in rows:
        start = time.thread_time()
        value = rewards.reward(answer_block(answer), gold)
        slowest = max(slowest, time.thread_time() - start)
        reference = math_verify.verify(math_verify.parse(f"${gold}$"), math_verify.parse(f"${answer}$"))
        results.append((kind, gold, answer, right, value == 1.0, reference))
    print(f"training reward: {len(rows)} generated answers; slowest call {slowest:.3f} s of CPU time")
    for kind in REWARD_KINDS:
        mine = [r for r in results if r[0] == kind]
        right = [r for r in mine if r[3]]
        wrong = [r for r in mine if not r[3]]
        print(f"  {kind}: right forms accepted {sum(r[4] for r in right)}/{len(right)} "
              f"(math-verify {sum(r[5] for r in right)}), wrong accepted {sum(r[4] for r in wrong)}/{len(wrong)} "
              f"(math-verify {sum(r[5] for r in wrong)})")
    right = [r for r in results if r[3]]
    wrong = [r for r in results if not r[3]]
    print(f"  all kinds: right forms accepted {sum(r[4] for r in right)}/{len(right)} = "
          f"{100 * sum(r[4] for r in right) / len(right):.1f}%, wrong accepted {sum(r[4] for r in wrong)}/{len(wrong)}")
    for kind, gold, answer, is_right, accepted, reference in results:
        if accepted != is_right:
            print(f"  {'rejected right' if is_right else 'ACCEPTED WRONG'} ({kind}): {answer!r} for gold {gold!r}")
    return sum(r[4] for r in right) / len(right), sum(r[4] for r in wrong)


# ----------------------------------------------------------------------------- entry point

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="*", default=["mmmath", "mathverse", "reward"],
                        help="mmmath, mathverse, reward (default: all three)")
    parser.add_argument("--pairs", type=int, default=2000, help="generated MM-Math answer pairs")
    parser.add_argument("--answers", type=int, default=40, help="generated answers per kind for the reward check")
    parser.add_argument("--official-python", help="interpreter with sympy + antlr4 4.11 to run eval.py unchanged")
    parser.add_argument("--official-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.official_worker:
        return official_worker()
    if "mmmath" in args.what:
        check_mmmath(args.pairs, args.official_python)
    if "mathverse" in args.what:
        check_mathverse()
    if "reward" in args.what:
        check_reward(args.answers)


if __name__ == "__main__":
    main()
