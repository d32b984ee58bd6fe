"""Benchmark evaluation as the papers score it: MathVista testmini, MathVerse testmini, MM-Math, the
general benchmarks of the LlamaV-CI table (MMStar, ChartQA, MME, HallusionBench) and the synthetic
world's test split (docs/method.md §4).

    python evaluate.py --model runs/toy/base/final --model runs/toy/ci/final --bench synthetic
    torchrun --nproc_per_node 8 evaluate.py --model Vision-R1-7B \\
        --bench mathvista --data mathvista/testmini.parquet --bench mathverse --data mathverse/testmini.json

Protocol defaults are the paper's: the benchmark's question and image, no format instruction and no
system turn beyond the chat template's, temperature 0.6, top-p 0.95, up to 16,000 new tokens, one
sample per prompt. `--greedy` decodes by argmax; `--n K` draws K samples and adds pass@K and mean@K;
`--retry-until-answer K` redraws a response without `</answer>` up to K times, as the authors'
patched scorer does with 5 (it inflates scores, and every table says so next to the score).

Benchmark files (`--data`, one per `--bench`, in order), JSON / JSON lines / Hugging Face parquet;
image paths are relative to the data file, parquet images are embedded:
  mathvista  pid, query (the prompt: the question with its hint line), question, image or
             decoded_image, choices, precision, answer, question_type, answer_type, metadata {task, skills}
  mathverse  sample_index, problem_version, query_wo (the prompt), question, question_for_eval,
             image, answer, question_type (multi-choice | free-form), metadata {subject, subfield}
  mmmath     question (the prompt), file_name or image, solution (with \\boxed{}), difficult
             (容易 / 普通 / 困难), year (七年级上学期 ...), knowledge
  mmstar     index, question (the prompt, its options after "Options:" as "A: x, B: y"), image,
             answer (the option letter), category, l2_category (Lin-Chen/MMStar val)
  chartqa    question (the prompt), image, answer, type (human_test | augmented_test) (lmms-lab/ChartQA test)
  mme        question_id (the image's path: its two questions share it), question (the prompt, with
             "Please answer yes or no."), image, answer (Yes | No), category (the subtask) (lmms-lab/MME)
  hallusionbench  category (VD | VS), subcategory, visual_input, set_id, figure_id, question_id,
             question (the prompt), gt_answer (1: yes, 0: no), image or filename (none for the
             questions asked without a figure): the official HallusionBench.json, or lmms-lab's
             parquet splits image and non_image joined in one file
  synthetic  our problem records (data.py), the default being runs/toy/data/test.jsonl

Scoring is rule-based, per benchmark as scoring.py implements each official evaluation; the
synthetic split is scored by the training reward (rewards.reward: format and answer both right,
hedged and truncated answers 0). `--judge URL --judge-model NAME` hands the official pipelines' GPT
steps (MathVista extraction where the rules find nothing, MathVerse extraction and judgement) to an
OpenAI-compatible model, as the official scripts do with GPT-4o-mini. Every summary names the rule
and the judge that scored it.

Outputs, per benchmark and model, under --out (default runs/eval):
  <bench>/<model>/samples.jsonl   one line per sample: id, sample, response, extracted, gold,
                                  correct, format_ok, truncated, tokens, attempts, judged_by,
                                  categories
  <bench>/<model>/summary.json    accuracy, official breakdowns, format / truncation rates, mean
                                  response tokens, share and accuracy per response-length bucket
                                  (--length-buckets: the paper's 0-4K / 4-8K / 8K+), settings
  <bench>/<model>/report.md       the same as a markdown table
  <bench>/<model>/settings.json   the protocol the samples were drawn with
A folder that holds samples is refused unless --resume, which skips the prompts already scored
(each rank appends to samples.rank<r>.jsonl, flushed per sample; rank 0 folds them into
samples.jsonl) and refuses to mix samples drawn with other settings.
"""

import argparse
import bisect
import dataclasses
import functools
import glob
import json
import os
import re
import sys
from collections import Counter, defaultdict

import torch
import torch.distributed as dist
from tqdm import tqdm

import chat_client
import data
import generate
import model as M
import rewards
import scoring
import synthetic
from train_utils import at_least, check_run_folder, command_line, init_distributed

GENERAL_BENCHES = ("mmstar", "chartqa", "mme", "hallusionbench")
BENCHES = ("synthetic", "mathvista", "mathverse", "mmmath", *GENERAL_BENCHES)
DEFAULT_DATA = {"synthetic": "runs/toy/data/test.jsonl"}
# The text the model is given. MathVista: `query`, the official prompt (the question after a hint
# line naming the answer form); MathVerse: `query_wo`, the official query for models that are not
# told to reason (lmms-eval's and VLMEvalKit's choice); a reasoning model reasons anyway.
PROMPT_FIELDS = {"synthetic": "question", "mathvista": "query", "mathverse": "query_wo", "mmmath": "question",
                 **{bench: "question" for bench in GENERAL_BENCHES}}
