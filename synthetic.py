"""The embedded default world: colored shapes on a grid, and a Qwen2.5-VL small enough to train on CPU.

Every problem is one image of a grid (4x4 by default) whose cells are empty or hold one shape
(square, circle, triangle) in one color (red, green, blue, yellow), and one question that needs
looking *and* a few reasoning steps:

    count          How many triangles are there?                     integer  one count
    sum            How many shapes are red or blue in total?         integer  two counts, add
    difference     How many more red shapes than blue shapes ...?    integer  two counts, subtract
    most_frequent  Which color appears most often? Choices: A..D     choice   four counts, argmax
    most_shape     Which shape appears most often?                   text     three counts, argmax
    product        What is the number of red shapes times the ...?   integer  two counts, multiply

Every question needs counts that depend on the question (which colors, which shapes). The
cold-start CoT first reads all counts off the image in a fixed order ("Red: 2. Green: 0. ...
Triangles: 1.") and then reasons over the ones the question names. Like Vision-R1-cold it
over-thinks: on a share of problems that grows with the scene's crowding it stops ("Wait, let me
count again.") and reads counts again, sometimes many times and with slips, and it re-checks the
counts a sum or difference needs before the arithmetic. For a product, half its CoTs take a careful
chain (count both colors again, multiply one shape at a time), longer than stage 1's cap and the
one the tiny model carries out, and half state the product at once: the chain whose length pays,
which PTST suppresses in stage 1 and grows back in stage 2. What the tiny model learns of each
step, what GRPO and PTST's length caps do to it, is measured in the README.

Each problem's `meta` holds the structured `scene` and `query` (so answers can be recomputed)
and the exact scene `description` a perfect describer would write. The world's offline teachers
(`Teachers`, make_cold_data.py's `synthetic` describer and reasoner) read them in place of a
captioning MLLM and an R1 reasoner, and make the mistakes the cold-data filters must catch.

One grid cell is 28x28 pixels = one 2x2 group of 14-pixel patches = one merged vision token,
so a 112x112 image costs 16 image tokens.

    python synthetic.py --out runs/toy [--seed 0] [--preset toy]

writes DIR/data/{train,rl,test}.jsonl (problem records), DIR/data/base_sft.jsonl (direct answers
and count read-outs for the train split), DIR/data/images/, and DIR/model/: a byte-level BPE tokenizer
with the Qwen special tokens and a Qwen2-VL-style chat template, a Qwen2-VL image-processor
config sized for these images, and a random-weight Qwen2.5-VL, loadable by transformers'
AutoTokenizer / AutoImageProcessor / AutoModelForImageTextToText like any real checkpoint.

    python synthetic.py --out runs/toy-mllama --arch mllama

writes the same data with a Llama 3.2 Vision in DIR/model/: the same BPE training with Llama 3's
special tokens and <|image|>, Llama 3.2 Vision's chat template, a MllamaImageProcessor config of
56-pixel tiles (a 112x112 image is 2x2 tiles), and a random-weight model of the Preset's sizes.
"""

import argparse
import json
import operator
import os
import random
import re
import time
from dataclasses import dataclass

from PIL import Image, ImageDraw

from chat_client import BackendError, Reply

COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 190, 20)}
COLOR_NAMES = tuple(COLORS)
SHAPES = ("square", "circle", "triangle")
KINDS = ("count", "sum", "difference", "most_frequent", "most_shape", "product")
ANSWER_TYPES = {"count": "integer", "sum": "integer", "difference": "integer",
                "most_frequent": "choice", "most_shape": "text", "product": "integer"}
TWO_COLOR_KINDS = {"sum": operator.add, "difference": operator.sub, "product": operator.mul}  # and their arithmetic
CELL = 28  # pixels per grid cell: patch 14 x merge 2, so each cell is one merged vision token
MARGIN = 5  # pixels between a shape and its cell border
BACKGROUND = (255, 255, 255)
GRID_LINE = (200, 200, 200)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
# Reasoning tags are ordinary text (they survive skip_special_tokens) but atomic, so a tag costs one token.
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
DEFAULT_SYSTEM = "You are a helpful assistant."

# Qwen2-VL's chat template, images only: a default system turn unless the first message is one;
# content is a string or a list of {"type": "image"} / {"type": "text", "text": ...} parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Llama 3's special tokens (`--arch mllama`) at ids 0-4, so bos is 1 and eos (<|eot_id|>) 2; the pad
# token and <|image|> are the last two, after reserved fill: <|image|> is the first embedding row past
# the vocabulary, as 128256 is in the released models
LLAMA_SPECIAL_TOKENS = ["<|reserved_special_token_0|>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                        "<|end_header_id|>"]
LLAMA_PAD = "<|finetune_right_pad_id|>"
LLAMA_IMAGE = "<|image|>"
# Llama 3.2 Vision Instruct's chat format: the system turn (with its knowledge-date lines) only in a
# chat without images, one <|image|> per image part, every turn closed by <|eot_id|>; the date is
# fixed here (the released template takes today's)
MLLAMA_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{%- set ns = namespace(has_images=false) %}"
    "{%- for message in messages %}{%- if message['content'] is not string %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{%- set ns.has_images = true %}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- endfor %}"
    "{%- if not ns.has_images %}{{- '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
    "December 2023\nToday Date: 26 Jul 2024\n\n' + system_message + '<|eot_id|>' }}{%- endif %}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<|image|>' }}{%- else %}{{- part['text'] }}{%- endif %}{%- endfor %}"
    "{%- endif %}{{- '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")

