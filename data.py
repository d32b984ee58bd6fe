"""Record formats shared by every stage: loading, checking, and encoding chats for model.py
(Qwen2.5-VL) and model_mllama.py (Llama 3.2 Vision).

Problem records (RL training, evaluation, cold-data input), one JSON object per line:

    {"id": "train-00001", "images": ["images/train-00001.png"], "question": "How many red squares are there?",
     "answer": "2", "choices": null, "answer_type": "integer", "meta": {...}}

Image paths are relative to the data file. Parquet exported from Hugging Face datasets loads as is:
the released Vision-R1-rl / geometry3k layout (`images` as embedded bytes, `problem` with an
`<image>` placeholder, `answer`) and benchmark exports such as MathVista (`pid`, `decoded_image`)
or MathVerse (`sample_index`, `image`); columns we do not use go into `meta`.

Conversation records (SFT), in either layout people have, JSON array or JSON lines:

    {"images": ["a.png"], "conversations": [{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}]}
    {"image": "a.png", "messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}]}

The first is LLaMA-Factory's sharegpt layout as the released Vision-R1-cold files use it.

    python data.py check FILE [--skip-bad]

lists every bad record as FILE:LINE: reason (line in a JSON/JSONL file, row in a parquet table,
counting from 1) and exits 1 if there is any; jobs run the same check when they load a file.
"""

import argparse
import io
import json
import os
import sys
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from train_utils import InputError, command_line

IMAGE_PLACEHOLDER = "<image>"
IMAGE_PAD = "<|image_pad|>"
IM_END = "<|im_end|>"
MLLAMA_IMAGE = "<|image|>"  # Llama 3.2 Vision: one token per image, its tiles read by cross-attention
EOT = "<|eot_id|>"  # Llama 3's end of a turn
ANSWER_TYPES = ("integer", "float", "text", "choice", "list")
# Column aliases, first present wins. MathVista keeps a path string in `image` and the bytes in
# `decoded_image`; MathVerse calls its id `sample_index`, MathVista `pid`.
ID_KEYS = ("id", "pid", "sample_index")
IMAGE_KEYS = ("images", "decoded_image", "image")
QUESTION_KEYS = ("question", "problem")
PROBLEM_KEYS = {*ID_KEYS, *IMAGE_KEYS, *QUESTION_KEYS, "answer", "choices", "answer_type", "meta"}
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# Modes whose conversion to RGB keeps the picture's meaning. CMYK (ink, converted naively),
# 16/32-bit integer and float modes (clipped to 255 on conversion) and other colour spaces are bad.
CONVERTIBLE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX")
MAX_ASPECT_RATIO = 200  # Qwen2-VL's resize refuses anything longer


class DataError(InputError):
    """A data file has bad records; the message lists `file:line: reason` for every one."""


class BadInput(ValueError):
    """One record or image that cannot be used; the message is the reason."""


# ----------------------------------------------------------------------------- images

def load_image(source, min_pixels=None, max_pixels=None, factor=28):
    """Open an image source (path, raw bytes or PIL image) as a checked RGB PIL image.

    Bad (raises BadInput): a missing file; an empty or zero-size image; data PIL cannot decode;
    a decompression bomb (more pixels than PIL's MAX_IMAGE_PIXELS, where PIL itself only warns up
    to twice that); a mode outside CONVERTIBLE_MODES; a side ratio over 200. Convertible non-RGB
    modes (palette, grey, alpha) are converted with `convert("RGB")`, as transformers does.

    With min_pixels and/or max_pixels, the image is resized (bicubic) to Qwen2-VL's smart_resize
    of its size: sides multiples of `factor` (patch 14 x merge 2), area within the bounds. The
    Qwen2-VL image processor with the same bounds then keeps it as is, e.g. 150x90 with
    max_pixels=112*112 -> 140x84.
    """
    name = source if isinstance(source, str) else "embedded image"
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, str) and not os.path.isfile(source):
            raise BadInput(f"missing image: {name}")
        if (os.path.getsize(source) if isinstance(source, str) else len(source)) == 0:
            raise BadInput(f"zero-size image: {name} is 0 bytes")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(source if isinstance(source, str) else io.BytesIO(source))
                image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadInput(f"decompression bomb: {name}: {e}") from None
        except Exception as e:  # decoders raise many types (OSError, SyntaxError, struct.error, ...) on bad data
            raise BadInput(f"unreadable image: {name}: {e}") from None
    if image.width == 0 or image.height == 0:
        raise BadInput(f"zero-size image: {name} is {image.width}x{image.height}")
    if image.mode not in CONVERTIBLE_MODES:
        raise BadInput(f"non-RGB image: {name} has mode {image.mode} (accepted: {', '.join(CONVERTIBLE_MODES)})")
    if max(image.size) / min(image.size) > MAX_ASPECT_RATIO:
        raise BadInput(f"extreme aspect ratio: {name} is {image.width}x{image.height}, over {MAX_ASPECT_RATIO}:1")
    image = image.convert("RGB")
    if min_pixels is None and max_pixels is None:
        return image
    height, width = qwen2vl_image_processing().smart_resize(image.height, image.width, factor,
                                 min_pixels=min_pixels or factor * factor, max_pixels=max_pixels or float("inf"))
    return image.resize((width, height), Image.Resampling.BICUBIC)


