"""make_cold_data.py: the synthetic run keeps only correct, well-formed, trainable CoTs and counts
every outcome; each filter and rule does its job on hand-made cases; the OpenAI client survives a
flaky server and a kill -9 without losing or duplicating a record; the local backend runs."""

import json
import os
import random
import re
import time
from collections import Counter

import pytest

import chat_client
import data
import make_cold_data as M
import rewards
import synthetic
from tests.cold_fake_server import FlakyChatServer
from tests import scripts

SECRET = "sk-test-do-not-leak-4242"


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def split_file(world, split):
    return os.path.join(world, "data", f"{split}.jsonl")


def train_file(world):
    return split_file(world, "train")


def records_by_id(path):
    return {r["id"]: r for r in read_jsonl(path)}


def outputs(out):
    """(kept records, rejected records, summary) of a build."""
    rejected, summary = M.output_paths(str(out))
    with open(summary) as f:
        return read_jsonl(out), read_jsonl(rejected), json.load(f)


def assert_counts_add_up(summary, kept, rejected):
    assert summary["kept"] == len(kept) and summary["filtered_total"] == len(rejected)
    assert sum(summary["filtered"].values()) == summary["filtered_total"]
    filtered = Counter(r["filter"] for r in rejected)
    assert summary["filtered"] == {name: filtered[name] for name in M.FILTERS}
    assert summary["records"] == summary["kept"] + summary["filtered_total"] + summary["failed"] + summary["pending"]


def assert_each_id_once(problems, kept, rejected):
    ids = [r["id"] for r in kept + rejected]
    assert sorted(ids) == sorted(p["id"] for p in problems), "every record written exactly once"


def openai_args(world, out, url, concurrency=4):
    """Both steps on the test server, with a client timeout (0.5 s) the server's hangs exceed."""
    return ["build", "--input", train_file(world), "--out", str(out),
            "--describer", "openai", "--describer-url", url, "--describer-model", "fake-vl",
            "--reasoner", "openai", "--reasoner-url", url, "--reasoner-model", "fake-r1",
            "--concurrency", str(concurrency), "--timeout", "0.5", "--backoff", "0.01",
            "--api-key-env", "COLD_TEST_KEY"]


def lines_written(out):
    """Complete lines in the kept and rejected files (safe to call while a job is writing them)."""
    return sum(open(path).read().count("\n") for path in (out, M.output_paths(str(out))[0]) if os.path.exists(path))


@pytest.fixture
def client_env(monkeypatch):
    monkeypatch.setenv("COLD_TEST_KEY", SECRET)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")  # the test server is local even where a proxy is set


# ----------------------------------------------------------------------------- the synthetic world end to end

def test_synthetic_run_keeps_only_correct_trainable_records(tiny_world, tmp_path):
    problems = {p["id"]: p for p in data.load_problems(train_file(tiny_world))}
    out = tmp_path / "a" / "cold.jsonl"
    M.main(["build", "--input", train_file(tiny_world), "--out", str(out), "--error-rate", "0.2", "--seed", "0"])
    kept, rejected, summary = outputs(out)
    assert_counts_add_up(summary, kept, rejected)
    assert_each_id_once(problems.values(), kept, rejected)
    assert summary["failed"] == summary["pending"] == 0 and summary["records"] == 20
    assert 0 < summary["filtered_total"] < 10  # the mistakes were made and caught, most records survive

    # train_sft.py loads with data.load_conversations (images must resolve) and encodes each chat
    conversations = data.load_conversations(str(out))
    processor = data.ChatProcessor(os.path.join(tiny_world, "model"))
    for c in conversations:
        problem = problems[c["id"]]
        assert os.path.samefile(c["images"][0], problem["images"][0])
        assert c["messages"][0] == {"role": "user", "content": "<image>" + problem["question"]}
        response = c["messages"][1]["content"]
        assert rewards.format_ok(response)
        assert response.startswith("<think> ") and response.endswith(" </think><answer> Final Answer:"
                                                                      f"{problem['answer']} </answer>")
        # the answer is right by the scene itself, not just by the stored gold answer
        assert rewards.extract_answer(response) == synthetic.answer(problem["meta"]["scene"], problem["meta"]["query"])
        assert "description" not in response.lower()
        encoded = processor.encode_conversation(c["messages"], c["images"])
        assert sum(label != -100 for label in encoded["labels"]) > 20
    for r in rejected:  # a rejection is real: the response fails the check it is rejected by
        answer = rewards.extract_answer(r["response"])
        if r["filter"] == "answer":
            assert not rewards.is_equivalent(answer, problems[r["id"]]["answer"])
        if r["filter"] == "consistency":
            assert M.stated_answer(M.cot_text(r["response"])) != answer
    assert summary["cot"]["samples"] == len(kept) and summary["cot"]["words"]["wait"]["total"] > 0

    # the same command again is refused, every output untouched; with --resume it finds everything
    # finished and writes nothing
    command = ["build", "--input", train_file(tiny_world), "--out", str(out), "--error-rate", "0.2", "--seed", "0"]
    files = sorted(p for p in out.parent.iterdir() if p.is_file())
    before = [p.read_bytes() for p in files]
    with pytest.raises(SystemExit, match=f"^{out} holds a run already: --resume continues it, another --out"):
        M.main(command)
    assert [p.read_bytes() for p in files] == before
    M.main(command + ["--resume"])
    assert out.read_bytes() == before[0] and outputs(out)[2]["resumed"] == 20

    # the same file at another concurrency; another seed makes other CoTs
    again, other = tmp_path / "b" / "cold.jsonl", tmp_path / "c" / "cold.jsonl"
    M.main(["build", "--input", train_file(tiny_world), "--out", str(again), "--error-rate", "0.2",
            "--concurrency", "3"])
    M.main(["build", "--input", train_file(tiny_world), "--out", str(other), "--error-rate", "0.2", "--seed", "1"])
    assert again.read_bytes() == out.read_bytes() and records_by_id(other) != records_by_id(out)