# Words a reasoner writes about this world (cold-start CoT, R1-Zero prompt), so the BPE gives them
# short encodings even though no problem text contains them.
REASONING_TEXT = """
<think> Let me look at the image carefully. I see the grid. First, let me count the shapes.
Then I add the counts. Next I subtract. The most frequent shape is circle. So the answer is </think><answer> Final Answer:A </answer>
Wait, let me check again. Hmm, I made a mistake. Mistake. Alternatively, count row by row.
Wait, let me count again. Hmm, let me count the colors once more. Let me check the shapes again.
Wait, let me look at the image again. Hmm, that does not match. I made a mistake somewhere.
Check: the total is correct. Double-check each row. Let me re-count. Therefore, the final answer is
Row 1: Row 2: Row 3: Row 4: Column 1 has no shapes. There is one red square and two blue circles.
Red: Green: Blue: Yellow: Squares: Circles: Triangles: That gives a total of
one two three four five six seven eight nine ten zero 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16
+ - = 1 + 2 = 3. 5 - 2 = 3. The most frequent color is red. Option A B C D. The image shows
Then I multiply, one blue shape at a time: 2 x 1 = 2. 2 x 2 = 4. Red times blue is 4.
A conversation between User and Assistant. The user asks a question, and the Assistant solves it.
The assistant first thinks about the reasoning process in the mind and then provides the user with
the answer. The reasoning process and answer are enclosed within <think> </think> and <answer>
</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here
</answer>. You are a helpful assistant.
"""


@dataclass(frozen=True)
class Preset:
    """Sizes of the world and of the random-weight model built for it."""

    n_train: int
    n_rl: int
    n_test: int
    grid: int = 4
    min_objects: int = 3
    max_objects: int = 8
    vocab_size: int = 1024  # BPE target; the trainer stops early once no pair repeats
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    # M-RoPE splits the head_dim / 2 = 16 rotary frequencies into (temporal, height, width) bands in
    # Qwen2.5-VL's proportions (16, 24, 24 of 64), with its theta. (Theta 100 with (2, 4, 10) served
    # row/column questions the world no longer asks; with it the model never learned, in the SFT
    # budget tried, to copy the question's words into its answer.)
    mrope_section: tuple = (4, 6, 6)
    rope_theta: float = 1_000_000.0
    vision_depth: int = 4
    vision_hidden_size: int = 64
    vision_heads: int = 4
    vision_intermediate_size: int = 128
    vision_fullatt_blocks: tuple = (1, 3)
    vision_window: int = 56

    @property
    def image_size(self):
        return self.grid * CELL


PRESETS = {
    "toy": Preset(n_train=6000, n_rl=2000, n_test=300),
    "tiny": Preset(n_train=20, n_rl=10, n_test=10),  # tests
}


# ----------------------------------------------------------------------------- scenes and questions

def random_scene(rng, preset):
    """A scene: grid size and objects {row, col, color, shape} (1-based), in reading order."""
    n = rng.randint(preset.min_objects, preset.max_objects)
    cells = sorted(rng.sample(range(preset.grid * preset.grid), n))
    objects = [{"row": c // preset.grid + 1, "col": c % preset.grid + 1,
                "color": rng.choice(list(COLORS)), "shape": rng.choice(SHAPES)} for c in cells]
    return {"grid": preset.grid, "objects": objects}


def scene_key(scene):
    """Identity of a scene's picture: two problems with the same key would share an image."""
    return tuple((o["row"], o["col"], o["color"], o["shape"]) for o in scene["objects"])


def describe(scene):
    """The exact scene description a perfect describer would write: every cell, row by row.

    Reading order is the order of the image's tokens (one per cell).

    >>> describe({"grid": 2, "objects": [{"row": 1, "col": 2, "color": "red", "shape": "square"}]})
    'Row 1: empty, red square. Row 2: empty, empty.'
    """
    cells = {(o["row"], o["col"]): f"{o['color']} {o['shape']}" for o in scene["objects"]}
    grid = range(1, scene["grid"] + 1)
    return " ".join(f"Row {r}: " + ", ".join(cells.get((r, c), "empty") for c in grid) + "." for r in grid)


def color_counts(scene):
    """{color: number of shapes of that color}, every color present as a key."""
    counts = {color: 0 for color in COLORS}
    for o in scene["objects"]:
        counts[o["color"]] += 1
    return counts


def shape_counts(scene):
    """{shape: number of shapes of that kind}, every shape present as a key."""
    counts = {shape: 0 for shape in SHAPES}
    for o in scene["objects"]:
        counts[o["shape"]] += 1
    return counts


def unique_top(counts):
    """The key with the largest count, or None when two or more share it.

    >>> unique_top({"red": 2, "blue": 1}), unique_top({"red": 2, "blue": 2})
    ('red', None)
    """
    top = max(counts.values())
    return max(counts, key=counts.get) if list(counts.values()).count(top) == 1 else None


def tally(scene):
    """The per-color and per-shape counts as text, always in this order: what a model that
    perceives the scene says. (With the earlier rotary settings, theta 100, the tiny model learned
    to read the counts off the image in this fixed order but not in a random one.)

    >>> tally({"grid": 2, "objects": [{"row": 1, "col": 2, "color": "red", "shape": "square"}]})
    'Red: 1. Green: 0. Blue: 0. Yellow: 0. Squares: 1. Circles: 0. Triangles: 0.'
    """
    return counts_text(read_counts(scene))


def make_query(rng, scene, kind):
    """Pick the question's parameters for `kind`, or None when this scene cannot pose it well.

    Parameters are drawn answer-first (balanced_choice), a difference is asked only as larger
    minus smaller, and most_frequent / most_shape need a unique winner.
    """
    counts = color_counts(scene)
    pairs = [(a, b) for a in COLORS for b in COLORS if a < b]
    if kind == "count":
        options = [(n, {"shape": shape}) for shape, n in shape_counts(scene).items()]
    elif kind == "sum":
        options = [(counts[a] + counts[b], {"colors": rng.sample([a, b], 2)}) for a, b in pairs]
    elif kind == "difference":
        options = [(abs(counts[a] - counts[b]), {"colors": sorted([a, b], key=counts.get, reverse=True)})
                   for a, b in pairs if counts[a] != counts[b]]
    elif kind == "product":
        options = [(counts[a] * counts[b], {"colors": rng.sample([a, b], 2)}) for a, b in pairs]
    elif kind == "most_shape":
        if unique_top(shape_counts(scene)) is None:
            return None
        options = [(None, {})]
    elif kind == "most_frequent":
        if unique_top(counts) is None:
            return None
        options = [(None, {"choices": rng.sample(list(COLORS), len(COLORS))})]
    else:
        raise ValueError(f"unknown question kind {kind!r}")
    return {"kind": kind, **balanced_choice(rng, options)} if options else None


