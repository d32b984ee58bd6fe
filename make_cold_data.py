"""Cold-start CoT data by modality bridging (docs/method.md §1): image-question-answer triples in,
Vision-R1-cold conversations out, with no human annotation.

    python make_cold_data.py build [--input runs/toy/data/train.jsonl] [--out runs/toy/cold/cold.jsonl]
        [--describer synthetic|openai|local] [--reasoner synthetic|openai|local]
        [--describer-url URL --describer-model NAME] [--reasoner-url URL --reasoner-model NAME]
        [--api-key-env OPENAI_API_KEY] [--concurrency 8] [--timeout 900] [--max-retries 5]
        [--shard i/N] [--error-rate P] [--seed S] [--skip-bad] [--resume]
    python make_cold_data.py stats FILE          # Table 2 reflection-word counts of any conversation file
    python make_cold_data.py rebalance --input CAPTIONS.jsonl --out OUT.jsonl

Per problem record (data.load_problems layout), `build` runs:
  1. pseudo_cot  the describer (an MLLM) sees the image, the question and the gold answer and writes a
                 caption and step-level reasoning;
  2. describe    the describer, given the image, question and pseudo-CoT, writes a detailed description;
  3. reason      the reasoner (a text-only R1 model) sees only the description, the question and the gold
                 answer as a hint, and thinks step by step; its reasoning text is kept;
  4. filters     answer equivalent to the gold answer, format, consistency of the CoT's conclusion with
                 the final answer, no language mixing, no runaway repetition, length bounds; references
                 to "the description" are rewritten to speak of "the image";
and appends a sharegpt record with the response `<think> COT </think><answer> Final Answer:X </answer>`
to OUT (images relative to OUT's folder), or the rejected response with its filter's name to
STEM.rejected.jsonl beside it (OUT = STEM.jsonl), one flushed line each. A record whose requests
fail for good is written nowhere. Outputs that hold records are refused unless --resume: the same
command with --resume skips every id already in either file, so a killed job loses at most its
in-flight requests and never writes a record twice, and retries what failed. STEM.summary.json counts every outcome (records = kept + filtered + failed +
pending) and gives the CoT statistics of the kept records. Workers that split a dataset run
`--shard i/N` each with its own --out; their outputs concatenate.

Backends, per step: `openai` (any OpenAI-compatible chat-completions server: vLLM, SGLang, the
DeepSeek API; the key comes from the environment variable named by --api-key-env), `local` (a
checkpoint run with generate.py; --describer-model / --reasoner-model is its directory) and
`synthetic` (the synthetic world's offline teachers, which need the records' meta.description).
"""

import argparse
import hashlib
import io
import json
import os
import re
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image
from tqdm import tqdm

import data
import rewards
import synthetic
from chat_client import BackendError, OpenAIBackend, Reply, Request
from train_utils import at_least, check_run_folder, command_line

# ----------------------------------------------------------------------------- prompts
# The paper publishes the description prompt only up to its "...", the reasoning instruction in
# full, and no pseudo-CoT prompt ("follows Mulberry / LLaVA-CoT"). The published words are kept
# verbatim (typo included); everything else here is ours, written in the same spirit: the gold
# answer steers the pseudo-CoT, the description must carry every detail the question needs, and
# the reasoner gets the answer as a hint (repo issue #17) but must reason its way to it.

PSEUDO_COT_PROMPT = (
    "Question: {question}\nCorrect answer: {answer}\n\n"
    "Look at the image and explain how to reach the correct answer. First write a short caption of "
    "the image after 'Caption:'. Then reason step by step, one step per line ('Step 1: ...'), using "
    "only what the image shows, and end with 'Answer: {answer}'."
)
DESCRIBE_PROMPT = (
    "Given a image, a question:{question} and a thinking process:{thinking_process}, provide a detailed "
    "description containing all the necessary details of the image to answer the question correctly"
    # published up to here
    ": the objects with their attributes, positions and counts, any text, numbers, labels and "
    "measurements, and the relations between them. Describe only what is visible; do not answer the "
    "question and do not mention the thinking process."
)
REASON_PROMPT = (
    "Image description: {description}\n\n"
    "Hint: the correct answer is {answer}. Reach it by your own reasoning and do not mention the hint.\n\n"
    "Following the above image description, think step by step and answer the following question directly.\n"
    "Question: {question}\n\n"
    "End your reply with 'Final Answer: ' and the answer alone (an option letter, a number or a short text)."
)


# ----------------------------------------------------------------------------- backends
# Each answers `ask(chat_client.Request)` with a chat_client.Reply: synthetic.Teachers (the synthetic
# world's offline teachers), chat_client.OpenAIBackend (a served model), LocalBackend (a checkpoint).