ID_FIELDS = {"mathvista": "pid", "mathverse": "sample_index", "mmstar": "index"}  # others: <bench>-<line>
REQUIRED_FIELDS = {
    "synthetic": (),
    "mathvista": ("pid", "question_type", "answer_type", "answer"),
    "mathverse": ("sample_index", "problem_version", "question_type", "answer"),
    "mmmath": ("solution",),
    "mmstar": ("index", "answer"),
    "chartqa": ("answer",),
    "mme": ("question_id", "category", "answer"),
    "hallusionbench": ("category", "subcategory", "set_id", "figure_id", "question_id", "gt_answer"),
}
RULES = {
    "synthetic": "rewards.reward: the hard format-result training reward (format and answer both right; "
                 "hedged or truncated answers score 0)",
    "mathvista": "MathVista official rules (answer block, else quick extraction; normalised to the answer "
                 "type; exact match), no GPT extraction",
    "mathverse": "MathVerse answer block: the official rule-based match (answer == gold), otherwise our rules "
                 "(the options an answer names; symbolic equivalence) where the official pipeline asks GPT, unless "
                 "a model judge is named (GPT extraction, GPT 0/1 judgement)",
    "mmmath": "MM-Math official judge (eval.py AutoScoringJudge.judge, precision 1e-2, its quirks included) on what "
              "Vision-R1's evaluation reads (`<answer> Final Answer:X </answer>`, else the whole response); "
              "a response sympy works on for more than 5 s scores 0",
    "mmstar": "MMStar by VLMEvalKit's exact matching (matching_util.can_infer: the option letter, else the option "
              "text) on the <answer> block, else the whole response",
    "chartqa": "ChartQA relaxed accuracy (pix2struct relaxed_correctness: within 5% of a numeric answer, else exact "
               "match, case-insensitive) on the <answer> block, else the whole response",
    "mme": "MME eval_tool calculation.py (parse_pred_ans yes/no; per subtask acc + acc+, summed into perception and "
           "cognition) on the <answer> block, else the whole response",
    "hallusionbench": "HallusionBench utils.py aAcc / fAcc / qAcc, each answer read by VLMEvalKit's YOrN_Extraction "
                      "(the official pipeline asks GPT-4) on the <answer> block, else the whole response",
}
RETRY_NOTE = "a response without </answer> was redrawn up to {k} times (the authors' protocol; inflates scores)"

IMAGE_FIELDS = ("decoded_image", "image", "file_name", "filename")  # a benchmark row's image, first present
HALLUSIONBENCH_KEYS = ("category", "subcategory", "set_id", "figure_id", "question_id")  # a question on a figure
TASK_ABBREVIATIONS = {name: abbreviation for abbreviation, name in scoring.MATHVISTA_TASKS.items()}
SKILL_ABBREVIATIONS = {name: abbreviation for abbreviation, name in scoring.MATHVISTA_SKILLS.items()}
MATHVERSE_VERSIONS = ("Text Dominant", "Text Lite", "Vision Intensive", "Vision Dominant", "Vision Only")
# MM-Math's labels as eval.py reads them, named as its leaderboard names them.
MMMATH_DIFFICULTIES = {"容易": "easy", "普通": "medium", "困难": "hard"}
MMMATH_GRADES = {"七": "seven", "八": "eight", "九": "nine"}  # 七年级上学期: grade seven, first term
MMMATH_KNOWLEDGE = {"Transformations of Shapes": "Trans", "Properties of Shapes": "Shape", "Functions": "Func"}
CATEGORY_ORDER = {"kind": synthetic.KINDS, "task": tuple(scoring.MATHVISTA_TASKS),
                  "skill": tuple(scoring.MATHVISTA_SKILLS), "version": MATHVERSE_VERSIONS,
                  "difficulty": tuple(MMMATH_DIFFICULTIES.values()), "grade": tuple(MMMATH_GRADES.values()),
                  "knowledge": tuple(MMMATH_KNOWLEDGE.values()),
                  "subtask": sum(scoring.MME_SUBTASKS.values(), ()), "split": ("human", "augmented")}


# ----------------------------------------------------------------------------- loading benchmarks

def benchmark_problem(bench, raw):
    """A benchmark row in the layout data.problem_record checks: the prompt text as `question`,
    the row's own fields (images aside) in `meta`, where scoring and breakdowns read them."""
    if not isinstance(raw, dict):
        raise data.BadInput(f"not a record: expected a JSON object, got {type(raw).__name__}")
    missing = [key for key in REQUIRED_FIELDS[bench] if raw.get(key) in (None, "")]
    if bench == "mathvista" and raw.get("answer_type") == "float" and raw.get("precision") is None:
        missing.append("precision (the answer is a float)")
    if missing:
        raise data.BadInput(f"missing field: {', '.join(missing)}")
    if bench == "synthetic":
        return raw
    images = next((raw[key] for key in IMAGE_FIELDS if raw.get(key)), None)
    problem = {"id": raw.get(ID_FIELDS.get(bench)), "images": images, "question": raw.get(PROMPT_FIELDS[bench]),
               "answer": raw["solution"] if bench == "mmmath" else gold_answer(bench, raw),
               "meta": {key: value for key, value in raw.items() if key not in (*data.IMAGE_KEYS, *IMAGE_FIELDS)}}
    if bench == "hallusionbench":  # unique, as the official get_eval_all asserts
        problem["id"] = "_".join(str(raw[key]) for key in HALLUSIONBENCH_KEYS)
    if bench == "mathvista":
        problem.update(choices=raw.get("choices"), answer_type=raw["answer_type"])
    return problem


def gold_answer(bench, raw):
    """The answer a row is scored against, checked where the rule needs a form: an MMStar answer is
    an option letter of its question, an MME answer Yes or No, a HallusionBench gt_answer 1 or 0
    (read as Yes / No, the labels its rule compares). Raises data.BadInput otherwise."""
    answer = str(raw.get("gt_answer" if bench == "hallusionbench" else "answer"))
    options = scoring.mmstar_options(raw.get("question") or "") if bench == "mmstar" else {}
    if bench == "mmstar" and answer not in options:
        raise data.BadInput(f"bad answer: {answer!r} is not one of the question's options ({', '.join(options)})")
    if bench == "mme" and answer.lower() not in ("yes", "no"):
        raise data.BadInput(f"bad answer: {answer!r} is not Yes or No")
    if bench == "hallusionbench":
        if answer not in ("1", "0"):
            raise data.BadInput(f"bad gt_answer: {answer!r} is not 1 or 0")
        return "Yes" if answer == "1" else "No"
    return raw["answer"]