def balanced_choice(rng, options):
    """Pick from (answer, params) options: an answer value uniformly first, then params with it.

    Drawing answers first flattens their distribution: a scene with no squares, no circles and
    two triangles asks for a count of 2 half the time, not 1 in 3.
    """
    values = sorted({answer for answer, _ in options}, key=str)
    value = rng.choice(values)
    return rng.choice([params for answer, params in options if answer == value])


def question_text(query):
    """The question the model sees; multiple choice lists its options as `A. red` lines."""
    kind = query["kind"]
    if kind == "count":
        return f"How many {query['shape']}s are there?"
    if kind == "sum":
        return "How many shapes are {} or {} in total?".format(*query["colors"])
    if kind == "difference":
        return "How many more {} shapes than {} shapes are there?".format(*query["colors"])
    if kind == "most_frequent":
        options = "\n".join(f"{letter}. {c}" for letter, c in zip("ABCD", query["choices"]))
        return f"Which color appears most often?\nChoices:\n{options}"
    if kind == "most_shape":
        return "Which shape appears most often?"
    if kind == "product":
        return "What is the number of {} shapes times the number of {} shapes?".format(*query["colors"])
    raise ValueError(f"unknown question kind {kind!r}")


def answer(scene, query):
    """The ground-truth answer string, computed from the scene; None when it has none (a tie for
    the most, which make_query never asks, but a misperceived scene can hold)."""
    return answer_from_counts(read_counts(scene), query)


def read_counts(scene):
    """Every count a read-out states, {color or shape: n}."""
    return {**color_counts(scene), **shape_counts(scene)}


def answer_from_counts(counts, query):
    """The answer counts {color or shape: n} give, or None on a tie for the most.

    >>> answer_from_counts({"red": 2, "blue": 1, "green": 0, "yellow": 0}, {"kind": "difference", "colors": ["red", "blue"]})
    '1'
    """
    kind = query["kind"]
    if kind == "count":
        return str(counts[query["shape"]])
    if kind in TWO_COLOR_KINDS:
        return str(TWO_COLOR_KINDS[kind](*(counts[c] for c in query["colors"])))
    if kind not in ("most_frequent", "most_shape"):
        raise ValueError(f"unknown question kind {kind!r}")
    top = unique_top({k: counts[k] for k in (COLOR_NAMES if kind == "most_frequent" else SHAPES)})
    if top is None or kind == "most_shape":
        return top
    return "ABCD"[query["choices"].index(top)]


def render(scene):
    """Draw the scene: white background, light grid lines, one filled shape per occupied cell."""
    size = scene["grid"] * CELL
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for i in range(1, scene["grid"]):
        draw.line([(i * CELL, 0), (i * CELL, size)], fill=GRID_LINE)
        draw.line([(0, i * CELL), (size, i * CELL)], fill=GRID_LINE)
    for o in scene["objects"]:
        x0, y0 = (o["col"] - 1) * CELL + MARGIN, (o["row"] - 1) * CELL + MARGIN
        x1, y1 = x0 + CELL - 2 * MARGIN, y0 + CELL - 2 * MARGIN
        fill = COLORS[o["color"]]
        if o["shape"] == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        elif o["shape"] == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return image


def make_problems(preset, seed):
    """All splits as {split: [(problem_id, scene, query)]}, deterministic by seed.

    Question kinds cycle so every split is balanced; no scene appears twice in the world,
    so train, rl and test never share an image.
    """
    rng = random.Random(seed)
    seen = set()
    splits = {}
    for split, n in (("train", preset.n_train), ("rl", preset.n_rl), ("test", preset.n_test)):
        problems = []
        while len(problems) < n:
            kind = KINDS[len(problems) % len(KINDS)]
            scene = random_scene(rng, preset)
            query = make_query(rng, scene, kind)
            if query is None or scene_key(scene) in seen:
                continue
            seen.add(scene_key(scene))
            problems.append((f"{split}-{len(problems):05d}", scene, query))
        splits[split] = problems
    return splits


def problem_record(problem_id, scene, query, image_path):
    choices = list(query["choices"]) if query["kind"] == "most_frequent" else None
    return {"id": problem_id, "images": [image_path], "question": question_text(query),
            "answer": answer(scene, query), "choices": choices, "answer_type": ANSWER_TYPES[query["kind"]],
            "meta": {"kind": query["kind"], "description": describe(scene), "scene": scene, "query": query}}


PERCEPTION_QUESTION = "Count the shapes by color and by shape."
# Format instructions an Instruct model follows (the system turn) and the reply each asks for, from
# the question's answer and a short reasoning (write_steps over the true counts). Under the R1-Zero
# prompt, which names both tags, the base then writes them on some samples: Vision-R1-Zero's reward
# has something to reinforce from its first step.
INSTRUCTIONS = (
    ("Answer with the final answer only.", "{answer}"),
    ("Put the final answer within <answer> </answer> tags.", "<answer> {answer} </answer>"),
    ("Think briefly inside <think> </think> tags, then give the answer inside <answer> </answer> tags "
     "as Final Answer: X.", "<think> {reasoning} </think><answer> Final Answer:{answer} </answer>"),
    ("Explain your reasoning briefly, then state the answer.", "{reasoning} So the answer is {answer}."),
)
INSTRUCTION_RATE = 0.5  # base SFT questions asked under one of INSTRUCTIONS; the others plainly