def test_records_are_written_in_input_order_whatever_returns_first(tiny_world, tmp_path, monkeypatch):
    """The SFT data order, and so the cold-start model, must not depend on which request finishes first."""
    ids = [p["id"] for p in data.load_problems(train_file(tiny_world))]
    process = M.process

    def first_two_are_slow(problem, *args):
        if problem["id"] in ids[:2]:
            time.sleep(0.3)
        return process(problem, *args)

    monkeypatch.setattr(M, "process", first_two_are_slow)
    out = tmp_path / "cold.jsonl"
    M.main(["build", "--input", train_file(tiny_world), "--out", str(out), "--error-rate", "0.2", "--concurrency", "4"])
    kept, rejected, _ = outputs(out)
    for written in (kept, rejected):
        assert [r["id"] for r in written] == [i for i in ids if i in {r["id"] for r in written}]
    assert {r["id"] for r in kept + rejected} == set(ids)


def test_default_paths_are_the_toy_world():
    args = M.parse_args([])
    assert (args.command, args.input, args.out) == ("build", "runs/toy/data/train.jsonl", "runs/toy/cold/cold.jsonl")
    assert (args.describer, args.reasoner, args.shard) == ("synthetic", "synthetic", (0, 1))
    with pytest.raises(SystemExit):
        M.parse_args(["build", "--reasoner", "openai", "--reasoner-url", "http://x/v1"])  # no model name


def test_every_mistake_is_caught_by_its_filter(tiny_world):
    """At error rate 1 every CoT holds a mistake and each kind meets its filter; at 0 only an
    over-thinker is rejected: an unnoticed slip by the answer filter, a long loop of re-reads by
    the repetition filter."""
    problems = [p for split in ("train", "rl", "test") for p in data.load_problems(split_file(tiny_world, split))]
    rejected_by = {}
    for error_rate in (0.0, 1.0):
        teacher = synthetic.Teachers(seed=0, error_rate=error_rate)
        for p in problems:
            cot, answer, truncated = M.reason(teacher, p, M.describe(teacher, p, M.pseudo_cot(teacher, p)))
            rejected_by[error_rate, p["id"]] = M.failed_filter(p, M.rewrite_description_refs(cot), answer, truncated)
            if error_rate == 0.0 and rejected_by[error_rate, p["id"]] is not None:
                assert "again" in cot  # a re-read
    assert set(v for (rate, _), v in rejected_by.items() if rate == 0.0) <= {None, "answer", "repetition"}
    assert set(v for (rate, _), v in rejected_by.items() if rate == 1.0) == {
        "format", "answer", "consistency", "language_mixing", "repetition"}