def qwen2vl_image_processing():
    """transformers' PIL-backed Qwen2-VL image processing module: `Qwen2VLImageProcessorPil` and
    `smart_resize` in transformers 5 (whose `image_processing_qwen2_vl` needs torchvision),
    `Qwen2VLImageProcessor` and `smart_resize` in 4.x."""
    try:
        from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as module
    except ImportError:
        from transformers.models.qwen2_vl import image_processing_qwen2_vl as module
    return module


def qwen2vl_image_processor_class():
    """The PIL-backed Qwen2-VL image processor class of the installed transformers (see above)."""
    module = qwen2vl_image_processing()
    return getattr(module, "Qwen2VLImageProcessorPil", None) or module.Qwen2VLImageProcessor


def pixel_bounds(image_processor):
    """(min_pixels, max_pixels) of a Qwen2-VL image processor. Both major versions keep them in
    `size` {"shortest_edge", "longest_edge"} (4.x also as attributes, 5.x only there), from a
    preprocessor config with `min_pixels`/`max_pixels` (released checkpoints) or with `size` (as
    5.x writes it; 4.x reads such a config as its default bounds, and so do we there)."""
    return image_processor.size["shortest_edge"], image_processor.size["longest_edge"]


def image_sources(obj, base_dir):
    """The record's images as sources load_image takes: absolute paths or raw bytes.

    Accepts a path, a Hugging Face image struct {"bytes", "path"} (bytes win), or a list of those,
    under the first present key of IMAGE_KEYS; relative paths are relative to `base_dir`.
    """
    key = next((k for k in IMAGE_KEYS if obj.get(k) is not None), None)
    if key is None:
        return []
    items = obj[key] if isinstance(obj[key], list) else [obj[key]]
    sources = []
    for item in items:
        if isinstance(item, dict):
            item = item.get("bytes") or item.get("path")
        if isinstance(item, bytes):
            sources.append(item)
        elif isinstance(item, str) and item:
            sources.append(os.path.join(base_dir, item))
        else:
            raise BadInput(f"bad image entry: {str(item)[:60]!r} in {key!r}")
    return sources


# ----------------------------------------------------------------------------- reading files

def read_entries(path):
    """Yield (line, object) for every record of a .jsonl, .json or .parquet file.

    Lines count from 1 (parquet: rows). A malformed entry comes as (line, BadInput). A .json or
    .jsonl file that starts with `[` is one JSON array; any other is JSON lines, blank lines
    skipped, as Hugging Face's json loader reads both. A file without a record (0 bytes, blank
    lines, `[]`, no rows) comes as (1, BadInput("empty file ...")): no job runs on nothing.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".parquet", ".json", ".jsonl"):
        raise DataError(f"{path}: unsupported file type {ext!r} (use .jsonl, .json or .parquet)")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    if ext == ".parquet":
        entries = _parquet_entries(path)
    else:
        with open(path, "rb") as f:
            data = f.read()
        entries = (_json_array_entries if data.lstrip()[:1] == b"[" else _json_lines_entries)(data)
    empty = True
    for entry in entries:
        empty = False
        yield entry
    if empty:
        yield 1, BadInput("empty file: no records")


def _json_lines_entries(data):
    for line, text in enumerate(data.split(b"\n"), 1):
        if not text.strip():
            continue
        try:
            yield line, json.loads(text)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            yield line, BadInput(f"malformed JSON: {e}")


def _json_array_entries(data):
    """Elements of a JSON array with the line each starts on; a syntax error ends the file there."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        yield 1, BadInput(f"malformed JSON: not UTF-8 ({e})")
        return
    decoder = json.JSONDecoder()
    pos = _skip_space(text, text.index("[") + 1)
    if text.startswith("]", pos):
        return
    line, counted = 1, 0
    while True:
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield e.lineno, BadInput(f"malformed JSON: {e.msg} (column {e.colno}); the rest of the file is unread")
            return
        yield line, obj
        pos = _skip_space(text, pos)
        if text.startswith(",", pos):
            pos = _skip_space(text, pos + 1)
        elif text.startswith("]", pos) and not text[pos + 1:].strip():
            return
        else:
            line += text.count("\n", counted, pos)
            yield line, BadInput("malformed JSON: expected ',' or the closing ']' of the array; the rest of the file is unread")
            return