def base_conversations(record):
    """The base model's SFT samples for one train problem, the skills an Instruct model has: the
    question answered directly, or as a format instruction in the system turn asks (INSTRUCTIONS,
    INSTRUCTION_RATE of the questions), and the image's counts read out on request."""
    def chat(suffix, question, reply, system=None):
        return {"id": record["id"] + suffix, "images": record["images"], **({"system": system} if system else {}),
                "conversations": [{"from": "human", "value": "<image>" + question}, {"from": "gpt", "value": reply}]}
    rng = random.Random(record["id"])
    answer, question = record["answer"], record["question"]
    scene, query = record["meta"]["scene"], record["meta"]["query"]
    if rng.random() < INSTRUCTION_RATE:
        system, reply = rng.choice(INSTRUCTIONS)
        reasoning = " ".join(write_steps(read_counts(scene), query, careful=False)[0])
        asked = chat("", question, reply.format(answer=answer, reasoning=reasoning), system)
    else:
        asked = chat("", question, answer)
    return [asked, chat("-perception", PERCEPTION_QUESTION, tally(scene))]


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def write_data(data_dir, splits):
    """Render every image and write the problem splits and base_sft.jsonl; returns the records."""
    os.makedirs(os.path.join(data_dir, "images"), exist_ok=True)
    records = {}
    for split, problems in splits.items():
        records[split] = []
        for problem_id, scene, query in problems:
            image_path = f"images/{problem_id}.png"
            render(scene).save(os.path.join(data_dir, image_path))
            records[split].append(problem_record(problem_id, scene, query, image_path))
        write_jsonl(os.path.join(data_dir, f"{split}.jsonl"), records[split])
    write_jsonl(os.path.join(data_dir, "base_sft.jsonl"), [c for r in records["train"] for c in base_conversations(r)])
    return records


# ----------------------------------------------------------------------------- the cold-data pipeline's teachers
# make_cold_data.py's `synthetic` describer and reasoner: the exact description, and a reasoner that
# reads it like a text-only R1 model, thinks aloud and sometimes makes the mistakes the filters catch

ERROR_KINDS = ("miscount", "hint_leak", "language_mixing", "repetition", "truncated")
# Over-thinking (overthink_rereads, reread_steps): the share of CoTs that read counts again after
# "Wait" grows with the scene's objects, 5% at 3 objects to 75% at 8; a re-read is one count (~16
# tokens), the colors, the shapes or all seven (~35). Chosen so that the kept cold data's lengths
# fall near the paper's CI buckets scaled by 1/32 (docs/method.md §3: 75% of outputs under 4K, 11%
# 4-8K, 14% over 8K; here 62%, 28%, 10% at seed 0, the product's careful chains among the middle
# ones, README) and that stage 1's cap of 128 tokens truncates 44% of its first five steps'
# rollouts (seed 0).
OVERTHINK_SPARSE, OVERTHINK_PER_OBJECT = 0.05, 0.14
REREAD_AGAIN = 0.85  # after a re-read, one more
MAX_REREADS = 16
ONE_COUNT_RATE = 0.5  # re-reads of one count the question needs; the others read several
# The over-thinker's re-check of a count, sum or difference (write_steps' `restated`): after restating
# the counts it needs it counts each again, more often in crowded scenes (10% to 50%), and uses
# what it counted again; RESTATE_SLIP_RATE of the restatements slipped, so the re-check corrects them
RECHECK_SPARSE, RECHECK_PER_OBJECT = 0.1, 0.08
RESTATE_SLIP_RATE = 0.5
SLIP_RATE = 0.3  # a re-read that gets one count wrong
NOTICE_RATE = 0.4  # a slip the reasoner notices, and reads again
CHECK_RATE = 0.5  # CoTs that re-check before concluding
# Product CoTs that take write_steps' careful steps, the others its hasty one: the careful chain is
# the one that pays (a tiny model multiplies two counts it has just written, not two it read off
# the image earlier) and is longer than stage 1's cap, so PTST has a chain to suppress and regrow
CAREFUL_RATE = 0.5
# multiple-choice CoTs that conclude with the option's text ("red") instead of its letter, both
# of which graders accept (rewards.is_equivalent, MathVista's scorer)
TEXT_ANSWER_RATE = 0.3
OPENINGS = ("Let me look at the description.", "Let me read the description row by row.")
CHECKS = ("Let me check again. Yes, that is correct.", "Hmm, let me re-check each row. Yes.",
          "Double-check: yes, that is right.")
QUESTION_PATTERNS = {  # question_text, read back
    "count": r"How many (?P<shape>\w+)s are there\?",
    "sum": r"How many shapes are (?P<first>\w+) or (?P<second>\w+) in total\?",
    "difference": r"How many more (?P<first>\w+) shapes than (?P<second>\w+) shapes are there\?",
    "most_frequent": r"Which color appears most often\?\nChoices:\n(?P<options>(?:[A-D]\. \w+\n?)+)",
    "most_shape": r"Which shape appears most often\?",
    "product": r"What is the number of (?P<first>\w+) shapes times the number of (?P<second>\w+) shapes\?",
}


def parse_description(text):
    """The scene a description states (`describe`, read back); BackendError if none.

    >>> parse_description("Row 1: empty, red square. Row 2: empty, empty.")["objects"]
    [{'row': 1, 'col': 2, 'color': 'red', 'shape': 'square'}]
    """
    rows = re.findall(r"Row (\d+): ([^.]*)\.", text)
    if not rows:
        raise BackendError(f"synthetic reasoner: no 'Row N: ...' in the description {text[:80]!r}")
    objects = []
    for row, cells in rows:
        for col, cell in enumerate(cells.split(", "), 1):
            if cell == "empty":
                continue
            color, _, shape = cell.partition(" ")
            if color not in COLORS or shape not in SHAPES:
                raise BackendError(f"synthetic reasoner: unknown cell {cell!r} in the description")
            objects.append({"row": int(row), "col": col, "color": color, "shape": shape})
    return {"grid": len(rows), "objects": objects}