def test_kept_synthetic_cots_are_human_like_and_right(tiny_world):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(tiny_world, "model"))
    teacher = synthetic.Teachers(seed=0)
    lengths, corrections = [], 0
    for p in data.load_problems(split_file(tiny_world, "rl")) + data.load_problems(train_file(tiny_world)):
        cot, answer, truncated = M.reason(teacher, p, p["meta"]["description"])
        if M.failed_filter(p, M.rewrite_description_refs(cot), answer, truncated):
            continue
        lengths.append(len(tokenizer(M.format_response(M.rewrite_description_refs(cot), answer)).input_ids))
        assert rewards.is_equivalent(answer, p["answer"], p["choices"], p["answer_type"])
        assert cot.endswith(f"So the answer is {answer}.")
        corrections += "Wait" in cot
    assert len(lengths) >= 25 and 30 <= min(lengths) and 50 <= sum(lengths) / len(lengths) <= 250
    assert 0 < corrections < len(lengths)


def test_the_over_thinker_rereads_more_on_crowded_scenes_and_its_long_chains_are_less_often_right():
    """The cold data's over-thinking (synthetic.reread_steps): the share of CoTs that re-read the
    counts grows with the scene's objects, and each re-read can slip, so before the filters a
    long chain is less often right; a chain without re-reads is always right (error rate 0)."""
    preset = synthetic.PRESETS["toy"]
    rereads_by_objects, right_by_rereads = {}, {}
    for pid, scene, query in synthetic.make_problems(preset, seed=0)["train"][:3000]:
        if query["kind"] == "product":  # its careful chain counts both colors again by design, not over-thinking
            continue
        reply = synthetic.teacher_reasoning(synthetic.describe(scene), synthetic.question_text(query), "",
                                            random.Random(pid))
        rereads = len(re.findall(r"Wait, let me count|let me count the colors once more|Let me check the shapes again",
                                 reply.text))
        record = synthetic.problem_record(pid, scene, query, "")
        right = rewards.is_equivalent(reply.text.rsplit("Final Answer: ", 1)[1], record["answer"], record["choices"],
                                      record["answer_type"])
        rereads_by_objects.setdefault(len(scene["objects"]), []).append(rereads)
        right_by_rereads.setdefault(min(rereads, 4), []).append(right)
    over = {n: sum(r > 0 for r in v) / len(v) for n, v in rereads_by_objects.items()}
    assert over[preset.min_objects] < 0.12 and over[preset.max_objects] > 0.6  # 5% and 75% by design
    asked = sum(len(v) for v in rereads_by_objects.values())
    assert 0.25 < sum(r > 0 for v in rereads_by_objects.values() for r in v) / asked < 0.5
    accuracy = {k: sum(v) / len(v) for k, v in right_by_rereads.items()}
    assert accuracy[0] == 1.0 > accuracy[1] > accuracy[4] and accuracy[4] < 0.95


def test_synthetic_teacher_reads_the_world_back(tiny_world):
    for p in data.load_problems(train_file(tiny_world)):
        assert synthetic.parse_description(p["meta"]["description"]) == p["meta"]["scene"]
        assert synthetic.parse_question(p["question"]) == p["meta"]["query"]
    scene = {"grid": 2, "objects": [{"row": 1, "col": 2, "color": "red", "shape": "square"},
                                    {"row": 2, "col": 1, "color": "red", "shape": "circle"}]}
    counts = synthetic.read_counts(scene)
    assert synthetic.counts_text(counts) == "Red: 2. Green: 0. Blue: 0. Yellow: 0. Squares: 1. Circles: 1. Triangles: 0."
    assert synthetic.write_steps(counts, {"kind": "count", "shape": "square"}) == (["I need the squares: 1."], "1")
    assert synthetic.write_steps(counts, {"kind": "difference", "colors": ["red", "blue"]}) == (
        ["I need the red and blue shapes. Red: 2. Blue: 0.", "Next I subtract: 2 - 0 = 2."], "2")
    most_frequent = {"kind": "most_frequent", "choices": ["blue", "red", "green", "yellow"]}
    assert synthetic.write_steps(counts, most_frequent) == (["The most frequent color is red. Option B is red."], "B")
    assert synthetic.write_steps(counts, most_frequent, by_text=True) == (["The most frequent color is red."], "red")
    assert synthetic.write_steps(counts, {"kind": "most_shape"}) == (None, None)  # one square, one circle: a tie
    product = {"kind": "product", "colors": ["blue", "red"]}
    assert synthetic.write_steps(counts, product, careful=False) == (["Blue times red is 0."], "0")
    assert synthetic.write_steps(counts, product) == (
        ["I need the blue and red shapes. Blue: 0. Red: 2.", "Wait, let me count the blue shapes again. Blue: 0.",
         "Wait, let me count the red shapes again. Red: 2.",
         "Then I multiply, one red shape at a time: 0 x 1 = 0. 0 x 2 = 0.", "That gives 0 x 2 = 0."], "0")
    # a re-read of the colors that slips (red read as 3) and is noticed, then a clean re-read of every count
    steps, seen = synthetic.reread_steps(counts, ("red", "blue"), 1, ScriptedRandom(
        choices=[synthetic.REREADS[1], "red", synthetic.REREADS[0]], randoms=[0.9, 0.1, 0.1, 0.1, 0.9, 0.9]))
    assert steps == ["Hmm, let me count the colors once more. Red: 3. Green: 0. Blue: 0. Yellow: 0.",
                     "Hmm, that does not match. I made a mistake somewhere.",
                     "Wait, let me count again. Red: 2. Green: 0. Blue: 0. Yellow: 0. Squares: 1. Circles: 1. Triangles: 0."]
    assert seen == counts
    with pytest.raises(chat_client.BackendError, match="not a synthetic-world question"):
        synthetic.parse_question("What is the area of the triangle?")