def stable_seed(*parts):
    """A 63-bit seed from strings, the same in every process (unlike hash())."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


class LocalBackend:
    """A checkpoint sampled with generate.py, one request at a time (small describers, tests).
    Sampling is seeded per (seed, record, step), so results do not depend on the order of requests."""

    def __init__(self, model_dir, max_tokens=1024, temperature=0.6, seed=0):
        import torch

        import generate
        import model

        model.check_checkpoint(model_dir)
        data.refuse_mllama(model_dir, "make_cold_data.py")
        self.generate = generate.generate
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.processor = data.ChatProcessor(model_dir)
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = model.load_model(model_dir, dtype=dtype, device=self.device).eval()
        self.max_tokens, self.temperature, self.seed = max_tokens, temperature, seed
        self.lock = threading.Lock()

    def ask(self, request):
        prompt = self.processor.encode_prompt(request.prompt, request.images)
        seed = stable_seed(self.seed, request.problem["id"], request.step)
        with self.lock:
            (completion,) = self.generate(self.model, [prompt], eos_ids=self.processor.eos_token_ids,
                                          max_new_tokens=self.max_tokens, temperature=self.temperature,
                                          seed=seed, tokenizer=self.processor.tokenizer)
        return Reply(completion.text, truncated=completion.finish_reason == "length")


def make_backend(role, args):
    """The backend of one role ("describer" or "reasoner") from the command-line flags."""
    kind, url, name = getattr(args, role), getattr(args, f"{role}_url"), getattr(args, f"{role}_model")
    if kind == "synthetic":
        return synthetic.Teachers(args.seed, args.error_rate if role == "reasoner" else 0.0)
    if kind == "local":
        return LocalBackend(name, args.max_tokens, args.temperature, args.seed)
    return OpenAIBackend(url, name, os.environ.get(args.api_key_env), args.timeout, args.max_retries, args.backoff,
                         args.max_tokens, args.temperature, stable_seed(args.seed, role))


# ----------------------------------------------------------------------------- the three steps

def question_with_choices(problem):
    """The question as the models see it: options appended as `A. text` lines unless the question lists them."""
    question, choices = problem["question"], problem["choices"]
    if not choices or all(c in question for c in choices):
        return question
    return question + "\nChoices:\n" + "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices))


def pseudo_cot(describer, problem):
    """Step 1: image + question + gold answer -> a caption and step-level reasoning (text)."""
    fields = {"question": question_with_choices(problem), "answer": problem["answer"]}
    request = Request("pseudo_cot", PSEUDO_COT_PROMPT.format(**fields), problem["images"], problem, fields)
    return describer.ask(request).text.strip()


def describe(describer, problem, thinking_process):
    """Step 2: image + question + pseudo-CoT -> a detailed description of the image (text)."""
    fields = {"question": question_with_choices(problem), "thinking_process": thinking_process}
    request = Request("describe", DESCRIBE_PROMPT.format(**fields), problem["images"], problem, fields)
    return describer.ask(request).text.strip()


def reason(reasoner, problem, description):
    """Step 3: description + question + gold answer as a hint -> (cot, final answer or None, truncated).

    The reasoner never sees the image; its reasoning text is the CoT the dataset keeps.
    """
    fields = {"description": description, "question": question_with_choices(problem), "answer": problem["answer"]}
    reply = reasoner.ask(Request("reason", REASON_PROMPT.format(**fields), [], problem, fields))
    cot, answer = split_reply(reply)
    return cot, answer, reply.truncated


def split_reply(reply):
    """(cot, final answer or None) of a reasoner's reply.

    The CoT is the separate reasoning text when the server returns one, else what precedes the last
    `</think>` (an opening `<think>` dropped); without either there is no CoT to keep and no answer.
    '<think>\\n2 + 1 = 3.\\n</think>\\n\\nFinal Answer: 3' -> ('2 + 1 = 3.', '3').
    """
    if reply.reasoning:
        cot, rest = reply.reasoning, reply.text
    else:
        cot, separator, rest = reply.text.rpartition("</think>")
        if not separator:
            cot, rest = reply.text, ""
    return cot.strip().removeprefix("<think>").strip(), final_answer(rest)


ANSWER_STATEMENTS = (  # how texts state their answer; the last statement in a text counts
    re.compile(r"final\s*answer\W{0,4}?:\**\s*(?P<answer>[^\n]+)", re.IGNORECASE),
    re.compile(r"\banswer (?:is|should be)\s*:?\s*(?P<answer>[^\n]+?)(?=[.,;!?]?\s*$|[.,;!?]\s)",
               re.IGNORECASE | re.MULTILINE),
)


BARE_LABEL = re.compile(r"\**\s*final\s*answer\W{0,4}?:?[\s*]*", re.IGNORECASE)  # a statement with no answer


def stated_answer(text):
    """The answer a text states last: its last `\\boxed{X}`, else its last 'Final Answer: X', else its
    last 'the answer is X'; None when it states none.

    'So the answer is 3. Let me check... yes.' -> '3'; 'The answer is \\boxed{12}.' -> '12'.
    """
    boxed = rewards.extract_answer(text, style="r1") if "\\boxed" in text else None
    if boxed:
        return boxed
    for pattern in ANSWER_STATEMENTS:
        matches = list(pattern.finditer(text))
        if matches:
            answer = matches[-1]["answer"].strip().strip("*$ ").rstrip(".").strip()
            return answer or None
    return None


def final_answer(text):
    """The final answer of the text after the reasoning: the `<answer>` block when there is one,
    else the answer the text states, else the whole text when it is one short line that is not a
    bare 'Final Answer:' label; else None. 'Final Answer: ' -> None (a format failure, not the
    answer 'Final Answer:')."""
    if "<answer>" in text:
        return rewards.extract_answer(text)
    answer = stated_answer(text)
    line = text.strip()
    if answer is None and "\n" not in line and 0 < len(line) <= 40 and not BARE_LABEL.fullmatch(line):
        answer = line.rstrip(".")
    return answer


# ----------------------------------------------------------------------------- rewrite, filters, records

DESCRIPTION_REWRITES = [  # (pattern, replacement), in order; the replacement takes the matched case
    (r"\b(?:the|this) (?:image )?description (?:says|states|mentions|notes)\b", "the image shows"),
    (r"\b(?:the|this) (?:given |provided )?(?:image )?description\b", "the image"),
    (r"\bdescribes\b", "shows"),
    (r"\bdescribed\b", "shown"),
]


def match_case(replacement, matched):
    """'The image' for 'The description', 'THE IMAGE' for 'THE DESCRIPTION', else as written."""
    if matched.isupper() and len(matched) > 1:
        return replacement.upper()
    return replacement[0].upper() + replacement[1:] if matched[0].isupper() else replacement


def rewrite_description_refs(text):
    """Make a CoT written from a description speak of the image it is paired with (docs/method.md §1, step 4).

    'As described, the description says 3.' -> 'As shown, the image shows 3.'
    """
    for pattern, replacement in DESCRIPTION_REWRITES:
        text = re.sub(pattern, lambda m: match_case(replacement, m.group(0)), text, flags=re.IGNORECASE)
    return text


FILTERS = ("format", "answer", "consistency", "language_mixing", "repetition", "length")
SCRIPTS = {  # writing systems an English-math CoT must not slip into unless the question uses them
    "CJK": re.compile(r"[\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uff00-\uffef]"),
    "Cyrillic": re.compile(r"[\u0400-\u04ff]"),
}
WORD = re.compile(r"\w+|[^\w\s]")


@dataclass
class Limits:
    """Length bounds of a CoT in words, and the repetition rule: no run of `ngram` words (punctuation
    marks count as words) may occur more than `max_repeats` times in one CoT."""

    min_words: int = 3
    max_words: int = 12000
    ngram: int = 10
    max_repeats: int = 5


def mixed_scripts(text, question):
    """Writing systems in `text` that `question` does not use (Latin is never flagged: it is math's).

    ('所以 the answer is 3', 'How many?') -> ['CJK']; the same with a Chinese question -> [].
    """
    return [name for name, script in SCRIPTS.items() if script.search(text) and not script.search(question)]


def max_ngram_count(text, n):
    """How often the most frequent run of n words occurs; a model stuck in a loop repeats its runs.

    ('a b a b a b', 2) -> 3 ('a b' at words 0, 2, 4).
    """
    words = WORD.findall(text)
    return max(Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1)).values(), default=0)


def format_response(cot, answer):
    """The Vision-R1 response: '<think> COT </think><answer> Final Answer:X </answer>'."""
    return f"<think> {cot} </think><answer> Final Answer:{answer or ''} </answer>"


def failed_filter(problem, cot, answer, truncated, limits=Limits()):
    """The first of FILTERS the sample fails, or None when it passes them all.

      format           the response is well formed (rewards.format_ok) and was not cut at the limit
      answer           the final answer is equivalent to the gold answer (rewards.is_equivalent)
      consistency      the answer the CoT states last, if any, is the final answer
      language_mixing  no writing system the question does not use (R1 slips into Chinese)
      repetition       no run of limits.ngram words more than limits.max_repeats times
      length           limits.min_words <= CoT words <= limits.max_words
    """
    choices, answer_type = problem["choices"], problem["answer_type"]
    if truncated or not rewards.format_ok(format_response(cot, answer)):
        return "format"
    if not rewards.is_equivalent(answer, problem["answer"], choices, answer_type):
        return "answer"
    concluded = stated_answer(cot)
    if concluded is not None and not rewards.is_equivalent(concluded, answer, choices, answer_type):
        return "consistency"
    if mixed_scripts(cot + answer, question_with_choices(problem)):
        return "language_mixing"
    if max_ngram_count(cot, limits.ngram) > limits.max_repeats:
        return "repetition"
    if not limits.min_words <= len(cot.split()) <= limits.max_words:
        return "length"
    return None


def file_name(record_id):
    """A record id as a file name: 'geo/12:a' -> 'geo_12_a'."""
    return re.sub(r"[^\w.-]", "_", record_id)


def image_ref(source, out_dir, name):
    """An image as the output record names it: a path relative to out_dir; embedded bytes (parquet
    inputs) are first written to out_dir/images/NAME.<format>."""
    if isinstance(source, str):
        return os.path.relpath(source, out_dir)
    path = os.path.join(out_dir, "images", f"{name}.{Image.open(io.BytesIO(source)).format.lower()}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(source)
    return os.path.relpath(path, out_dir)


def to_conversation(problem, cot, answer, out_dir):
    """The SFT record, LLaMA-Factory sharegpt layout as Vision-R1-cold has it, image paths relative
    to out_dir: {"id", "images", "conversations": [human '<image>question', gpt RESPONSE]}."""
    images = [image_ref(s, out_dir, f"{file_name(problem['id'])}-{k}") for k, s in enumerate(problem["images"])]
    question = data.IMAGE_PLACEHOLDER * len(images) + question_with_choices(problem)
    return {"id": problem["id"], "images": images,
            "conversations": [{"from": "human", "value": question},
                              {"from": "gpt", "value": format_response(cot, answer)}]}


def process(problem, describer, reasoner, limits, out_dir):
    """All steps for one problem: ("kept", conversation record) or ("rejected", {id, filter, ...}).
    Raises BackendError when a request fails for good."""
    thinking = pseudo_cot(describer, problem)
    description = describe(describer, problem, thinking)
    cot, answer, truncated = reason(reasoner, problem, description)
    cot = rewrite_description_refs(cot)
    rejected_by = failed_filter(problem, cot, answer, truncated, limits)
    if rejected_by is None:
        return "kept", to_conversation(problem, cot, answer, out_dir)
    return "rejected", {"id": problem["id"], "filter": rejected_by, "gold": problem["answer"],
                        "response": format_response(cot, answer), "truncated": truncated}


# ----------------------------------------------------------------------------- CoT statistics (paper Table 2)

REFLECTION_WORDS = {  # Table 2's words, counted case-insensitively; "check" includes re-check, double-check
    "wait": re.compile(r"\bwait\b", re.IGNORECASE),
    "hmm": re.compile(r"\bhmm+\b", re.IGNORECASE),
    "mistake": re.compile(r"\bmistake", re.IGNORECASE),
    "alternatively": re.compile(r"\balternatively\b", re.IGNORECASE),
    "check": re.compile(r"check", re.IGNORECASE),
    "re-check": re.compile(r"\bre-?check", re.IGNORECASE),
}


def cot_text(response):
    """The CoT of a response: the text inside <think>...</think>, else the whole response
    (LLaVA-CoT and Mulberry write their reasoning without think tags)."""
    m = re.search(r"<think>(.*?)</think>", response, re.DOTALL)
    return (m.group(1) if m else response).strip()


def cot_stats(responses):
    """Reflection-word totals and per-sample rates and mean CoT length over assistant responses.

    ['<think> Wait. Hmm, check. </think>x', 'Wait, re-check.'] -> wait 2 (1.0 per sample), hmm 1,
    check 2, re-check 1; mean CoT length 2.5 words.
    """
    cots = [cot_text(r) for r in responses]
    n = max(len(cots), 1)
    totals = {name: sum(len(pattern.findall(c)) for c in cots) for name, pattern in REFLECTION_WORDS.items()}
    return {"samples": len(cots),
            "words": {name: {"total": total, "per_sample": total / n} for name, total in totals.items()},
            "mean_cot_words": sum(len(c.split()) for c in cots) / n,
            "mean_cot_chars": sum(len(c) for c in cots) / n}


def conversation_responses(path, skip_bad=False):
    """The assistant turns of every record of a conversation file, sharegpt or messages layout.

    Only the turns are read: statistics need no images, and other datasets' records (LLaVA-CoT,
    Mulberry) need not satisfy our image checks. Returns (responses, bad count); a record without
    a list of turns with string content, ending with an assistant reply, none of them empty, raises
    DataError unless skip_bad (and some record is good).
    """
    responses, bad = [], []
    for line, obj in data.read_entries(path):
        turns = obj.get("conversations", obj.get("messages")) if isinstance(obj, dict) else None
        turns = turns if isinstance(turns, list) and all(isinstance(t, dict) for t in turns) else []
        texts = [t.get("value", t.get("content")) for t in turns]
        roles = [data.ROLES.get(t.get("from", t.get("role"))) for t in turns]
        replies = [text for role, text in zip(roles, texts) if role == "assistant"]
        if isinstance(obj, data.BadInput):
            reason = obj
        elif not turns or not all(isinstance(text, str) for text in texts):
            reason = "bad turns: expected a list of turns with text"
        elif roles[-1] != "assistant":
            reason = "no assistant reply: the conversation does not end with one"
        elif not all(reply.strip() for reply in replies):
            reason = "empty answer: an assistant turn is empty"
        else:
            responses += replies
            continue
        bad.append(f"{path}:{line}: {reason}")
    if bad and not (skip_bad and responses):
        raise data.DataError("\n".join(bad))
    return responses, len(bad)


# ----------------------------------------------------------------------------- caption rebalancing (docs/method.md §6)

NUMBER_WORDS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
                "eleven": 11, "twelve": 12}
FILE_FORMATS = {  # format: (what it is, a file of another kind it could be mistaken for)
    "FLAC": ("an audio format", "JPEG image"), "MP3": ("an audio format", "JPEG image"),
    "WAV": ("an audio format", "JPEG image"), "MP4": ("a video format", "JPEG image"),
    "JPEG": ("an image format", "PDF document"), "PNG": ("an image format", "PDF document"),
    "PDF": ("a document format", "JPEG image"), "CSV": ("a text table format", "JPEG image"),
    "ZIP": ("an archive format", "JPEG image"),
}
WEATHER = {"snow": "snowy", "rain": "rainy", "fog": "foggy", "sunshine": "sunny"}
COLOR_NAMES = "red|orange|yellow|green|blue|purple|pink|brown|black|white|gray|grey"
DESCRIBE_REQUEST = re.compile(r"\b(?:describe|description|caption)\b", re.IGNORECASE)
DESCRIBE_QUESTION = "Describe the image briefly."

# Specific rules first: the first match wins. A rule's pattern must match the whole caption
# (case-insensitive, final period dropped); its templates use the pattern's named groups and
# caption_fields' additions. Captions no rule matches stay as they are.
REBALANCE_RULES = [
    {"name": "file_format",
     "caption": rf"(?:this is )?an? (?P<medium>screenshot|photo|picture|image) of "
                rf"(?P<thing>an? (?P<format>{'|'.join(FILE_FORMATS)})\b.*)",
     "question": "Why does this {medium} show a {format} file rather than a {contrast}?",
     "answer": "The {medium} shows {thing}. {format} is {format_kind}, so the file is a {format} file, "
               "not a {contrast}."},
    {"name": "text_reading",
     "caption": r"(?P<scene>.*?)\b(?P<thing>sign|poster|banner|label|billboard|screen) "
                r"(?:that )?(?:says|reads|saying|reading) [\"\u201c](?P<text>[^\"\u201d]+)[\"\u201d](?P<rest>.*)",
     "question": "What is written on the {thing}?",
     "answer": "The image shows {scene}{thing} with the words \"{text}\"{rest}, so the {thing} says \"{text}\"."},
    {"name": "count",
     "caption": rf"(?:an? (?:photo|picture|image) of )?(?P<number>{'|'.join(NUMBER_WORDS)}|\d+) "
                rf"(?P<things>\w+s) (?P<doing>\w+ing\b.*)",
     "question": "How many {things} are {doing}?",
     "answer": "The image shows {number} {things} {doing}. Counting them one by one gives {count}, "
               "so there are {count}."},
    {"name": "color_relation",
     "caption": rf"an? (?P<color1>{COLOR_NAMES}) (?P<first>\w+)(?: \w+ed| standing| sitting| lying)? "
                rf"(?P<relation>next to|beside|behind|in front of|near|on top of|under) "
                rf"an? (?!(?P=color1)\b)(?P<color2>{COLOR_NAMES}) (?P<second>\w+)(?P<rest>.*)",
     "question": "Which one is {color1}, the {first} or the {second}?",
     "answer": "The image shows a {color1} {first} {relation} a {color2} {second}. The {second} is {color2}, "
               "so the {color1} one is the {first}."},
    {"name": "weather",
     "caption": rf"(?P<scene>.+?) in the (?P<weather>{'|'.join(WEATHER)})\b(?P<rest>.*)",
     "question": "What is the weather like in this image, and what shows it?",
     "answer": "It is {weather_adjective}: the image shows {scene} in the {weather}{rest}."},
    {"name": "time_of_day",
     "caption": r"(?P<scene>.+?) at (?P<time>night|sunset|sunrise|dusk|dawn)\b(?P<rest>.*)",
     "question": "At what time of day was this picture taken, and what shows it?",
     "answer": "At {time}: the image shows {scene} at {time}{rest}."},
]


def caption_fields(groups):
    """A rule's template fields: its named groups, plus what the tables derive from them
    (format_kind and contrast from FILE_FORMATS, count from NUMBER_WORDS, weather_adjective)."""
    fields = {k: v for k, v in groups.items() if v is not None}
    if "format" in fields:
        fields["format"] = fields["format"].upper()
        fields["format_kind"], fields["contrast"] = FILE_FORMATS[fields["format"]]
    if "number" in fields:
        fields["count"] = NUMBER_WORDS.get(fields["number"].lower(), fields["number"])
    if "weather" in fields:
        fields["weather_adjective"] = WEATHER[fields["weather"].lower()]
    return fields


def rebalance_caption(caption):
    """(rule name, question, answer) for the first rule matching a descriptive caption, or None.

    'A screenshot of a FLAC audio file.' -> ('file_format', 'Why does this screenshot show a FLAC
    file rather than a JPEG image?', 'The screenshot shows a FLAC audio file. FLAC is an audio
    format, so the file is a FLAC file, not a JPEG image.')
    """
    text = caption.strip().rstrip(".").strip()
    if len(text) > 1 and not text[1].isupper():
        text = text[0].lower() + text[1:]
    for rule in REBALANCE_RULES:
        m = re.fullmatch(rule["caption"], text, re.IGNORECASE)
        if m:
            fields = caption_fields(m.groupdict())
            return rule["name"], rule["question"].format(**fields), rule["answer"].format(**fields)
    return None


def rebalance_record(obj, base_dir, out_dir, fallback_id):
    """One input record as (rule name or None, output conversation record), same size in and out.

    A caption record ({"caption", "images"}) or a one-turn conversation whose user turn asks for a
    description becomes the matching rule's question-answer pair; otherwise it is kept as it was
    (a caption record as a DESCRIBE_QUESTION conversation). Raises data.BadInput for bad records.
    """
    if not isinstance(obj, dict):
        raise data.BadInput(f"not a record: expected a JSON object, got {type(obj).__name__}")
    record_id = str(obj.get("id", fallback_id))
    sources = data.image_sources(obj, base_dir)
    images = [image_ref(s, out_dir, f"{file_name(record_id)}-{k}") for k, s in enumerate(sources)]
    if "caption" in obj:
        if not isinstance(obj["caption"], str) or not obj["caption"].strip():
            raise data.BadInput("bad caption: expected a non-empty string")
        caption = obj["caption"]
        turns = [{"role": "user", "content": DESCRIBE_QUESTION}, {"role": "assistant", "content": caption}]
    else:
        turns = data.conversation_record(obj, base_dir, record_id)["messages"]
        dialogue = [t for t in turns if t["role"] != "system"]
        request = dialogue[0]["content"].replace(data.IMAGE_PLACEHOLDER, "")
        caption = dialogue[1]["content"] if len(dialogue) == 2 and DESCRIBE_REQUEST.search(request) else None
    rewritten = rebalance_caption(caption) if caption else None
    if rewritten is not None:
        turns = [{"role": "user", "content": rewritten[1]}, {"role": "assistant", "content": rewritten[2]}]
    if not any(data.IMAGE_PLACEHOLDER in t["content"] for t in turns):
        question = next(t for t in turns if t["role"] == "user")
        question["content"] = data.IMAGE_PLACEHOLDER * len(images) + question["content"]
    sharegpt = {"user": "human", "assistant": "gpt", "system": "system"}
    return (rewritten[0] if rewritten else None), {
        "id": record_id, "images": images,
        "conversations": [{"from": sharegpt[t["role"]], "value": t["content"]} for t in turns]}


# ----------------------------------------------------------------------------- running: shards, resume, summary

def parse_shard(text):
    """'2/8' -> (2, 8): this worker takes records 2, 10, 18, ... of the input."""
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if m is None or not int(m[1]) < int(m[2]):
        raise argparse.ArgumentTypeError(f"--shard wants i/N with 0 <= i < N, got {text!r}")
    return int(m[1]), int(m[2])


def output_paths(out):
    stem = os.path.splitext(out)[0]
    return f"{stem}.rejected.jsonl", f"{stem}.summary.json"


def summarize(problems, out, failures, resumed, started):
    """The summary of this shard's whole job so far, from the output files: records = kept +
    filtered + failed (this run) + pending (not yet tried), and the CoT statistics of what was kept."""
    rejected_path, _ = output_paths(out)
    ids = {p["id"] for p in problems}
    kept = {r["id"]: r for r in data.read_append_only(out) if r["id"] in ids}
    rejected = {r["id"]: r["filter"] for r in data.read_append_only(rejected_path) if r["id"] in ids}
    filtered = Counter(rejected.values())
    return {"records": len(problems), "kept": len(kept), "filtered": {name: filtered[name] for name in FILTERS},
            "filtered_total": len(rejected), "failed": len(failures),
            "pending": len(ids - kept.keys() - rejected.keys() - {f["id"] for f in failures}),
            "resumed": resumed, "failures": failures[:100], "seconds": round(time.time() - started, 2),
            "cot": cot_stats([r["conversations"][-1]["value"] for r in kept.values()])}


def check_synthetic_meta(problems, path):
    """The synthetic describer reads each record's meta.description, scene and query: fail early without them."""
    for p in problems:
        if not {"description", "scene", "query"} <= p["meta"].keys():
            raise data.DataError(f"{path}: record {p['id']!r} has no meta.description / scene / query: "
                                 "the synthetic describer only serves synthetic-world records")


def build(args):
    """Run the pipeline over this shard's unfinished records; write OUT, OUT.rejected.jsonl, OUT.summary.json."""
    started = time.time()
    rejected_path, summary_path = output_paths(args.out)
    for path in (args.out, rejected_path, summary_path):
        check_run_folder(path, args.resume, "--out")
    report, problems = data.read_records(args.input, "problems")
    if report.bad and not (args.skip_bad and problems):
        raise data.DataError("\n".join([report.summary(), *report.lines()]))
    if report.bad:
        print(f"{args.input}: skipped {len(report.bad)} of {report.total} records ({report.reasons()})",
              file=sys.stderr)
    index, count = args.shard
    problems = problems[index::count]
    if args.describer == "synthetic":
        check_synthetic_meta(problems, args.input)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    finished = {r["id"] for r in data.read_append_only(args.out) + data.read_append_only(rejected_path)}
    todo = [p for p in problems if p["id"] not in finished]
    describer, reasoner = make_backend("describer", args), make_backend("reasoner", args)
    limits = Limits(args.min_cot_words, args.max_cot_words, args.repeat_ngram, args.max_repeats)
    counts, failures = Counter(), []
    pool = ThreadPoolExecutor(args.concurrency)
    try:
        with open(args.out, "a", encoding="utf-8") as kept_file, \
                open(rejected_path, "a", encoding="utf-8") as rejected_file, \
                tqdm(total=len(problems), initial=len(problems) - len(todo), desc="cold data", unit="rec") as bar:
            futures = [(p["id"], pool.submit(process, p, describer, reasoner, limits, out_dir)) for p in todo]
            # written in input order, a finished record waiting for those before it: the files (and so
            # the SFT data order) are the same whichever request returns first
            for problem_id, future in futures:
                try:
                    status, record = future.result()
                except BackendError as e:
                    failures.append({"id": problem_id, "error": str(e)})
                    counts["failed"] += 1
                else:
                    data.append_record(kept_file if status == "kept" else rejected_file, record)
                    counts["kept" if status == "kept" else "filtered"] += 1
                bar.update()
                bar.set_postfix(counts, refresh=False)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    summary = {"input": args.input, "out": args.out, "shard": f"{index}/{count}", "describer": args.describer,
               "reasoner": args.reasoner, "bad_input": len(report.bad),
               **summarize(problems, args.out, failures, len(problems) - len(todo), started)}
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
    filtered = ", ".join(f"{k} {v}" for k, v in summary["filtered"].items() if v)
    print(f"kept {summary['kept']} of {summary['records']} (filtered {summary['filtered_total']}"
          f"{': ' + filtered if filtered else ''}; failed {summary['failed']}) -> {args.out}; summary {summary_path}")
    return summary


def rebalance(args):
    """Rewrite every matching caption of a file as a reasoning question-answer pair; same record count out."""
    base_dir, out_dir = os.path.dirname(os.path.abspath(args.input)), os.path.dirname(os.path.abspath(args.out))
    stem = os.path.splitext(os.path.basename(args.input))[0]
    outputs, rules, bad = [], Counter(), []
    for line, obj in data.read_entries(args.input):
        try:
            if isinstance(obj, data.BadInput):
                raise obj
            rule, record = rebalance_record(obj, base_dir, out_dir, f"{stem}-{line}")
        except data.BadInput as e:
            bad.append(f"{args.input}:{line}: {e}")
            continue
        rules[rule or "unchanged"] += 1
        outputs.append(record)
    if bad and not (args.skip_bad and outputs):
        raise data.DataError("\n".join(bad))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for record in outputs:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    summary = {"records": len(outputs), "bad_input": len(bad), "unchanged": rules.pop("unchanged", 0),
               "rewritten": {rule["name"]: rules[rule["name"]] for rule in REBALANCE_RULES}}
    with open(output_paths(args.out)[1], "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))
    return summary


# ----------------------------------------------------------------------------- command line

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    b = commands.add_parser("build", help="run the modality-bridging pipeline (the default command)")
    b.add_argument("--input", default="runs/toy/data/train.jsonl", help="problem records (.jsonl / .json / .parquet)")
    b.add_argument("--out", default="runs/toy/cold/cold.jsonl", help="conversation records (STEM.jsonl; also "
                                                                     "writes STEM.rejected.jsonl, STEM.summary.json)")
    for role in ("describer", "reasoner"):
        b.add_argument(f"--{role}", default="synthetic", choices=["synthetic", "openai", "local"])
        b.add_argument(f"--{role}-url", help="openai: base URL of the server, e.g. http://localhost:8000/v1")
        b.add_argument(f"--{role}-model", help="openai: the served model name; local: the checkpoint directory")
    b.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    b.add_argument("--concurrency", type=at_least(1), default=8, help="records in flight at once")
    b.add_argument("--timeout", type=float, default=900.0, help="seconds per socket operation of a request")
    b.add_argument("--max-retries", type=at_least(0), default=5)
    b.add_argument("--backoff", type=at_least(0, float), default=1.0,
                   help="seconds before the first retry, doubling after")
    b.add_argument("--max-tokens", type=at_least(1), default=16384,
                   help="generation limit per request (prompt + limit must fit the served model's context)")
    b.add_argument("--temperature", type=at_least(0, float), default=0.6)
    b.add_argument("--shard", type=parse_shard, default=(0, 1), help="i/N: take records i, i+N, i+2N, ...")
    b.add_argument("--error-rate", type=at_least(0, float), default=0.0,
                   help="synthetic reasoner: share of CoTs with a mistake")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--skip-bad", action="store_true", help="skip and count bad input records instead of failing")
    b.add_argument("--resume", action="store_true", help="continue the outputs of an earlier run: skip the ids "
                                                         "they hold, retry what failed")
    b.add_argument("--min-cot-words", type=at_least(0), default=Limits.min_words)
    b.add_argument("--max-cot-words", type=at_least(1), default=Limits.max_words)
    b.add_argument("--repeat-ngram", type=at_least(1), default=Limits.ngram)
    b.add_argument("--max-repeats", type=at_least(1), default=Limits.max_repeats)
    s = commands.add_parser("stats", help="reflection-word counts and CoT length of a conversation file (Table 2)")
    s.add_argument("file")
    s.add_argument("--skip-bad", action="store_true")
    r = commands.add_parser("rebalance", help="rewrite descriptive captions as reasoning question-answer pairs")
    r.add_argument("--input", required=True, help="caption records {id, images, caption} or conversations")
    r.add_argument("--out", required=True)
    r.add_argument("--skip-bad", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in commands.choices and argv[0] not in ("-h", "--help"):
        argv.insert(0, "build")
    args = parser.parse_args(argv)
    if args.command in ("build", "rebalance"):
        written = [args.out, *output_paths(args.out)]
        if os.path.realpath(args.input) in map(os.path.realpath, written):
            parser.error(f"--input {args.input} is one of the files --out writes ({', '.join(written)}): "
                         "give the output its own name")
    if args.command == "build":
        for role in ("describer", "reasoner"):
            kind = getattr(args, role)
            if kind == "openai" and not (getattr(args, f"{role}_url") and getattr(args, f"{role}_model")):
                parser.error(f"--{role} openai needs --{role}-url and --{role}-model")
            if kind == "local" and not getattr(args, f"{role}_model"):
                parser.error(f"--{role} local needs --{role}-model (a checkpoint directory)")
    return args


@command_line
def main(argv=None):
    args = parse_args(argv)
    if args.command == "stats":
        responses, bad = conversation_responses(args.file, args.skip_bad)
        print(json.dumps({"file": args.file, "bad_input": bad, **cot_stats(responses)}, indent=2))
    elif args.command == "rebalance":
        rebalance(args)
    else:
        build(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