def parse_question(question):
    """The query a question asks (`question_text`, read back); BackendError if none."""
    for kind, pattern in QUESTION_PATTERNS.items():
        m = re.fullmatch(pattern, question.strip())
        if m is None:
            continue
        if kind == "count":
            return {"kind": kind, "shape": m["shape"]}
        if kind in TWO_COLOR_KINDS:
            return {"kind": kind, "colors": [m["first"], m["second"]]}
        if kind == "most_frequent":
            return {"kind": kind, "choices": re.findall(r"[A-D]\. (\w+)", m["options"])}
        return {"kind": kind}
    raise BackendError(f"synthetic reasoner: not a synthetic-world question: {question[:80]!r}")


def perturb(scene, query, rng):
    """A misperceived scene that changes the answer: one object dropped, recolored, reshaped or
    imagined in an empty cell, or one color or shape mistaken for another throughout (the mistakes
    a reader of a long description makes); None when none changes it."""
    objects, right = scene["objects"], answer(scene, query)
    taken = {(o["row"], o["col"]) for o in objects}
    cells = [(r, c) for r in range(1, scene["grid"] + 1) for c in range(1, scene["grid"] + 1) if (r, c) not in taken]
    candidates = [objects[:i] + objects[i + 1:] for i in range(len(objects))]
    candidates += [objects[:i] + [{**o, "color": color}] + objects[i + 1:]
                   for i, o in enumerate(objects) for color in COLORS if color != o["color"]]
    candidates += [objects + [{"row": r, "col": c, "color": color, "shape": shape}]
                   for r, c in cells for color in COLORS for shape in SHAPES]
    candidates += [objects[:i] + [{**o, "shape": shape}] + objects[i + 1:]
                   for i, o in enumerate(objects) for shape in SHAPES if shape != o["shape"]]
    candidates += [[{**o, key: new if o[key] == old else o[key]} for o in objects]
                   for key, values in (("color", COLORS), ("shape", SHAPES))
                   for old in values for new in values if new != old]
    scenes = [{**scene, "objects": seen} for seen in candidates]
    wrong = [seen for seen in scenes if answer(seen, query) not in (None, right)]
    return rng.choice(wrong) if wrong else None


def counts_text(counts):
    """A read-out of {color or shape: n} (read_counts) in the tally's fixed order.

    >>> counts_text({"red": 1, "green": 0, "blue": 0, "yellow": 0, "square": 1, "circle": 0, "triangle": 0})
    'Red: 1. Green: 0. Blue: 0. Yellow: 0. Squares: 1. Circles: 0. Triangles: 0.'
    """
    return " ".join(count_text(key, counts[key]) for key in COLOR_NAMES + SHAPES)


def count_text(key, n):
    """'Red: 2.' for a color, 'Squares: 2.' for a shape."""
    return f"{key.capitalize()}{'s' if key in SHAPES else ''}: {n}."


def overthink_rereads(crowding, rng):
    """How many times the reasoner reads counts off the image again after its first read-out, in a
    scene of `crowding` objects more than the sparsest.

    It over-thinks with probability OVERTHINK_SPARSE on the sparsest scene, rising by
    OVERTHINK_PER_OBJECT per object (long chains come from hard problems, as in the paper's CI
    analysis), and then re-reads once more with probability REREAD_AGAIN each time.
    """
    if rng.random() >= OVERTHINK_SPARSE + OVERTHINK_PER_OBJECT * crowding:
        return 0
    rereads = 1
    while rereads < MAX_REREADS and rng.random() < REREAD_AGAIN:
        rereads += 1
    return rereads


def slip(counts, keys, rng):
    """The counts with one of `keys` read one off (never below 0): an over-thinker's slip."""
    key = rng.choice(sorted(keys))
    return {**counts, key: counts[key] + 1 if counts[key] == 0 or rng.random() < 0.5 else counts[key] - 1}


REREADS = (  # (opening, the counts it reads again): every count, the colors, the shapes
    ("Wait, let me count again.", COLOR_NAMES + SHAPES), ("Hmm, let me count the colors once more.", COLOR_NAMES),
    ("Let me check the shapes again.", SHAPES))


def needed_counts(query):
    """The counts a question's answer depends on: its shape, its two colors, every color or every shape."""
    kind = query["kind"]
    if kind == "count":
        return (query["shape"],)
    return tuple(query["colors"]) if kind in TWO_COLOR_KINDS else COLOR_NAMES if kind == "most_frequent" else SHAPES


def reread_steps(counts, needed, rereads, rng):
    """The over-thinker's re-reads after the first read-out, and the counts it goes on with.

    A re-read is one count the question needs (`needed`, ONE_COUNT_RATE of them: "Wait, let me
    count the red shapes again. Red: 2.") or one of REREADS. It slips with probability SLIP_RATE
    (one of the counts it reads is off by one); the reasoner notices a slip with probability
    NOTICE_RATE ("Hmm, that does not match.") and reads once more, so noticed slips make chains
    longer; an unnoticed one is what it reasons with, so a long chain is more often wrong (the
    answer filter drops it). E.g. one re-read of the colors without a slip:
    ["Hmm, let me count the colors once more. Red: 2. Green: 0. Blue: 1. Yellow: 0."].
    """
    steps, seen, left = [], counts, rereads
    while left > 0:
        if rng.random() < ONE_COUNT_RATE:
            key = rng.choice(needed)
            opening, keys = count_again(key), (key,)
        else:
            opening, keys = rng.choice(REREADS)
        read = slip(counts, keys, rng) if rng.random() < SLIP_RATE else counts
        seen = {**seen, **{k: read[k] for k in keys}}
        steps.append(" ".join([opening, *(count_text(k, read[k]) for k in keys)]))
        left -= 1
        if seen != counts and rng.random() < NOTICE_RATE:
            steps.append("Hmm, that does not match. I made a mistake somewhere.")
            seen, left = counts, max(left, 1)
    return steps, seen