def load_benchmark(bench, path, skip_bad=False):
    """Problem records of a benchmark file, images checked, as data.load_problems returns them.

    Bad rows raise data.DataError listing `file:line: reason` for every one; with skip_bad they are
    left out and counted on stderr (no good row at all is still an error). Rows without an id
    (MM-Math) get `<bench>-<line>`.
    """
    base_dir = os.path.dirname(os.path.abspath(path))
    records, bad, first_line_of = [], [], {}
    total = 0
    for line, raw in data.read_entries(path):
        total += 1
        try:
            if isinstance(raw, data.BadInput):
                raise raw
            record = data.problem_record(benchmark_problem(bench, raw), base_dir, f"{bench}-{line}")
            if record["id"] in first_line_of:
                raise data.BadInput(f"duplicate id: {record['id']!r} (first on line {first_line_of[record['id']]})")
            for source in record["images"]:
                data.load_image(source)
        except data.BadInput as e:
            bad.append(f"{path}:{line}: {e}")
            continue
        first_line_of[record["id"]] = line
        records.append(record)
    if bad and not (skip_bad and records):
        raise data.DataError("\n".join([f"{path}: {len(bad)} bad of {total} {bench} records", *bad]))
    if bad:
        print(f"{path}: skipped {len(bad)} of {total} {bench} records", file=sys.stderr)
    return records


def categories(bench, record):
    """The official breakdown labels of a record, {dimension: [labels]}: MathVista by task and skill
    (a problem has one task and often several skills), MathVerse by problem version and subject,
    MM-Math by difficulty, grade and knowledge point, MMStar by category and l2_category, ChartQA by
    split (human, augmented), MME by subtask, HallusionBench by
    category (VD, VS) and subcategory, the synthetic world by question kind.

    A MathVista geometry problem -> {"task": ["GPS"], "skill": ["ALG", "GEO"]}.
    """
    meta = record["meta"]
    labels = {}
    if bench == "synthetic" and "kind" in meta:
        labels["kind"] = [meta["kind"]]
    elif bench == "mathvista":
        info = meta.get("metadata") or {}
        if info.get("task"):
            labels["task"] = [TASK_ABBREVIATIONS.get(info["task"], info["task"])]
        if info.get("skills"):
            labels["skill"] = [SKILL_ABBREVIATIONS.get(skill, skill) for skill in info["skills"]]
    elif bench == "mathverse":
        labels["version"] = [meta["problem_version"]]
        if (meta.get("metadata") or {}).get("subject"):
            labels["subject"] = [meta["metadata"]["subject"]]
    elif bench == "mmmath":
        if meta.get("difficult"):
            labels["difficulty"] = [MMMATH_DIFFICULTIES.get(meta["difficult"], meta["difficult"])]
        if meta.get("year"):
            labels["grade"] = [MMMATH_GRADES.get(meta["year"][:1], meta["year"])]
        knowledge = meta.get("knowledge") or ""
        points = [label for point, label in MMMATH_KNOWLEDGE.items() if point in knowledge]
        if points:
            labels["knowledge"] = points
    elif bench == "mmstar":
        labels = {key: [meta[key]] for key in ("category", "l2_category") if meta.get(key)}
    elif bench == "chartqa" and meta.get("type"):
        labels["split"] = [meta["type"].removesuffix("_test")]
    elif bench == "mme":  # perception and cognition are official_scores' sums
        labels["subtask"] = [meta["category"]]
    elif bench == "hallusionbench":
        labels = {"category": [meta["category"]], "subcategory": [meta["subcategory"]]}
    return labels


def pairing(bench, record):
    """What the benchmark's own scores group questions by, None where they do not: MME's subtask
    and image (acc+), HallusionBench's category, subcategory, set, figure and question (fAcc, qAcc)."""
    meta = record["meta"]
    if bench == "mme":
        return {"subtask": meta["category"], "image": meta["question_id"]}
    if bench == "hallusionbench":
        return {key: meta[key] for key in HALLUSIONBENCH_KEYS}
    return None


# ----------------------------------------------------------------------------- optional model judge

MATHVISTA_EXTRACT_PROMPT = """Extract the final answer from a model's response to a math question about an image. \
Reply with the answer alone: an option letter, a number, a word or a list, as the question asks.

Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the end.
Question: How many birds are on the fence?
Model response: Counting from left to right I see five birds, so there are 5.
Extracted answer: 5

Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.
Question: Which shape is largest?
Choices:
(A) circle
(B) square
Model response: The square covers the most area, so the answer is the square.
Extracted answer: B

{query}
Model response: {response}
Extracted answer:"""

MATHVERSE_EXTRACT_PROMPT = """Extract the final answer from a model's response to a math problem. Reply with \
the answer alone; reply null when the response gives none.

Model response: The two lines meet at (-2, 1), which is the solution.
Extracted answer: (-2, 1)

Model response: Comparing the options, the answer is D. The angle is 50°.
Extracted answer: D

Model response: There is not enough information to find y.
Extracted answer: null

Model response: {response}
Extracted answer:"""