class ScriptedRandom:
    """A random.Random stand-in that returns scripted choices and random() draws in order."""

    def __init__(self, choices, randoms):
        self.choices, self.randoms = list(choices), list(randoms)

    def choice(self, options):
        pick = self.choices.pop(0)
        assert pick in options
        return pick

    def random(self):
        return self.randoms.pop(0)


# ----------------------------------------------------------------------------- replies, filters, rewrite, records

QUESTION = {"id": "q", "images": [], "question": "How many red squares are there?", "answer": "3", "choices": None,
            "answer_type": "integer", "meta": {}}
CHOICE = {**QUESTION, "question": "Which color is most frequent?", "answer": "B", "choices": ["green", "red"],
          "answer_type": "choice"}


@pytest.mark.parametrize("reply, expected", [
    (chat_client.Reply("Final Answer: 3", reasoning="Let me think. 1 + 2 = 3."), ("Let me think. 1 + 2 = 3.", "3")),
    (chat_client.Reply("<think>\nabc\n</think>\n\nThe answer is **B**."), ("abc", "B")),
    (chat_client.Reply("abc</think>So it is \\boxed{12}."), ("abc", "12")),  # servers that drop the opening tag
    (chat_client.Reply("<think> x </think><answer> Final Answer:7 </answer>"), ("x", "7")),
    (chat_client.Reply("x</think>\n\n**Final Answer:** 4.5"), ("x", "4.5")),
    (chat_client.Reply("x</think>\n\nred"), ("x", "red")),
    (chat_client.Reply("<think> never ends", truncated=True), ("never ends", None)),
    (chat_client.Reply("x</think>I think it is probably three or maybe four, hard to tell."), ("x", None)),
    (chat_client.Reply("x</think>\n\nFinal Answer: "), ("x", None)),  # a blank answer, not the answer "Final Answer:"
    (chat_client.Reply("x</think>\n\n**Final Answer:**"), ("x", None)),
])
def test_split_reply(reply, expected):
    assert M.split_reply(reply) == expected