def _skip_space(text, pos):
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _parquet_entries(path):
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"{path}: not a readable parquet file: {e}") from None
    row = 0
    for batch in table.iter_batches(batch_size=256):
        for obj in batch.to_pylist():
            row += 1
            yield row, obj


# ----------------------------------------------------------------------------- normalising records

def detect_kind(obj):
    """'conversations' for sharegpt / messages records, else 'problems'."""
    is_chat = isinstance(obj, dict) and ("conversations" in obj or "messages" in obj)
    return "conversations" if is_chat else "problems"


def problem_record(obj, base_dir, fallback_id, require_answer=True):
    """Normalise a problem row (our layout, geometry3k, a benchmark export) or raise BadInput.
    Prompts to sample from (`require_answer=False`) may come without an answer.

    `<image>` placeholders are removed from the question (the chat puts images first); when a
    question has any, their count must equal the number of images.
    """
    if not isinstance(obj, dict):
        raise BadInput(f"not a record: expected a JSON object, got {type(obj).__name__}")
    if detect_kind(obj) == "conversations":
        raise BadInput("not a problem record: it is a conversation (conversations/messages)")
    question = next((obj[k] for k in QUESTION_KEYS if obj.get(k) is not None), None)
    if not isinstance(question, str) or not question.replace(IMAGE_PLACEHOLDER, "").strip():
        raise BadInput("missing question")
    answer = obj.get("answer")
    has_answer = not isinstance(answer, bool) and isinstance(answer, (str, int, float)) and str(answer).strip()
    if require_answer and not has_answer:
        raise BadInput("missing answer")
    images = image_sources(obj, base_dir)
    placeholders = question.count(IMAGE_PLACEHOLDER)
    if placeholders and placeholders != len(images):
        raise BadInput(f"image count mismatch: {placeholders} <image> placeholders for {len(images)} images")
    choices = obj.get("choices")
    if choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
        raise BadInput(f"bad choices: expected a list of strings, got {choices!r:.60}")
    answer_type = obj.get("answer_type")
    if answer_type is not None and answer_type not in ANSWER_TYPES:
        raise BadInput(f"bad answer_type: {answer_type!r} is not one of {', '.join(ANSWER_TYPES)}")
    if answer_type == "choice" and not choices:
        raise BadInput("bad choices: answer_type is choice but there are no choices")
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise BadInput("bad meta: expected an object")
    extra = {k: v for k, v in obj.items() if k not in PROBLEM_KEYS and not isinstance(v, bytes)}
    record_id = next((obj[k] for k in ID_KEYS if obj.get(k) is not None), fallback_id)
    return {"id": str(record_id), "images": images, "question": question.replace(IMAGE_PLACEHOLDER, "").strip(),
            "answer": str(answer).strip() if has_answer else None, "choices": choices or None, "answer_type": answer_type,
            "meta": {**extra, **meta}}