MATHVERSE_JUDGE_PROMPT = """Below are a math question, its standard answer and the answer extracted from a \
model's response. Decide whether the model's answer is consistent with the standard answer. For a \
multiple-choice question only the same option is consistent; otherwise the same value expressed \
differently (0.5 m and 50 cm) is consistent. Reply 1 if consistent, 0 if not.

[Question]: What is the length of BC?
Choices:
A:2
B:2√3
[Standard Answer]: B
[Model_answer]: A:2
Judgement: 0

[Question]: {question}
[Standard Answer]: {gold}
[Model_answer]: {answer}
Judgement:"""


class Judge:
    """The GPT steps of the official pipelines (the official scripts call GPT-4o-mini), asked of any
    OpenAI-compatible chat model (chat_client): MathVista's answer extraction where
    the rules read none (no answer, or one that fails the integer / float cast: "5 cm"), from the
    answer block when there is one, as the authors' patched scorer passes it on; MathVerse's
    extraction where the response has no answer block, and its 0/1 consistency judgement where the
    answer is not the gold answer verbatim. The prompts follow the official ones in structure
    (instruction, worked examples, the case) in our own words.

    `backend` answers `ask(chat_client.Request)` with a Reply; `name` is recorded with every
    sample it scored.
    """

    def __init__(self, backend, name):
        self.backend, self.name = backend, name

    def ask(self, prompt):
        return self.backend.ask(chat_client.Request("judge", prompt, [], {})).text.strip()

    def extract_mathvista(self, query, response):
        return self.ask(MATHVISTA_EXTRACT_PROMPT.format(query=query, response=response))

    def extract_mathverse(self, response):
        """The extracted answer, or None when the judge says the response has none ("null")."""
        answer = self.ask(MATHVERSE_EXTRACT_PROMPT.format(response=response))
        return None if answer.lower() in ("", "null") else answer

    def consistent(self, question, gold, answer):
        """MathVerse's judgement; a reply other than 0 or 1 counts as 0, as the official script's
        last resort does."""
        return self.ask(MATHVERSE_JUDGE_PROMPT.format(question=question, gold=gold, answer=answer)) == "1"


# ----------------------------------------------------------------------------- scoring

def score_sample(bench, record, completion, attempts=1, judge=None):
    """One completion scored by its benchmark's rule (RULES); returns the per-sample row.

    `extracted` is the answer the rule read (None when it found none), `gold` the answer it compared
    with, `tokens` the response length without its stop token, `truncated` whether the response hit
    the token cap, `judged_by` the Judge's name where one was asked (MathVista, MathVerse), else None.
    Example: MathVista multi_choice with choices ["3", "4"] and answer "4": the response
    "<think>...</think><answer> Final Answer:B </answer>" -> extracted "B", correct True.
    """
    text = completion.text or ""
    truncated = completion.finish_reason == "length"
    meta = record["meta"]
    judged = False
    if bench == "synthetic":
        extracted = rewards.extract_answer(text)
        gold = record["answer"]
        correct = rewards.reward(text, gold, record["choices"], record["answer_type"], truncated) == 1.0
    elif bench == "mathvista":
        extraction = scoring.extract_mathvista_answer(text, meta)
        unreadable = not extraction or scoring.normalize_mathvista_extraction(extraction, meta) is None
        if judge is not None and text and unreadable:  # where the official rules read no answer, GPT extracts
            extraction, judged = judge.extract_mathvista(record["question"], extraction or text), True
        extracted, gold = extraction or None, meta["answer"]
        correct = scoring.score_mathvista(meta, extraction)
    elif bench == "mathverse":
        extracted, gold = rewards.extract_answer(text), meta["answer"]
        # the official judge reads the options from question_for_eval (Vision Only rows have no question)
        question = meta.get("question_for_eval") or meta.get("question") or ""
        if judge is None:
            correct = scoring.score_mathverse({**meta, "question": question}, text)
        else:
            if extracted is None and text:
                extracted, judged = judge.extract_mathverse(text), True
            # the official prefetch: an extraction equal to the gold answer needs no judgement
            if extracted is not None and extracted.strip() != gold.strip():
                correct, judged = judge.consistent(question, gold, extracted), True
            else:
                correct = extracted is not None
    elif bench == "mmmath":
        extracted = rewards.extract_answer(text) or scoring.mmmath_final_answer(text)
        gold = scoring.mmmath_final_answer(meta["solution"]) or meta["solution"]
        correct = scoring.score_mmmath({"answer": meta["solution"]}, text)
    elif bench in GENERAL_BENCHES:
        extracted, correct = general_verdict(bench, record, scoring.benchmark_prediction(text))
        gold = record["answer"]
    else:
        raise ValueError(f"unknown benchmark {bench!r}; expected one of {BENCHES}")
    return {"id": record["id"], "sample": completion.sample, "response": text, "extracted": extracted,
            "gold": gold, "correct": bool(correct), "format_ok": rewards.format_ok(text), "truncated": truncated,
            "tokens": len(completion.token_ids) - (completion.finish_reason == "stop"), "attempts": attempts,
            "judged_by": judge.name if judged else None, "categories": categories(bench, record),
            "pairing": pairing(bench, record)}


def general_verdict(bench, record, prediction):
    """(what the rule read, whether it is right) for a general benchmark (RULES): MMStar's option
    letter (None: none read), ChartQA's stripped prediction, MME's yes / no / other, HallusionBench's
    Yes / No / Unknown. MME, answer "No": "No, there is none." -> ("no", True)."""
    gold = record["answer"]
    if bench == "mmstar":
        letter = scoring.mmstar_choice(prediction, scoring.mmstar_options(record["question"]))
        return letter, letter == gold
    if bench == "chartqa":
        return prediction.strip(), scoring.chartqa_relaxed_correct(gold, prediction)
    if bench == "mme":
        label = scoring.mme_answer(prediction)
        return label, label == gold.lower()
    label = scoring.yes_or_no(prediction)
    return label, label == gold