@pytest.mark.parametrize("text, expected", [
    ("So the answer is 3. Let me check again... yes.", "3"),
    ("The answer is 2. Wait, no: the answer is 3.", "3"),
    ("Hence the answer should be B, which is red.", "B"),
    ("The answer is 3.5 cm.", "3.5 cm"),
    ("Final Answer: 5", "5"),
    ("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("No statement here.", None),
])
def test_stated_answer(text, expected):
    assert M.stated_answer(text) == expected


LOOP = "Row 1, column 2: red square. " * 8


@pytest.mark.parametrize("problem, cot, answer, truncated, expected", [
    (QUESTION, "I see 3 red squares. So the answer is 3.", "3", False, None),
    (QUESTION, "I see 3 red squares. So the answer is 3.", "3", True, "format"),  # cut at the token limit
    (QUESTION, "I see 3 red squares. </think> So the answer is 3.", "3", False, "format"),
    (QUESTION, "I see 3 red squares.", None, False, "format"),
    (QUESTION, "I see 4 red squares. So the answer is 4.", "4", False, "answer"),
    (QUESTION, "I see 2 red squares. So the answer is 2.", "3", False, "consistency"),
    (QUESTION, "The answer is 3. Wait, the answer is 2.", "3", False, "consistency"),
    (QUESTION, "The answer is 2. Wait, I missed one: the answer is 3.", "3", False, None),
    (QUESTION, "I see 3 red squares, no statement after that.", "3", False, None),
    (QUESTION, "I see 3 red squares. 所以 the answer is 3.", "3", False, "language_mixing"),
    (QUESTION, "I see 3 red squares. Итак, the answer is 3.", "3", False, "language_mixing"),
    ({**QUESTION, "question": "有多少个红色正方形？"}, "我看到 3 个. So the answer is 3.", "3", False, None),
    (QUESTION, LOOP + "So the answer is 3.", "3", False, "repetition"),
    (QUESTION, "Row 1, column 2: red square. " * 5 + "So the answer is 3.", "3", False, None),  # 10-grams at most 5x
    (QUESTION, "Three.", "3", False, "length"),
    (CHOICE, "Red wins. So the answer is red.", "B", False, None),  # the option's text states the letter
    (CHOICE, "Red wins. So the answer is A.", "B", False, "consistency"),
])
def test_filters(problem, cot, answer, truncated, expected):
    assert M.failed_filter(problem, cot, answer, truncated) == expected


class Replying:
    """A backend that gives every request the same reply."""

    def __init__(self, text):
        self.text = text

    def ask(self, request):
        return chat_client.Reply(self.text)


def test_a_blank_final_answer_is_rejected_for_its_format(tmp_path):
    status, record = M.process(QUESTION, Replying("Caption: squares."), Replying(
        "<think>I see 3 red squares, counted twice over.</think>\n\nFinal Answer: "), M.Limits(), str(tmp_path))
    assert (status, record["filter"]) == ("rejected", "format")
    assert record["response"].endswith("<answer> Final Answer: </answer>")


def test_length_and_repetition_limits():
    assert M.failed_filter(QUESTION, "one two three four five six seven eight nine ten eleven", "3", False,
                           M.Limits(max_words=10)) == "length"
    assert M.max_ngram_count("a b a b a b", 2) == 3
    assert M.max_ngram_count("a, b. a, b.", 4) == 2 and M.max_ngram_count("a b", 3) == 0


REWRITE_CASES = [
    ("Let me look at the description.", "Let me look at the image."),
    ("The image description shows 3 squares.", "The image shows 3 squares."),
    ("According to the given description, it is red.", "According to the image, it is red."),
    ("This description lists two rows.", "The image lists two rows."),
    ("The description says there are 3.", "The image shows there are 3."),
    ("It describes two shapes, as described above.", "It shows two shapes, as shown above."),
    ("THE DESCRIPTION", "THE IMAGE"),
    ("No descriptive words here.", "No descriptive words here."),
]


@pytest.mark.parametrize("text, expected", REWRITE_CASES)
def test_rewrite_description_refs(text, expected):
    assert M.rewrite_description_refs(text) == expected


def test_every_rewrite_rule_is_exercised():
    for pattern, _ in M.DESCRIPTION_REWRITES:
        assert any(re.search(pattern, text, re.IGNORECASE) for text, _ in REWRITE_CASES), pattern


def test_to_conversation_layout(tmp_path):
    image = tmp_path / "data" / "images" / "a.png"
    image.parent.mkdir(parents=True)
    synthetic.render({"grid": 1, "objects": []}).save(image)
    problem = {**QUESTION, "id": "geo/7", "images": [str(image)], "question": "Which is largest?",
               "choices": ["1", "2"], "answer": "B", "answer_type": "choice"}
    record = M.to_conversation(problem, "Two is larger. So the answer is B.", "B", str(tmp_path / "cold"))
    assert record == {"id": "geo/7", "images": ["../data/images/a.png"], "conversations": [
        {"from": "human", "value": "<image>Which is largest?\nChoices:\nA. 1\nB. 2"},
        {"from": "gpt",
         "value": "<think> Two is larger. So the answer is B. </think><answer> Final Answer:B </answer>"}]}
    embedded = M.to_conversation({**problem, "images": [image.read_bytes()]}, "x", "B", str(tmp_path / "cold"))
    assert embedded["images"] == ["images/geo_7-0.png"]
    assert (tmp_path / "cold" / "images" / "geo_7-0.png").read_bytes() == image.read_bytes()


# ----------------------------------------------------------------------------- statistics and rebalancing

def test_stats_counts_table_2_words(tmp_path, capsys):
    path = tmp_path / "conv.jsonl"
    records = [
        {"images": [], "conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value":
                   "<think> Wait, let me check. Hmm. Wait. </think><answer> Final Answer:3 </answer>"}]},
        {"messages": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content":
                     "Alternatively, re-check the mistake."}]},  # no think tags: all of it is the CoT
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    M.main(["stats", str(path)])
    stats = json.loads(capsys.readouterr().out)
    assert {k: v["total"] for k, v in stats["words"].items()} == {
        "wait": 2, "hmm": 1, "mistake": 1, "alternatively": 1, "check": 2, "re-check": 1}
    assert stats["words"]["wait"]["per_sample"] == 1.0
    assert (stats["samples"], stats["mean_cot_words"]) == (2, 5.0)  # 6 and 4 words
    path.write_text("".join(json.dumps(r) + "\n" for r in records + [{"conversations": "oops"}]))
    with pytest.raises(SystemExit, match=f"{path}:3: bad turns"):
        M.main(["stats", str(path)])