def conversation_record(obj, base_dir, fallback_id):
    """Normalise a sharegpt or messages record to {id, images, messages} or raise BadInput.

    Turns must be an optional system turn, then user and assistant alternating, ending with the
    assistant (LLaMA-Factory's rule), no reply empty (nothing to learn, and the model would learn
    to stop at once); a top-level `system` string becomes the system turn; the `<image>`
    placeholders over all turns must match the images one to one.
    """
    if not isinstance(obj, dict):
        raise BadInput(f"not a record: expected a JSON object, got {type(obj).__name__}")
    turns = obj.get("conversations", obj.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise BadInput("bad turns: missing conversations or messages")
    messages = [{"role": "system", "content": obj["system"]}] if obj.get("system") else []
    for turn in turns:
        if not isinstance(turn, dict):
            raise BadInput(f"bad turns: expected objects, got {turn!r:.60}")
        role, content = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        if role not in ROLES or not isinstance(content, str):
            raise BadInput(f"bad turns: need a role in {sorted(ROLES)} and string content, got {turn!r:.80}")
        messages.append({"role": ROLES[role], "content": content})
    roles = [m["role"] for m in messages]
    dialogue = roles[1:] if roles[0] == "system" else roles
    alternating = all(r == ("user", "assistant")[i % 2] for i, r in enumerate(dialogue))
    if alternating and dialogue[-1:] == ["user"]:
        raise BadInput("no assistant reply: the conversation ends with a user turn")
    if not dialogue or len(dialogue) % 2 or not alternating:
        raise BadInput(f"bad turns: need [system,] user, assistant, user, assistant, ...; got {', '.join(roles)}")
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    empty = next((k for k, reply in enumerate(replies, 1) if not reply.strip()), None)
    if empty is not None:
        raise BadInput(f"empty answer: assistant turn {empty} is empty")
    images = image_sources(obj, base_dir)
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if placeholders != len(images):
        raise BadInput(f"image count mismatch: {placeholders} <image> placeholders for {len(images)} images")
    return {"id": str(obj.get("id", fallback_id)), "images": images, "messages": messages}


# ----------------------------------------------------------------------------- checking and loading

@dataclass
class CheckReport:
    """What checking a file found: `bad` holds (line, reason) for every bad record."""

    path: str
    kind: str
    total: int
    good: int
    bad: list

    def lines(self):
        return [f"{self.path}:{line}: {reason}" for line, reason in self.bad]

    def reasons(self):
        """Bad records counted by kind of reason, e.g. 'missing image: 2, malformed JSON: 1'."""
        counts = Counter(reason.split(":")[0] for _, reason in self.bad)
        return ", ".join(f"{kind}: {n}" for kind, n in counts.items())

    def summary(self):
        """e.g. 'data/rl.jsonl: 7 good of 10 problems records (missing image: 2, malformed JSON: 1)'."""
        reasons = f" ({self.reasons()})" if self.bad else ""
        return f"{self.path}: {self.good} good of {self.total} {self.kind} records{reasons}"


def read_records(path, kind="auto"):
    """Parse, normalise and check every record of a file, images decoded; returns (CheckReport, records).

    `kind` 'auto' takes the layout of the first parseable record. Ids must be unique in a file.
    """
    base_dir = os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    records, bad, first_line_of = [], [], {}
    total = 0
    for line, obj in read_entries(path):
        total += 1
        try:
            if isinstance(obj, BadInput):
                raise obj
            kind = detect_kind(obj) if kind == "auto" else kind
            # records without an id are numbered by position: a one-line JSON array holds many
            if kind == "conversations":
                record = conversation_record(obj, base_dir, f"{stem}-{total}")
            else:
                record = problem_record(obj, base_dir, f"{stem}-{total}", require_answer=kind != "prompts")
            if record["id"] in first_line_of:
                raise BadInput(f"duplicate id: {record['id']!r} (first on line {first_line_of[record['id']]})")
            for source in record["images"]:
                load_image(source)
        except BadInput as e:
            bad.append((line, str(e)))
            continue
        first_line_of[record["id"]] = line
        records.append(record)
    kind = "problems" if kind == "auto" else kind
    return CheckReport(path, kind, total, len(records), bad), records


def check_file(path, kind="auto"):
    """Check a whole file before any job starts: kind is 'auto', 'problems' or 'conversations'."""
    return read_records(path, kind)[0]


def _load(path, kind, skip_bad):
    report, records = read_records(path, kind)
    if report.bad and not (skip_bad and records):
        raise DataError("\n".join([report.summary(), *report.lines()]))
    if report.bad:
        print(f"{path}: skipped {len(report.bad)} of {report.total} records ({report.reasons()})", file=sys.stderr)
    return records


def load_problems(path, skip_bad=False):
    """Problem records of a .jsonl / .json / .parquet file, normalised to
    {id, images, question, answer, choices, answer_type, meta}.

    Raises DataError listing every bad line; with skip_bad, returns the good records and prints
    `skipped N of M records (reasons)` to stderr (no good record at all is still a DataError).
    """
    return _load(path, "problems", skip_bad)


def load_prompts(path, skip_bad=False):
    """Problem records to sample from (generate.py): as load_problems, the answer optional."""
    return _load(path, "prompts", skip_bad)


def load_conversations(path, skip_bad=False):
    """Conversation records (sharegpt or messages layout) normalised to {id, images, messages}.

    Message content keeps its `<image>` placeholders. Bad records as in load_problems.
    """
    return _load(path, "conversations", skip_bad)


# ----------------------------------------------------------------------------- append-only outputs

def read_append_only(path):
    """The records of an append-only output file, after cutting a torn last line (a kill mid-write)
    so that appending resumes on a line boundary. A bad line elsewhere raises DataError."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        raw = f.read()
    complete = raw[:raw.rfind(b"\n") + 1]
    if len(complete) != len(raw):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    records = []
    for line, text in enumerate(complete.decode("utf-8").splitlines(), 1):
        try:
            records.append(json.loads(text))
        except ValueError as e:
            raise DataError(f"{path}:{line}: malformed JSON in an output file: {e}") from None
    return records


def append_record(file, record):
    """One record as one line, flushed now: a kill never loses a record that was written."""
    file.write(json.dumps(record, ensure_ascii=False) + "\n")
    file.flush()


# ----------------------------------------------------------------------------- chat encoding

def template_messages(messages):
    """Our messages in chat-template form: content with `<image>` placeholders becomes parts.

    >>> template_messages([{"role": "user", "content": "<image>How many?"}])
    [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'How many?'}]}]
    """
    converted = []
    for m in messages:
        content = m["content"]
        if IMAGE_PLACEHOLDER in content:
            pieces = content.split(IMAGE_PLACEHOLDER)
            content = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
            for piece in pieces[1:]:
                content += [{"type": "image"}] + ([{"type": "text", "text": piece}] if piece else [])
        converted.append({"role": m["role"], "content": content})
    return converted


def expand_image_tokens(ids, labels, image_token_id, counts):
    """Repeat the i-th image pad token counts[i] times, as Qwen2.5-VL's processor does.

    counts[i] = grid_t * grid_h * grid_w / merge_size**2, e.g. a 112x112 image -> (1, 8, 8) -> 16.
    Labels of the copies are those of the pad (always -100: images sit in user turns).
    """
    if ids.count(image_token_id) != len(counts):
        raise ValueError(f"{ids.count(image_token_id)} image tokens in the chat for {len(counts)} images")
    remaining = iter(counts)
    out_ids, out_labels = [], []
    for token, label in zip(ids, labels):
        n = next(remaining) if token == image_token_id else 1
        out_ids += [token] * n
        out_labels += [label] * n
    return out_ids, out_labels


def eos_token_ids(model_dir, tokenizer):
    """Stop tokens: generation_config.json's eos_token_id (Qwen lists <|im_end|> and <|endoftext|>), else the tokenizer's."""
    path = os.path.join(model_dir, "generation_config.json")
    eos = None
    if os.path.exists(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
    if eos is None:
        return [tokenizer.eos_token_id]
    return eos if isinstance(eos, list) else [eos]


def model_type(model_dir):
    """config.json's model_type of a checkpoint folder (None without one)."""
    config = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config):
        return None
    with open(config) as f:
        return json.load(f).get("model_type")