def ordered_labels(dimension, labels):
    """Labels in the official order where there is one (MathVerse versions, MM-Math difficulty ...),
    any others after them, sorted."""
    known = CATEGORY_ORDER.get(dimension, ())
    return [label for label in known if label in labels] + sorted(label for label in labels if label not in known)


OFFICIAL_SCORES = {
    "mme": lambda rows: scoring.mme_scores([(r["pairing"]["subtask"], r["pairing"]["image"], r["correct"])
                                            for r in rows]),
    "hallusionbench": lambda rows: scoring.hallusionbench_scores([{**r["pairing"], "correct": r["correct"]}
                                                                  for r in rows]),
}


def mean_scores(passes):
    """The key-wise mean of score dicts of the same keys (nested dicts too)."""
    return {key: mean_scores([p[key] for p in passes]) if isinstance(passes[0][key], dict)
            else sum(p[key] for p in passes) / len(passes) for key in passes[0]}


def official_scores(bench, rows):
    """The benchmark's own scores of the rows (OFFICIAL_SCORES: MME's perception and cognition,
    HallusionBench's aAcc, fAcc, qAcc). With n samples per prompt each sample index is one pass over
    the benchmark, and the scores are the mean over the passes."""
    samples = sorted({row["sample"] for row in rows})
    return mean_scores([OFFICIAL_SCORES[bench]([row for row in rows if row["sample"] == j]) for j in samples])


LENGTH_EDGES = (4096, 8192)  # the paper's CI analysis: outputs of 0-4K, 4-8K and 8K+ tokens (docs/method.md §3)


def length_buckets(rows, edges=LENGTH_EDGES):
    """Share of samples and accuracy per response-length bucket, bucket k holding lengths in
    (edges[k-1], edges[k]]: the paper's over-thinking analysis of Vision-R1-CI (its accuracy falls
    from 41% at 0-4K to 7% at 8K+). An empty bucket's accuracy is None.

    Rows of 100 tokens (correct), 100 (wrong) and 5000 (wrong) with edges (4096, 8192) ->
    {"0-4096": {"share": 2/3, "accuracy": 0.5, "samples": 2},
     "4097-8192": {"share": 1/3, "accuracy": 0.0, "samples": 1},
     ">8192": {"share": 0.0, "accuracy": None, "samples": 0}}
    """
    outcomes = [[] for _ in range(len(edges) + 1)]
    for row in rows:  # the first edge >= its length: 4096 -> bucket 0, 4097 -> 1, 9000 -> 2
        outcomes[bisect.bisect_left(edges, row["tokens"])].append(row["correct"])
    labels = [f"{low + 1 if low else 0}-{high}" for low, high in zip((0, *edges), edges)] + [f">{edges[-1]}"]
    return {label: {"share": len(inside) / len(rows), "accuracy": sum(inside) / len(inside) if inside else None,
                    "samples": len(inside)} for label, inside in zip(labels, outcomes)}