REBALANCE_CASES = [
    ("A screenshot of a FLAC audio file.", "file_format",
     "Why does this screenshot show a FLAC file rather than a JPEG image?",
     "The screenshot shows a FLAC audio file. FLAC is an audio format, so the file is a FLAC file, not a JPEG image."),
    ('A red sign that says "STOP" at a street corner.', "text_reading", "What is written on the sign?",
     'The image shows a red sign with the words "STOP" at a street corner, so the sign says "STOP".'),
    ("Three dogs playing in the snow.", "count", "How many dogs are playing in the snow?",
     "The image shows three dogs playing in the snow. Counting them one by one gives 3, so there are 3."),
    ("A red car parked next to a blue truck.", "color_relation", "Which one is red, the car or the truck?",
     "The image shows a red car next to a blue truck. The truck is blue, so the red one is the car."),
    ("A man walking a dog in the rain.", "weather", "What is the weather like in this image, and what shows it?",
     "It is rainy: the image shows a man walking a dog in the rain."),
    ("A city skyline at night, with lights on the river", "time_of_day",
     "At what time of day was this picture taken, and what shows it?",
     "At night: the image shows a city skyline at night, with lights on the river."),
]


@pytest.mark.parametrize("caption, rule, question, answer", REBALANCE_CASES)
def test_rebalance_rule(caption, rule, question, answer):
    assert M.rebalance_caption(caption) == (rule, question, answer)


def test_rebalance_rules_all_tested_and_captions_left_alone():
    assert [case[1] for case in REBALANCE_CASES] == [rule["name"] for rule in M.REBALANCE_RULES]
    assert M.rebalance_caption("A bowl of fruit on a table.") is None
    assert M.rebalance_caption("A red car next to a red truck.") is None  # same colors: no question to ask


def test_rebalance_file_keeps_its_size(tiny_world, tmp_path):
    image = os.path.join(tiny_world, "data", "images", "train-00000.png")
    rows = [
        {"id": "c1", "images": [image], "caption": "A screenshot of a FLAC audio file."},
        {"id": "c2", "images": [image], "caption": "A bowl of fruit on a table."},
        {"id": "c3", "images": [image], "conversations": [{"from": "human", "value": "<image>Describe the image."},
                                                          {"from": "gpt", "value": "Three dogs playing in the snow."}]},
        {"id": "c4", "images": [image], "conversations": [{"from": "human", "value": "<image>How many dogs?"},
                                                          {"from": "gpt", "value": "Three dogs playing in the snow."}]},
    ]
    src, out = tmp_path / "captions.jsonl", tmp_path / "out" / "rebalanced.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    M.main(["rebalance", "--input", str(src), "--out", str(out)])
    records = {r["id"]: r for r in data.load_conversations(str(out))}
    assert list(records) == ["c1", "c2", "c3", "c4"]
    assert records["c1"]["messages"][0]["content"] == "<image>" + REBALANCE_CASES[0][2]
    assert records["c2"]["messages"][0]["content"] == "<image>" + M.DESCRIBE_QUESTION
    assert records["c3"]["messages"][0]["content"] == "<image>How many dogs are playing in the snow?"
    assert records["c4"]["messages"][0]["content"] == "<image>How many dogs?"  # not a description request
    with open(M.output_paths(str(out))[1]) as f:
        summary = json.load(f)
    assert summary["records"] == 4 and summary["unchanged"] == 2
    assert summary["rewritten"] == {"file_format": 1, "text_reading": 0, "count": 1, "color_relation": 0,
                                    "weather": 0, "time_of_day": 0}