def write_steps(counts, query, by_text=False, restated=None, careful=True):
    """The reasoning steps over a read-out's counts and the answer they reach: the counts the
    question needs, restated under their read-out labels, then its arithmetic. With `by_text`, a
    multiple-choice answer is the option's text, not its letter. (None, None) when the counts
    tie for the most.

    With `restated` (counts; the over-thinker's re-check of a count, sum or difference), the
    restatement says what `restated` has, a slip sometimes; then each needed count is counted
    again after "Wait" ("Hmm, I misread it before." where the restatement slipped) and the
    arithmetic uses the counts read again. {"red": 2, "blue": 0, ...} with restated red 3 for
    2 - 0: ["I need the red and blue shapes. Red: 3. Blue: 0.", "Wait, let me count the red shapes
    again. Red: 2. Hmm, I misread it before.", "Wait, let me count the blue shapes again. Blue:
    0.", "Next I subtract: 2 - 0 = 2."].

    A product's steps are `careful` ones or a hasty one. The careful steps restate the two counts,
    count both again (as `restated` does) and multiply one shape of the second color at a time:
    for red 2 times blue 3, "Then I multiply, one blue shape at a time: 2 x 1 = 2. 2 x 2 = 4. 2 x 3
    = 6." and "That gives 2 x 3 = 6." (~160 tokens in all, over stage 1's cap of 128 and under
    stage 2's 256). The hasty step states it: ["Red times blue is 6."] (~80 tokens in all).
    """
    kind, answer = query["kind"], answer_from_counts(counts, query)
    if answer is None:
        return None, None
    if kind == "most_frequent":
        winner = query["choices"]["ABCD".index(answer)]
        return [f"The most frequent color is {winner}." + ("" if by_text else f" Option {answer} is {winner}.")], \
            winner if by_text else answer
    if kind == "most_shape":
        return [f"The most frequent shape is {answer}."], answer
    said = restated or counts
    keys = needed_counts(query)
    if kind == "product":
        if not careful:
            return [f"{keys[0].capitalize()} times {keys[1]} is {answer}."], answer
        restated = restated or counts  # the careful chain counts both again
    if kind == "count":
        steps = [f"I need the {keys[0]}s: {said[keys[0]]}."]
    else:
        steps = [f"I need the {keys[0]} and {keys[1]} shapes. " + " ".join(count_text(k, said[k]) for k in keys)]
    if restated is not None:
        steps += [f"{count_again(key)} {count_text(key, counts[key])}"
                  + (" Hmm, I misread it before." if said[key] != counts[key] else "") for key in keys]
    if kind in ("sum", "difference"):
        sign, verb = ("+", "Then I add the counts") if kind == "sum" else ("-", "Next I subtract")
        steps.append(f"{verb}: {counts[keys[0]]} {sign} {counts[keys[1]]} = {answer}.")
    if kind == "product":
        first, second = (counts[k] for k in keys)
        by_shape = " ".join(f"{first} x {k} = {first * k}." for k in range(1, second + 1))
        steps.append(f"Then I multiply, one {keys[1]} shape at a time: {by_shape}" if second else
                     f"Then I multiply: {first} x 0 = 0.")
        steps.append(f"That gives {first} x {second} = {answer}.")
    return steps, answer


def count_again(key):
    """The over-thinker's "Wait, let me count the red shapes again." (or "the squares")."""
    return f"Wait, let me count the {key}{' shapes' if key in COLORS else 's'} again."


def teacher_pseudo_cot(problem, rng):
    """The offline describer's pseudo-CoT: a caption and the numbered steps to the gold answer."""
    scene, query = problem["meta"]["scene"], problem["meta"]["query"]
    steps = [tally(scene), *write_steps(read_counts(scene), query)[0]]
    caption = f"Caption: a {scene['grid']}x{scene['grid']} grid with {len(scene['objects'])} colored shapes."
    return "\n".join([caption, *(f"Step {i}: {s}" for i, s in enumerate(steps, 1)), f"Answer: {problem['answer']}"])