def refuse_mllama(model_dir, path):
    """InputError for a Llama 3.2 Vision checkpoint given to a `path` (script or mode) that serves
    Qwen2.5-VL only: train_sft.py trains it and generate.py / evaluate.py sample it, GRPO and
    cold-data sampling are not written yet, so such a run stops here with one line instead of failing
    inside the Qwen code."""
    if model_type(model_dir) == "mllama":
        raise InputError(f"{model_dir}: Llama 3.2 Vision (model_type mllama) trains with train_sft.py, but "
                         f"{path} serves Qwen2.5-VL only so far")


def mllama_image_processor_class():
    """transformers' PIL-backed MllamaImageProcessor (5.x; its default one needs torchvision), else 4.x's."""
    try:
        from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
        return MllamaImageProcessorPil
    except ImportError:
        from transformers.models.mllama.image_processing_mllama import MllamaImageProcessor
        return MllamaImageProcessor


class ChatProcessor:
    """A checkpoint's tokenizer (with its chat template) and image processor, combined as
    transformers' processor of its architecture combines them, without its torchvision dependency.

    Qwen2.5-VL: images are loaded with the pixel bounds (default: the checkpoint's preprocessor
    config), the template's single `<|image_pad|>` per image is expanded to the image's token count.
    Llama 3.2 Vision (model_type mllama): each `<|image|>` stays one token; the image becomes up
    to max_image_tiles tiles (MllamaImageProcessor) that the tokens after it read by cross-attention.
    """

    def __init__(self, model_dir, min_pixels=None, max_pixels=None):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.mllama = model_type(model_dir) == "mllama"
        if self.mllama:
            if min_pixels or max_pixels:
                raise InputError(f"{model_dir}: Llama 3.2 Vision tiles images at its preprocessor config's size; "
                                 "--min-pixels / --max-pixels are for Qwen2.5-VL")
            self.image_processor = mllama_image_processor_class().from_pretrained(model_dir)
            image_token, self.reply_end = MLLAMA_IMAGE, EOT
        else:
            self.image_processor = qwen2vl_image_processor_class().from_pretrained(model_dir)
            default_min, default_max = pixel_bounds(self.image_processor)
            self.min_pixels = min_pixels or default_min
            self.max_pixels = max_pixels or default_max
            image_token, self.reply_end = IMAGE_PAD, IM_END
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(image_token)
        self.eos_token_ids = eos_token_ids(model_dir, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.eos_token_ids[0]

    def vision_inputs(self, images):
        """(pixel_values [P, C*2*14*14], image_grid_thw [I, 3]) for PIL images or sources; (None, None) for none."""
        if not images:
            return None, None
        factor = self.image_processor.patch_size * self.image_processor.merge_size
        loaded = [load_image(im, self.min_pixels, self.max_pixels, factor) for im in images]
        # the bounds as `size`, which both major versions take per call (5.x deprecates min/max_pixels)
        bounds = {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}
        out = self.image_processor(images=loaded, size=bounds, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def tile_inputs(self, images, ids):
        """Llama 3.2 Vision's inputs for one sequence's `images` (n >= 1), as transformers'
        MllamaProcessor makes them: pixel_values [n, tiles, C, H, W], aspect_ratio_ids [n],
        aspect_ratio_mask [n, tiles], and cross_attention_mask [len(ids), n, tiles], 1 where a token
        sees a real tile of an image: from the image's `<|image|>` up to the next image's (to the end
        for the last one, and for every image of a run of adjacent `<|image|>`s), e.g. ids
        [a, <|image|>, b, <|image|>, c] with 2 and 1 tiles -> rows a: none; <|image|>, b: image 0's
        two tiles; <|image|>, c: image 1's one tile."""
        from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                                  get_cross_attention_token_mask)

        out = self.image_processor([[load_image(im) for im in images]], return_tensors="pt")
        spans = get_cross_attention_token_mask(ids, self.image_token_id)
        cross = convert_sparse_cross_attention_mask_to_dense([spans], out["num_tiles"],
                                                             self.image_processor.max_image_tiles, len(ids))
        return {"pixel_values": out["pixel_values"][0], "aspect_ratio_ids": out["aspect_ratio_ids"][0],
                "aspect_ratio_mask": out["aspect_ratio_mask"][0], "cross_attention_mask": torch.from_numpy(cross[0])}

    def render(self, messages, add_generation_prompt=False):
        return self.tokenizer.apply_chat_template(template_messages(messages), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _encode(self, text, images, label_spans=None):
        """Tokenise rendered chat text, label tokens overlapping label_spans (never an image token),
        and add the images: Qwen2.5-VL's expanded pad tokens, or Llama 3.2 Vision's tiles."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=label_spans is not None)
        ids = enc["input_ids"]
        labels = [-100] * len(ids)
        if label_spans is not None:
            for i, (start, end) in enumerate(enc["offset_mapping"]):
                if ids[i] != self.image_token_id and any(start < span_end and end > span_start
                                                         for span_start, span_end in label_spans):
                    labels[i] = ids[i]
        if self.mllama:
            if ids.count(self.image_token_id) != len(images):
                raise ValueError(f"{ids.count(self.image_token_id)} image tokens in the chat for {len(images)} images")
            out = {"input_ids": ids, **(self.tile_inputs(images, ids) if images else {})}
        else:
            pixel_values, grid_thw = self.vision_inputs(images)
            merge = self.image_processor.merge_size ** 2
            counts = [] if grid_thw is None else (grid_thw.prod(-1) // merge).tolist()
            ids, labels = expand_image_tokens(ids, labels, self.image_token_id, counts)
            out = {"input_ids": ids, "pixel_values": pixel_values, "image_grid_thw": grid_thw}
        return {**out, "labels": labels} if label_spans is not None else out

    def encode_prompt(self, question, images, system=None):
        """One user turn (the images, then the question) with the generation prompt, ready to sample.

        No system message unless `system` is given; the template's default system turn applies.
        Returns {input_ids: list[int], pixel_values, image_grid_thw}.
        """
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": IMAGE_PLACEHOLDER * len(images) + question})
        return self._encode(self.render(messages, add_generation_prompt=True), images)

    def encode_problem(self, record, system=None):
        """encode_prompt for a problem record."""
        return self.encode_prompt(record["question"], record["images"], system)

    def encode_conversation(self, messages, images):
        """A whole chat with labels: input_ids on each assistant reply and its closing end-of-turn
        token (Qwen's <|im_end|>, Llama's <|eot_id|>), -100 elsewhere (system and user turns, image
        tokens, the assistant header, the newline after <|im_end|>). `<image>` placeholders map to
        `images` in order.

        Reply spans come from rendering the chat up to each reply with and without it; the template
        must render every shorter chat as a prefix of the longer one (Qwen's and Llama 3.2 Vision's
        do while the images sit in the first user turn: the latter drops its system turn when a
        chat has images).
        """
        text = self.render(messages)
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            head = self.render(messages[:k], add_generation_prompt=True)
            turn = self.render(messages[:k + 1])
            if not (text.startswith(turn) and turn.startswith(head)):
                raise ValueError("chat template does not render a chat's prefix as a prefix of its text")
            spans.append((len(head), turn.rindex(self.reply_end) + len(self.reply_end)))
        return self._encode(text, images, spans)


# ----------------------------------------------------------------------------- packing

def first_fit(sizes, max_tokens):
    """Greedy first-fit, in order: each item goes into the first bin with room for it, else opens a
    new one (an item larger than max_tokens gets a bin of its own). Returns each bin's item indices.
    Sizes 5, 4, 3, 2 with max_tokens 8 -> [[0, 2], [1, 3]]."""
    bins = []
    for i, n in enumerate(sizes):
        target = next((b for b in bins if b["tokens"] + n <= max_tokens), None)
        if target is None:
            target = {"tokens": 0, "items": []}
            bins.append(target)
        target["tokens"] += n
        target["items"].append(i)
    return [b["items"] for b in bins]


def pack(encoded, max_tokens):
    """Encoded samples packed (`first_fit`) into batches of at most max_tokens. Lengths 5, 4, 3, 2
    with max_tokens 8 -> [0, 2] (8 tokens), [1, 3] (6 tokens); cu_seqlens of the first: [0, 5, 8].
    """
    return [collate([encoded[i] for i in index], index)
            for index in first_fit([len(s["input_ids"]) for s in encoded], max_tokens)]


def pack_shared_prompts(groups, max_tokens):
    """Pack prompts with their continuations (a GRPO group: one prompt, G responses) so that each
    prompt is packed, and its image encoded, once for the continuations beside it, into batches of
    at most max_tokens (first-fit, in order; a group too long for one batch is split over several,
    each with its own copy of the prompt). For model.packed_logprobs(..., positions, prefix_of).

    groups: [{input_ids, pixel_values, image_grid_thw, continuations: [[token ids]], rows: [int]}]
    (rows: where each continuation's log-probs go). Each batch has input_ids [T], cu_seqlens over
    its sequences (a prompt, then each non-empty continuation), prefix_of (-1 for a prompt, its
    prompt's sequence for a continuation), pixel_values / image_grid_thw, rows and lengths (one per
    continuation), and positions / targets (one per continuation token: the packed position whose
    next-token distribution scores it, and the token). Example: prompt [p0 p1] with continuations
    [a0 a1], [b0] -> input_ids [p0 p1 a0 a1 b0], cu_seqlens [0 2 4 5], prefix_of [-1 0 0],
    positions [1 2 1], targets [a0 a1 b0].
    """
    units, sizes = [], []  # (group, its continuations' indices) that fit a batch, and their tokens
    for group in groups:
        chosen, tokens = [], len(group["input_ids"])
        for c, continuation in enumerate(group["continuations"]):
            if chosen and tokens + len(continuation) > max_tokens:
                units.append((group, chosen))
                sizes.append(tokens)
                chosen, tokens = [], len(group["input_ids"])
            chosen.append(c)
            tokens += len(continuation)
        units.append((group, chosen))
        sizes.append(tokens)
    return [_collate_shared_prompts([units[i] for i in index]) for index in first_fit(sizes, max_tokens)]


def cu_seqlens_of(lengths):
    """Sequence boundaries [B+1] (int32, from 0) of sequences of `lengths` packed end to end."""
    return torch.cat([torch.zeros(1), torch.tensor(lengths).cumsum(0)]).to(torch.int32)


def concat_images(samples):
    """pixel_values and image_grid_thw of the samples that have an image, concatenated in their
    order: the layout model.embed expects of a packed batch. (None, None) when none has one."""
    images = [s for s in samples if s.get("pixel_values") is not None]
    if not images:
        return None, None
    return torch.cat([s["pixel_values"] for s in images]), torch.cat([s["image_grid_thw"] for s in images])


def concat_tiles(samples):
    """Llama 3.2 Vision's image inputs of a packed batch (model_mllama's forward_packed keywords):
    the samples' pixel_values, aspect_ratio_ids and aspect_ratio_mask concatenated in their order,
    image_counts (images per sample) and cross_attention_mask [T, max count, tiles], each sample's
    rows padded with unseen image slots (zeros for a sample without images). {} when none has one.
    Samples of 3 and 2 tokens with 0 and 2 images -> image_counts [0, 2], mask [5, 2, tiles]."""
    counts = [len(s.get("aspect_ratio_ids", ())) for s in samples]
    if not any(counts):
        return {}
    with_images = [s for s, n in zip(samples, counts) if n]
    tiles = with_images[0]["aspect_ratio_mask"].shape[-1]
    cross = [F.pad(s["cross_attention_mask"], (0, 0, 0, max(counts) - n)) if n else
             torch.zeros(len(s["input_ids"]), max(counts), tiles, dtype=torch.long) for s, n in zip(samples, counts)]
    images = {key: torch.cat([s[key] for s in with_images]) for key in ("pixel_values", "aspect_ratio_ids",
                                                                         "aspect_ratio_mask")}
    return {**images, "cross_attention_mask": torch.cat(cross), "image_counts": counts}


def _collate_shared_prompts(units):
    ids, lengths, prefix_of, rows, response_lengths, positions, targets = [], [], [], [], [], [], []
    for group, chosen in units:
        prompt_sequence, prompt_end = len(lengths), len(ids) + len(group["input_ids"])
        ids += list(group["input_ids"])
        lengths.append(len(group["input_ids"]))
        prefix_of.append(-1)
        for c in chosen:
            continuation = list(group["continuations"][c])
            rows.append(group["rows"][c])
            response_lengths.append(len(continuation))
            if not continuation:
                continue
            # token t is predicted by the token before it: the prompt's last for t = 0
            positions += [prompt_end - 1] + list(range(len(ids), len(ids) + len(continuation) - 1))
            targets += continuation
            ids += continuation
            lengths.append(len(continuation))
            prefix_of.append(prompt_sequence)
    pixel_values, image_grid_thw = concat_images([group for group, _ in units])
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long), "cu_seqlens": cu_seqlens_of(lengths),
        "prefix_of": prefix_of, "pixel_values": pixel_values, "image_grid_thw": image_grid_thw,
        "rows": rows, "lengths": torch.tensor(response_lengths, dtype=torch.long),
        "positions": torch.tensor(positions, dtype=torch.long), "targets": torch.tensor(targets, dtype=torch.long),
    }


def collate(samples, index):
    """Concatenate samples into one packed sequence for model.forward_packed.

    Returns input_ids LongTensor [T], labels LongTensor [T] (when every sample has them),
    cu_seqlens IntTensor [B+1] from 0, `index` (the samples' positions in the original list), and
    the images in sequence order: Qwen2.5-VL's pixel_values [P, D] and image_grid_thw [I, 3] (or
    None), or Llama 3.2 Vision's `concat_tiles` (when a sample has tiles).
    """
    batch = {
        "input_ids": torch.tensor([int(t) for s in samples for t in s["input_ids"]], dtype=torch.long),
        "cu_seqlens": cu_seqlens_of([len(s["input_ids"]) for s in samples]),
        "index": list(index),
    }
    if any("aspect_ratio_ids" in s for s in samples):
        batch.update(concat_tiles(samples))
    else:
        batch["pixel_values"], batch["image_grid_thw"] = concat_images(samples)
    if all("labels" in s for s in samples):
        batch["labels"] = torch.tensor([t for s in samples for t in s["labels"]], dtype=torch.long)
    return batch


# ----------------------------------------------------------------------------- command line

@command_line
def main(argv=None):
    parser = argparse.ArgumentParser(description="Check data files before a job uses them.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="list every bad record as FILE:LINE: reason")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument("--kind", default="auto", choices=["auto", "problems", "conversations"])
    check.add_argument("--skip-bad", action="store_true", help="report counts and exit 0 when only some records are bad")
    args = parser.parse_args(argv)
    failed = False
    for path in args.files:
        try:
            report = check_file(path, args.kind)
        except (DataError, OSError) as e:  # both name the file
            print(e)
            failed = True
            continue
        for line in report.lines():
            print(line)
        print(report.summary())
        failed |= bool(report.bad) and not (args.skip_bad and report.good)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