# ----------------------------------------------------------------------------- scale and faults

def test_shards_partition_the_input(tiny_world, tmp_path):
    ids = []
    for i in range(3):
        out = tmp_path / f"shard{i}.jsonl"
        M.main(["build", "--input", train_file(tiny_world), "--out", str(out), "--shard", f"{i}/3"])
        kept, rejected, summary = outputs(out)
        assert summary["records"] == len(range(i, 20, 3)) and summary["shard"] == f"{i}/3"
        ids += [r["id"] for r in kept + rejected]
    assert sorted(ids) == [p["id"] for p in data.load_problems(train_file(tiny_world))]
    for bad in ("3/3", "1", "a/b"):
        with pytest.raises(Exception, match="i/N"):
            M.parse_shard(bad)


def test_bad_input_and_torn_output(tiny_world, tmp_path):
    problems = read_jsonl(train_file(tiny_world))
    for p in problems:  # absolute image paths, so the copy can live anywhere
        p["images"] = [os.path.join(tiny_world, "data", p["images"][0])]
    src = tmp_path / "problems.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in problems[:5]) + "{not json\n")
    out = tmp_path / "cold.jsonl"
    with pytest.raises(SystemExit, match=f"{src}:6: malformed JSON"):
        M.main(["build", "--input", str(src), "--out", str(out)])
    # a kill mid-write leaves a torn last line: the restart cuts it and redoes that record
    M.main(["build", "--input", str(src), "--out", str(out), "--skip-bad"])
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:40])
    M.main(["build", "--input", str(src), "--out", str(out), "--skip-bad", "--resume"])
    kept, rejected, summary = outputs(out)
    assert_each_id_once([{"id": p["id"]} for p in problems[:5]], kept, rejected)
    # resumed: the two whole kept lines and every rejected record (an over-thinker's slip may be one)
    assert summary["bad_input"] == 1 and summary["resumed"] == 2 + len(rejected)


def test_synthetic_describer_needs_synthetic_records(tiny_world, tmp_path):
    problems = read_jsonl(train_file(tiny_world))[:2]
    for p in problems:
        p["images"], p["meta"] = [os.path.join(tiny_world, "data", p["images"][0])], {}
    src = tmp_path / "plain.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in problems))
    with pytest.raises(SystemExit, match="train-00000.*synthetic describer"):
        M.main(["build", "--input", str(src), "--out", str(tmp_path / "cold.jsonl")])


def test_openai_backend_survives_a_flaky_server(tiny_world, tmp_path, client_env, capsys):
    problems = data.load_problems(train_file(tiny_world))
    out = tmp_path / "cold.jsonl"
    with FlakyChatServer(problems, failure_rate=0.3, seed=0, api_key=SECRET, error_rate=0.2) as server:
        M.main(openai_args(tiny_world, out, server.url))
    kept, rejected, summary = outputs(out)
    assert_each_id_once(problems, kept, rejected)
    assert_counts_add_up(summary, kept, rejected)
    assert summary["failed"] == 0 and summary["filtered_total"] > 0
    assert min(server.outcomes[kind] for kind in ("timeout", "429", "500")) > 0
    assert server.outcomes["ok"] >= 3 * len(problems) and server.unmatched == 0
    gold = {p["id"]: p["answer"] for p in problems}
    assert all(rewards.extract_answer(r["conversations"][1]["value"]) == gold[r["id"]] for r in kept)
    # the CoT came back as reasoning_content (the content held only the final answer) and was rewritten
    assert len(kept) >= 10 and summary["cot"]["mean_cot_words"] > 20
    assert all("description" not in r["conversations"][1]["value"] for r in kept)
    captured = capsys.readouterr()
    written = "".join(p.read_text() for p in tmp_path.iterdir() if p.is_file())
    assert SECRET not in written + captured.out + captured.err