def teacher_reasoning(description, question, hint, rng, error_rate=0.0):
    """The offline reasoner: parse the description and question, solve, and think aloud, R1 style.

    The CoT opens on the description, reads every count, over-thinks on some (reread_steps: "Wait,
    let me count again." and every count again, more often on crowded scenes, slips included),
    reasons over the counts the question needs, sometimes re-checks, and concludes "So the answer
    is X."; the reply is `<think>\\nCOT\\n</think>\\n\\nFinal Answer: X`. With probability error_rate it makes one
    mistake of ERROR_KINDS, each of which one filter catches:
      miscount         misperceives the scene and reasons consistently to a wrong answer (answer)
      hint_leak        misperceives, concludes wrongly, then writes the hinted answer (consistency)
      language_mixing  switches to Chinese mid-sentence, as R1 models do (language_mixing)
      repetition       gets stuck repeating one sentence (repetition)
      truncated        never stops thinking and hits the token limit (format)
    """
    scene, query = parse_description(description), parse_question(question)
    if answer(scene, query) is None:
        raise BackendError(f"synthetic reasoner: the description does not answer {question!r}")
    error = rng.choice(ERROR_KINDS) if rng.random() < error_rate else None
    check, by_text = (rng.random() < rate for rate in (CHECK_RATE, TEXT_ANSWER_RATE))
    seen = (perturb(scene, query, rng) or scene) if error in ("miscount", "hint_leak") else scene
    first = read_counts(seen)
    crowding, needed = len(scene["objects"]) - PRESETS["toy"].min_objects, needed_counts(query)
    rereads, counts = reread_steps(first, needed, overthink_rereads(crowding, rng), rng)
    restated = None
    counted = query["kind"] == "count" or query["kind"] in TWO_COLOR_KINDS  # an answer from counts alone
    if counted and rng.random() < RECHECK_SPARSE + RECHECK_PER_OBJECT * crowding:
        restated = slip(counts, needed, rng) if rng.random() < RESTATE_SLIP_RATE else counts
    careful = rng.random() < CAREFUL_RATE if query["kind"] == "product" else True
    steps, concluded = write_steps(counts, query, by_text, restated, careful)
    if steps is None:  # a slip that ties the most frequent: the reasoner goes back to its first read-out
        steps, concluded = write_steps(first, query, by_text)
    conclusion = f"So the answer is {concluded}."
    sentences = [rng.choice(OPENINGS), counts_text(first), *rereads, *steps, *([rng.choice(CHECKS)] if check else []),
                 conclusion]
    if error == "language_mixing":
        sentences[-1] = f"所以 the answer is {concluded}."
    elif error == "repetition":
        i = rng.randrange(len(sentences) - 1)
        sentences[i:i + 1] = [sentences[i]] * rng.randint(8, 12)
    cot = " ".join(sentences)
    if error == "truncated":
        return Reply("<think>\n" + cot[:rng.randint(len(cot) // 3, 2 * len(cot) // 3)], truncated=True)
    final = hint if error == "hint_leak" else concluded
    return Reply(f"<think>\n{cot}\n</think>\n\nFinal Answer: {final}")


class Teachers:
    """The synthetic world's offline teachers: the describer returns the record's exact scene
    description, the reasoner is teacher_reasoning. Deterministic per (seed, record, step)."""

    def __init__(self, seed=0, error_rate=0.0):
        self.seed, self.error_rate = seed, error_rate

    def ask(self, request):
        rng = random.Random(f"{self.seed}:{request.problem['id']}:{request.step}")
        if request.step == "pseudo_cot":
            return Reply(teacher_pseudo_cot(request.problem, rng))
        if request.step == "describe":
            return Reply(request.problem["meta"]["description"])
        return teacher_reasoning(request.fields["description"], request.fields["question"],
                                   request.fields["answer"], rng, self.error_rate)


# ----------------------------------------------------------------------------- tokenizer, processor, model

def world_bpe(texts, vocab_size, special_tokens):
    """A byte-level BPE with Qwen2's pre-tokenizer (digits split one by one, so numbers are read
    digit-wise) trained on `texts`, `special_tokens` first (ids 0, 1, ...), then the reasoning tags."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    qwen2_split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(qwen2_split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=special_tokens)
    bpe.train_from_iterator(texts, trainer=trainer)
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    return bpe


def train_tokenizer(texts, vocab_size):
    """A Qwen2-style byte-level BPE trained on this world's text, as a transformers fast tokenizer:
    the Qwen special tokens with `<|im_end|>` as eos and `<|endoftext|>` as pad, and the chat template."""
    from transformers import Qwen2TokenizerFast

    return Qwen2TokenizerFast(tokenizer_object=world_bpe(texts, vocab_size, SPECIAL_TOKENS), eos_token="<|im_end|>",
                              pad_token="<|endoftext|>", unk_token=None, bos_token=None, chat_template=CHAT_TEMPLATE,
                              model_max_length=32768)


def llama_tokenizer(bpe, vocab_size):
    """`bpe` (trained with LLAMA_SPECIAL_TOKENS first) as a Llama 3 fast tokenizer of `vocab_size`
    text tokens: reserved special tokens fill it to vocab_size - 1 entries, then LLAMA_PAD (id
    vocab_size - 1) and <|image|> (id vocab_size, past the vocabulary as in the released models);
    bos <|begin_of_text|>, eos <|eot_id|>, MLLAMA_CHAT_TEMPLATE. E.g. a 300-token BPE at vocab_size
    320 gets reserved tokens 1..19, pad 319, <|image|> 320."""
    from transformers import PreTrainedTokenizerFast

    reserved = [f"<|reserved_special_token_{k}|>" for k in range(1, vocab_size - bpe.get_vocab_size())]
    bpe.add_special_tokens(reserved + [LLAMA_PAD, LLAMA_IMAGE])
    assert bpe.token_to_id(LLAMA_PAD) == vocab_size - 1 and bpe.token_to_id(LLAMA_IMAGE) == vocab_size
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=LLAMA_SPECIAL_TOKENS[1],
                                   eos_token=LLAMA_SPECIAL_TOKENS[2], pad_token=LLAMA_PAD,
                                   chat_template=MLLAMA_CHAT_TEMPLATE, model_max_length=32768)


def train_llama_tokenizer(texts, vocab_size):
    """The world's BPE (as train_tokenizer's) with Llama 3's special tokens, its text vocabulary
    rounded up to a multiple of 64 (the pad token included)."""
    bpe = world_bpe(texts, vocab_size, LLAMA_SPECIAL_TOKENS)
    return llama_tokenizer(bpe, -(-(bpe.get_vocab_size() + 1) // 64) * 64)


def world_texts(records):
    """Every text the world contains, in a fixed order (the BPE trainer's input)."""
    # twice, so even their rarest words reach the trainer's min_frequency
    texts = [REASONING_TEXT, PERCEPTION_QUESTION, *(system for system, _ in INSTRUCTIONS)] * 2
    for split in records.values():
        for r in split:
            texts += [r["question"], r["meta"]["description"], r["answer"], tally(r["meta"]["scene"])]
    return texts


def image_processor(preset):
    """Qwen2-VL image processor whose pixel bounds keep this world's images at their size."""
    import data

    return data.qwen2vl_image_processor_class()(min_pixels=CELL * CELL, max_pixels=preset.image_size ** 2,
                                                patch_size=14, temporal_patch_size=2, merge_size=2)


def build_model(tokenizer, preset, seed):
    """A random-weight Qwen2.5-VL (fixed torch seed) wired to the tiny tokenizer's special-token ids."""
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    vocab_size = -(-len(tokenizer) // 64) * 64
    head_dim = preset.hidden_size // preset.num_heads
    assert sum(preset.mrope_section) == head_dim // 2, "mrope_section must split head_dim / 2"
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=preset.hidden_size,
                         intermediate_size=preset.intermediate_size, num_hidden_layers=preset.num_layers,
                         num_attention_heads=preset.num_heads, num_key_value_heads=preset.num_kv_heads,
                         max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=ids("<|im_end|>"),  # not Qwen's ids, outside this vocabulary
                         rope_parameters={"rope_type": "default", "rope_theta": preset.rope_theta,
                                          "mrope_section": list(preset.mrope_section)},
                         dtype="float32"),
        vision_config=dict(depth=preset.vision_depth, hidden_size=preset.vision_hidden_size,
                           num_heads=preset.vision_heads, intermediate_size=preset.vision_intermediate_size,
                           out_hidden_size=preset.hidden_size, fullatt_block_indexes=list(preset.vision_fullatt_blocks),
                           window_size=preset.vision_window, patch_size=14, temporal_patch_size=2,
                           spatial_merge_size=2, in_channels=3),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        tie_word_embeddings=True, dtype="float32")
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(eos_token_id=[ids("<|im_end|>"), ids("<|endoftext|>")],
                                               pad_token_id=ids("<|endoftext|>"))
    return model


def mllama_image_processor(preset):
    """MllamaImageProcessor with tiles of 2x2 cells (56 pixels, 4x4 patches of 14) and as many tiles
    as a world image holds, so a 112x112 image is 2x2 tiles at its own size."""
    import data

    tile = 2 * CELL
    return data.mllama_image_processor_class()(size={"height": tile, "width": tile},
                                               max_image_tiles=(preset.image_size // tile) ** 2)


def open_gates(model, seed):
    """Draw every tanh gate of a Llama 3.2 Vision (zero at transformers' init, where images would
    not count) from U(0.5, 1.5), in parameter-name order with a `seed`ed generator."""
    import torch

    g = torch.Generator().manual_seed(seed)
    gates = ("gate", "gate_attn", "gate_ffn", "cross_attn_attn_gate", "cross_attn_mlp_gate")
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.rsplit(".", 1)[-1] in gates:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model


def build_mllama_model(tokenizer, preset, seed):
    """A random-weight Llama 3.2 Vision (fixed torch seed, gates opened) of the Preset's sizes:
    preset.num_layers self-attention layers with a cross-attention layer after the first and the
    third (as the 11B model has one after every fourth), llama3 RoPE; a vision encoder of
    vision_depth local and 2 global layers over the processor's tiles."""
    import torch
    from transformers import GenerationConfig, MllamaConfig, MllamaForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    vocab_size = ids(LLAMA_IMAGE)
    tile = mllama_image_processor(preset)
    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=1024)
    config = MllamaConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=preset.hidden_size,
                         intermediate_size=preset.intermediate_size, num_hidden_layers=preset.num_layers + 2,
                         num_attention_heads=preset.num_heads, num_key_value_heads=preset.num_kv_heads,
                         cross_attention_layers=[1, 4], max_position_embeddings=4096, rope_parameters=rope,
                         rms_norm_eps=1e-5, pad_token_id=ids(LLAMA_PAD), bos_token_id=ids(LLAMA_SPECIAL_TOKENS[1]),
                         eos_token_id=ids(LLAMA_SPECIAL_TOKENS[2]), tie_word_embeddings=False, dtype="float32"),
        vision_config=dict(hidden_size=preset.vision_hidden_size, intermediate_size=preset.vision_intermediate_size,
                           num_hidden_layers=preset.vision_depth, num_global_layers=2,
                           attention_heads=preset.vision_heads, image_size=tile.size["height"], patch_size=14,
                           max_num_tiles=tile.max_image_tiles, intermediate_layers_indices=[1, 3],
                           vision_output_dim=3 * preset.vision_hidden_size),
        image_token_index=ids(LLAMA_IMAGE), tie_word_embeddings=False, dtype="float32")
    torch.manual_seed(seed)
    model = open_gates(MllamaForConditionalGeneration(config), seed)
    model.generation_config = GenerationConfig(eos_token_id=[ids(LLAMA_SPECIAL_TOKENS[2])], pad_token_id=ids(LLAMA_PAD),
                                               bos_token_id=ids(LLAMA_SPECIAL_TOKENS[1]))
    return model


ARCHS = {  # --arch: (tokenizer, image processor, model) builders
    "qwen2_5_vl": (train_tokenizer, image_processor, build_model),
    "mllama": (train_llama_tokenizer, mllama_image_processor, build_mllama_model),
}


def build(out, preset="toy", seed=0, arch="qwen2_5_vl"):
    """Write the world under `out`: data/ (splits, images, base_sft.jsonl) and model/ (a random
    `arch`: Qwen2.5-VL or Llama 3.2 Vision). Returns out."""
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    make_tokenizer, make_image_processor, make_model = ARCHS[arch]
    records = write_data(os.path.join(out, "data"), make_problems(preset, seed))
    model_dir = os.path.join(out, "model")
    tokenizer = make_tokenizer(world_texts(records), preset.vocab_size)
    tokenizer.save_pretrained(model_dir)
    make_image_processor(preset).save_pretrained(model_dir)
    make_model(tokenizer, preset, seed).save_pretrained(model_dir)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory (data/ and model/ go here)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="toy", choices=sorted(PRESETS))
    parser.add_argument("--arch", default="qwen2_5_vl", choices=sorted(ARCHS),
                        help="the random model: Qwen2.5-VL, or Llama 3.2 Vision (mllama)")
    args = parser.parse_args()
    start = time.time()
    build(args.out, args.preset, args.seed, args.arch)
    p = PRESETS[args.preset]
    print(f"wrote {args.out}/data ({p.n_train} train, {p.n_rl} rl, {p.n_test} test problems) "
          f"and {args.out}/model in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