def length_edges(text):
    """--length-buckets: increasing positive integers, '128,256' -> (128, 256)."""
    try:
        edges = tuple(int(edge) for edge in text.split(","))
    except ValueError:
        edges = ()
    if not edges or min(edges) <= 0 or list(edges) != sorted(set(edges)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected increasing positive integers, e.g. 4096,8192")
    return edges


def summarize(bench, rows, edges=LENGTH_EDGES):
    """Overall and per-category accuracy of per-sample rows (score_sample's), with the means.

    accuracy: correct samples / samples (with n samples per prompt this is mean@n, also given as
    such, next to pass@n: the share of prompts with at least one correct sample). Breakdowns count
    samples, so a MathVista problem with two skills counts once in each. format_rate, truncation_rate,
    mean_tokens: over samples; regenerated: samples drawn more than once (--retry-until-answer);
    judge: the model judges that scored any of them (None: the rules alone); official: the
    benchmark's own scores where they are more than the accuracy (official_scores: MME, HallusionBench).
    Rows [a: correct, b: wrong] of prompts a (task GPS) and b (task FQA) -> accuracy 0.5,
    breakdown {"task": {"GPS": {"accuracy": 1.0, "correct": 1, "total": 1}, "FQA": {... 0.0, 0, 1}}}.
    by_length: length_buckets of the rows at `edges`.
    """
    if not rows:
        raise ValueError(f"{bench}: no scored samples to summarize")
    outcomes = defaultdict(list)
    for row in rows:
        outcomes[row["id"]].append(row["correct"])
    n = max(len(samples) for samples in outcomes.values())
    total = len(rows)
    summary = {"bench": bench, "scored_by": RULES[bench], "prompts": len(outcomes), "samples": total,
               "samples_per_prompt": n, "accuracy": sum(row["correct"] for row in rows) / total,
               "format_rate": sum(row["format_ok"] for row in rows) / total,
               "truncation_rate": sum(row["truncated"] for row in rows) / total,
               "mean_tokens": sum(row["tokens"] for row in rows) / total,
               "regenerated": sum(row["attempts"] > 1 for row in rows),
               "judge": sorted({row["judged_by"] for row in rows if row["judged_by"]}) or None,
               "by_length": length_buckets(rows, edges)}
    if n > 1:
        summary[f"pass@{n}"] = sum(any(samples) for samples in outcomes.values()) / len(outcomes)
        summary[f"mean@{n}"] = summary["accuracy"]
    counts = defaultdict(lambda: defaultdict(Counter))
    for row in rows:
        for dimension, labels in row["categories"].items():
            for label in labels:
                counts[dimension][label].update(correct=int(row["correct"]), total=1)
    if bench in OFFICIAL_SCORES:
        summary["official"] = official_scores(bench, rows)
    summary["breakdown"] = {
        dimension: {label: {"accuracy": by_label[label]["correct"] / by_label[label]["total"],
                            "correct": by_label[label]["correct"], "total": by_label[label]["total"]}
                    for label in ordered_labels(dimension, by_label)}
        for dimension, by_label in counts.items()}
    return summary


# ----------------------------------------------------------------------------- reports

def percent(fraction):
    return f"{100 * fraction:.1f}"


def markdown_table(summaries):
    """One markdown table per benchmark, one row per model: accuracy (%) and pass@n when n > 1, the
    benchmark's own scores (MME's points, HallusionBench's %), every breakdown category (%), format
    and truncation rates (%), mean response tokens; below it the rule that scored it and, when
    responses were redrawn until </answer>, a note that says so (the score itself is marked)."""
    blocks = []
    for bench in dict.fromkeys(s["bench"] for s in summaries):
        group = [s for s in summaries if s["bench"] == bench]
        passes = sorted({key for s in group for key in s if key.startswith("pass@")})
        official = list(dict.fromkeys(key for s in group for key, value in s.get("official", {}).items()
                                      if not isinstance(value, dict)))
        columns = []
        for dimension in dict.fromkeys(d for s in group for d in s["breakdown"]):
            labels = {label for s in group for label in s["breakdown"].get(dimension, {})}
            columns += [(dimension, label) for label in ordered_labels(dimension, labels)]
        header = ["model", "accuracy", *passes, *official, *(label for _, label in columns),
                  "format", "truncated", "tokens"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        retries = set()
        for s in group:
            retry = s.get("settings", {}).get("retry_until_answer", 0)
            accuracy = percent(s["accuracy"]) + (f" (redrawn ≤{retry}x)" if retry else "")
            retries.add(retry)
            cells = [s.get("model", "-"), accuracy, *(percent(s[key]) if key in s else "-" for key in passes),
                     *(f"{s['official'][key]:.1f}" if key in s.get("official", {}) else "-" for key in official)]
            for dimension, label in columns:
                entry = s["breakdown"].get(dimension, {}).get(label)
                cells.append(percent(entry["accuracy"]) if entry else "-")
            cells += [percent(s["format_rate"]), percent(s["truncation_rate"]), f"{s['mean_tokens']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        notes = [f"Scored by {RULES[bench]}."]
        judges = sorted({name for s in group for name in s["judge"] or ()})
        if judges:
            notes.append(f"Model judge where the official pipeline asks GPT: {', '.join(judges)}.")
        notes += [RETRY_NOTE.format(k=k).capitalize() + "." for k in sorted(retries) if k]
        blocks.append("\n".join(lines + [""] + notes))
    return "\n\n".join(blocks) + "\n"


def protocol(settings):
    """The sampling protocol in words, for reports."""
    decoding = "greedy" if settings["greedy"] else f"temperature {settings['temperature']}, top-p {settings['top_p']}"
    system = "given system prompt" if settings["system"] else "template's default system turn"
    return (f"{settings['n']} sample(s) per prompt, {decoding}, up to {settings['max_new_tokens']} new tokens, "
            f"prompt field `{PROMPT_FIELDS[settings['bench']]}`, {system}; data {settings['data']}")


def report(summary):
    """report.md: the benchmark, model and protocol, then markdown_table."""
    return (f"# {summary['bench']}: {summary['model']}\n\n{protocol(summary['settings'])}\n\n"
            + markdown_table([summary]))


# ----------------------------------------------------------------------------- sampling

def sample_until_answer(sample, prompts, n, retries):
    """n completions of each prompt from `sample(prompts, n=...)`; a completion without `</answer>` is
    drawn again, up to `retries` more times, and the last draw is kept (the authors' patched scorer,
    with 5: docs/method.md §4). Returns (completions, attempts of each)."""
    completions = sample(prompts, n=n)
    attempts = [1] * len(completions)
    for _ in range(retries):
        redo = [i for i, c in enumerate(completions) if "</answer>" not in (c.text or "")]
        if not redo:
            break
        fresh = sample([prompts[completions[i].prompt_index] for i in redo], n=1)
        for i, completion in zip(redo, fresh):
            completions[i] = dataclasses.replace(completion, prompt_index=completions[i].prompt_index,
                                                 sample=completions[i].sample)
            attempts[i] += 1
    return completions, attempts


def record_streams(sample, prompts, records):
    """sample_until_answer's `sample` for one batch, whose prompts are the benchmark's records
    `records` (their indices): a first draw takes sample j of record r from the stream
    (seed, r, j), redraw round a the record's k-th redrawn sample from (seed, stream_key(r, a, k), 0).
    Samples are then the same whatever the batch size and the number of ranks."""
    record_of, rounds = {id(p): r for p, r in zip(prompts, records)}, []

    def draw(some, n):
        seen, ids = Counter(), []
        for prompt in some:
            r = record_of[id(prompt)]
            ids.append(generate.stream_key(r, len(rounds), seen[r]) if rounds else r)
            seen[r] += 1
        rounds.append(len(some))
        return sample(some, n=n, prompt_ids=ids)
    return draw


# ----------------------------------------------------------------------------- resumable sample files

def consolidate(run_dir, order):
    """Fold the ranks' samples.rank<r>.jsonl into samples.jsonl: one row per (id, sample), the first
    kept, in benchmark order (`order`: id -> position; unknown ids last). Written to a temporary file
    and renamed, then the rank files are removed, so an interruption anywhere loses nothing."""
    target = os.path.join(run_dir, "samples.jsonl")
    rank_files = sorted(glob.glob(os.path.join(run_dir, "samples.rank*.jsonl")))
    if not rank_files:
        return
    rows, seen = [], set()
    for path in [target, *rank_files]:
        for row in data.read_append_only(path):
            if (row["id"], row["sample"]) not in seen:
                seen.add((row["id"], row["sample"]))
                rows.append(row)
    rows.sort(key=lambda row: (order.get(row["id"], len(order)), row["sample"]))
    with open(target + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(target + ".tmp", target)
    for path in rank_files:
        os.remove(path)


def check_settings(run_dir, settings):
    """Samples in run_dir must have been drawn with the same protocol; mixing two would score neither."""
    path = os.path.join(run_dir, "settings.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        previous = json.load(f)
    changed = [f"{key}: {previous.get(key)!r} -> {settings.get(key)!r}"
               for key in sorted(set(previous) | set(settings)) if previous.get(key) != settings.get(key)]
    if changed:
        raise SystemExit(f"{run_dir} holds samples drawn with other settings ({'; '.join(changed)}); "
                         "use another --out or remove that folder")


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- command line

def model_name(path):
    """A checkpoint's name in folders and tables: its folder, after the run's folder (and the
    schedule's, for a GRPO stage) when it is a checkpoint inside a run. "runs/toy/ci/final" ->
    "ci-final"; "runs/toy/grpo/long/stage1/final" -> "long-stage1-final"; "Vision-R1-7B" -> itself."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    if not re.fullmatch(r"final|step_\d+|checkpoint-\d+", parts[-1]):
        return parts[-1]
    if re.fullmatch(r"stage\d+", parts[-2]):
        return f"{parts[-3]}-{parts[-2]}-{parts[-1]}"
    return f"{parts[-2]}-{parts[-1]}"


def evaluate_one(model, processor, model_dir, bench, records, args, judge, rank, world, device):
    """Sample and score the records not yet in <out>/<bench>/<model name>, this rank's share of them;
    rank 0 then writes samples.jsonl, summary.json and report.md and returns the summary (others: None)."""
    name = model_name(model_dir)
    run_dir = os.path.join(args.out, bench, name)
    settings = {"bench": bench, "model": os.path.abspath(model_dir),
                "data": os.path.abspath(args.data_paths[bench]), "n": args.n, "greedy": args.greedy,
                "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
                "system": args.system, "retry_until_answer": args.retry_until_answer, "seed": args.seed,
                "judge": judge and f"{judge.name} at {args.judge}"}
    order = {record["id"]: i for i, record in enumerate(records)}
    os.makedirs(run_dir, exist_ok=True)
    check_settings(run_dir, settings)
    barrier()  # every rank has read the settings before rank 0 writes them
    if rank == 0:
        with open(os.path.join(run_dir, "settings.json"), "w") as f:
            json.dump(settings, f, indent=2)
        consolidate(run_dir, order)  # rows a killed run left in rank files
    barrier()
    done = Counter(row["id"] for row in data.read_append_only(os.path.join(run_dir, "samples.jsonl")))
    todo = [record for record in records if done[record["id"]] < args.n]
    shard = todo[rank::world]

    dtype = model.head_weight.dtype
    sample = functools.partial(generate.generate, model, eos_ids=processor.eos_token_ids,
                               max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                               greedy=args.greedy, seed=args.seed, tokenizer=processor.tokenizer,
                               kv_budget=generate.kv_budget_tokens(generate.decoder_config(model), dtype,
                                                                   args.kv_budget_gib, device))
    correct = scored = 0
    with open(os.path.join(run_dir, f"samples.rank{rank}.jsonl"), "a", encoding="utf-8") as out, \
            tqdm(total=len(shard), desc=f"{bench} {name}", disable=rank != 0) as progress:
        for start in range(0, len(shard), args.batch_size):
            batch = shard[start:start + args.batch_size]
            prompts = [processor.encode_problem(record, system=args.system) for record in batch]
            draw = record_streams(sample, prompts, [order[record["id"]] for record in batch])
            completions, attempts = sample_until_answer(draw, prompts, args.n, args.retry_until_answer)
            for completion, tries in zip(completions, attempts):
                row = score_sample(bench, batch[completion.prompt_index], completion, tries, judge)
                data.append_record(out, row)
                correct, scored = correct + row["correct"], scored + 1
            progress.update(len(batch))
            progress.set_postfix(accuracy=f"{correct / scored:.3f}")
    barrier()
    if rank != 0:
        return None
    consolidate(run_dir, order)
    rows = [row for row in data.read_append_only(os.path.join(run_dir, "samples.jsonl"))
            if row["id"] in order and row["sample"] < args.n]
    summary = {"model": name, "settings": settings, **summarize(bench, rows, args.length_buckets)}
    with open(os.path.join(run_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
    with open(os.path.join(run_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(report(summary))
    return summary


def log_to_wandb(run_name, summaries, out):
    """Every summary's numbers as eval/<bench>/<model>/<metric> (offline unless WANDB_MODE says otherwise)."""
    mode = os.environ.get("WANDB_MODE", "offline")
    if mode == "disabled":
        return
    import wandb

    metrics = {}
    for s in summaries:
        prefix = f"eval/{s['bench']}/{s['model']}"
        passes = [key for key in s if key.startswith("pass@")]
        for key in ("accuracy", "format_rate", "truncation_rate", "mean_tokens", *passes):
            metrics[f"{prefix}/{key}"] = s[key]
        for key, value in s.get("official", {}).items():
            if not isinstance(value, dict):
                metrics[f"{prefix}/{key}"] = value
        for dimension, by_label in s["breakdown"].items():
            for label, entry in by_label.items():
                metrics[f"{prefix}/{dimension}/{label}"] = entry["accuracy"]
    run = wandb.init(project="vision-r1", name=run_name, job_type="eval", dir=out, mode=mode)
    run.log(metrics)
    run.finish()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="checkpoint directory (repeat: one row each)")
    parser.add_argument("--bench", action="append", required=True, choices=BENCHES)
    parser.add_argument("--data", action="append", help="benchmark file, one per --bench in the same order "
                                                        "(default: runs/toy/data/test.jsonl for synthetic)")
    parser.add_argument("--out", default="runs/eval")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (temperature and top-p unused)")
    parser.add_argument("--n", type=at_least(1), default=1, help="samples per prompt (pass@n and mean@n when > 1)")
    parser.add_argument("--max-new-tokens", type=at_least(1), default=16000)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--batch-size", type=at_least(1), default=16, help="prompts per generate call on each rank")
    parser.add_argument("--kv-budget-gib", type=at_least(0, float), default=0.0,
                        help="KV cache of a generate call (0: half the free GPU memory; on CPU 2^18 tokens)")
    parser.add_argument("--limit", type=at_least(1), default=None, help="only the first N problems of each benchmark")
    parser.add_argument("--system", default=None, help="system prompt (default: the chat template's)")
    parser.add_argument("--retry-until-answer", type=at_least(0), default=0, metavar="K",
                        help="redraw a response without </answer> up to K times (authors: 5; inflates scores)")
    parser.add_argument("--length-buckets", type=length_edges, default=LENGTH_EDGES, metavar="E1,E2,...",
                        help="response-length bucket edges of the summary's accuracy by length (default: the "
                             "paper's 4096,8192; the synthetic world at 1/32: 128,256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attention", choices=M.ATTENTION_BACKENDS, default="flash",
                        help="flash: flash-attn's kernels on CUDA (refused if not installed); sdpa: PyTorch's")
    parser.add_argument("--skip-bad", action="store_true", help="skip and count bad benchmark rows")
    parser.add_argument("--resume", action="store_true",
                        help="continue the runs in --out: sample only the prompts not yet scored")
    parser.add_argument("--judge", metavar="URL", help="OpenAI-compatible server for the official pipelines' GPT "
                                                       "steps (MathVista extraction; MathVerse extraction, judgement)")
    parser.add_argument("--judge-model", metavar="NAME", help="the served judge model, e.g. gpt-4o-mini")
    parser.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding its API key")
    parser.add_argument("--wandb-run", default=None, help="log the summaries to this wandb run")
    args = parser.parse_args(argv)
    if args.data is not None and len(args.data) != len(args.bench):
        parser.error(f"{len(args.data)} --data for {len(args.bench)} --bench: give one per benchmark, in order")
    paths = args.data or [DEFAULT_DATA.get(bench) for bench in args.bench]
    if None in paths:
        parser.error(f"--bench {args.bench[paths.index(None)]} needs --data")
    if len(set(args.bench)) != len(args.bench):
        parser.error("a benchmark is given twice")
    args.data_paths = dict(zip(args.bench, paths))
    names = [model_name(path) for path in args.model]
    if len(set(names)) != len(names):
        parser.error(f"two checkpoints share a name ({', '.join(names)}); their outputs would collide")
    if bool(args.judge) != bool(args.judge_model):
        parser.error("--judge and --judge-model go together")
    return args


@command_line
def main(argv=None):
    """Evaluate every model on every benchmark; rank 0 prints the tables and returns the summaries."""
    args = parse_args(argv)
    for path in args.model:
        M.check_checkpoint(path)
        for bench in args.bench:
            check_run_folder(os.path.join(args.out, bench, model_name(path)), args.resume, "--out")
    rank, world, device = init_distributed()
    backend = M.set_attention(args.attention, device)
    if rank == 0:
        print(f"world {world} on {device.type}, attention {backend}", flush=True)
    benchmarks = {bench: load_benchmark(bench, path, args.skip_bad)[:args.limit]
                  for bench, path in args.data_paths.items()}
    judge = None
    if args.judge:
        backend = chat_client.OpenAIBackend(args.judge, args.judge_model, os.environ.get(args.judge_key_env),
                                               max_tokens=512, temperature=0.0)
        judge = Judge(backend, args.judge_model)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    summaries = []
    for path in args.model:
        processor = data.ChatProcessor(path)
        model = M.load_model(path, dtype=dtype, device=device).eval()
        for bench, records in benchmarks.items():
            summary = evaluate_one(model, processor, path, bench, records, args, judge, rank, world, device)
            if summary is not None:
                summaries.append(summary)
                print(f"{bench} {summary['model']}: accuracy {percent(summary['accuracy'])} -> "
                      f"{os.path.join(args.out, bench, summary['model'])}", flush=True)
        del model
    if dist.is_initialized():
        dist.destroy_process_group()
    if rank != 0:
        return None
    print(markdown_table(summaries), flush=True)
    if args.wandb_run:
        log_to_wandb(args.wandb_run, summaries, args.out)
    return summaries


if __name__ == "__main__":
    main()