def test_openai_client_retries_only_transient_errors(tiny_world, tmp_path, client_env):
    problem = data.load_problems(train_file(tiny_world))[0]
    with FlakyChatServer([problem], api_key=SECRET) as server:
        wrong_key = chat_client.OpenAIBackend(server.url, "fake-vl", api_key="sk-wrong", max_retries=5, backoff=0.01)
        with pytest.raises(chat_client.BackendError, match="HTTP 401") as error:
            M.pseudo_cot(wrong_key, problem)
        assert server.outcomes == {"unauthorized": 1} and "sk-wrong" not in str(error.value)
    with FlakyChatServer([problem], failure_rate=1.0, failure_kinds=("500",)) as server:
        client = chat_client.OpenAIBackend(server.url, "fake-vl", max_retries=2, backoff=0.01)
        with pytest.raises(chat_client.BackendError, match="gave up after 3 attempts, last: HTTP 500"):
            M.pseudo_cot(client, problem)
        assert server.outcomes == {"500": 3}
    assert chat_client.retry_after({"Retry-After": "7"}) == 7.0 and chat_client.retry_after({"Retry-After": "Wed, 21 Oct 2015"}) is None


def test_failed_records_are_retried_on_restart(tiny_world, tmp_path, client_env):
    problems = data.load_problems(train_file(tiny_world))
    out = tmp_path / "cold.jsonl"
    with FlakyChatServer(problems, failure_rate=1.0, failure_kinds=("500", "429")) as down:
        M.main(openai_args(tiny_world, out, down.url) + ["--max-retries", "1"])
    kept, rejected, summary = outputs(out)
    assert (len(kept), len(rejected), summary["failed"], summary["pending"]) == (0, 0, 20, 0)
    assert "gave up after 2 attempts" in summary["failures"][0]["error"]
    with FlakyChatServer(problems, failure_rate=0.0) as up:
        M.main(openai_args(tiny_world, out, up.url) + ["--resume"])
    kept, rejected, summary = outputs(out)
    assert_each_id_once(problems, kept, rejected)
    assert (summary["failed"], summary["resumed"], len(kept) + len(rejected)) == (0, 0, 20)


def test_kill_and_restart_loses_and_duplicates_nothing(tiny_world, tmp_path):
    problems = data.load_problems(train_file(tiny_world))
    out = tmp_path / "cold.jsonl"
    env = {**os.environ, "COLD_TEST_KEY": SECRET, "no_proxy": "127.0.0.1,localhost"}
    with FlakyChatServer(problems, failure_rate=0.3, delay=0.05, api_key=SECRET, error_rate=0.2) as server:
        # concurrency 2 and a 50 ms answer: slow enough to be caught mid-run
        args = openai_args(tiny_world, out, server.url, concurrency=2)
        job = scripts.start("make_cold_data.py", args, env=env)
        deadline = time.time() + 120
        while lines_written(out) < 5:
            assert job.poll() is None and time.time() < deadline, "the job ended before it could be killed"
            time.sleep(0.02)
        job.kill()
        job.wait()
        assert 5 <= lines_written(out) < len(problems)
        scripts.run("make_cold_data.py", args + ["--resume"], env=env, check=True, timeout=120)
    kept, rejected, summary = outputs(out)
    assert_each_id_once(problems, kept, rejected)
    assert summary["failed"] == 0 and summary["resumed"] >= 5


def test_local_backend_runs_end_to_end(tiny_world, tmp_path):
    model_dir = os.path.join(tiny_world, "model")
    outs = [tmp_path / "a" / "cold.jsonl", tmp_path / "b" / "cold.jsonl"]
    for out in outs:
        M.main(["build", "--input", train_file(tiny_world), "--out", str(out), "--describer", "local",
                "--describer-model", model_dir, "--reasoner", "local", "--reasoner-model", model_dir,
                "--max-tokens", "4", "--shard", "0/5", "--concurrency", "2"])
    kept, rejected, summary = outputs(outs[0])
    assert_counts_add_up(summary, kept, rejected)
    assert summary["records"] == 4 and summary["failed"] == 0 and summary["pending"] == 0
    # random weights write 4 tokens of noise: no think block, no answer
    assert summary["filtered"]["format"] == 4
    assert records_by_id(M.output_paths(str(outs[1]))[0]) == {r["id"]: r for r in rejected}  # seeded per record
