"""A small OpenAI-compatible chat-completions server for the cold-data tests, on 127.0.0.1.

It answers as the synthetic world's teachers (synthetic.Teachers): it finds the record
by the image it is sent (describer steps) or by the description in the prompt (reasoner step), and
returns the reasoning apart in `reasoning_content`, as the DeepSeek API does. A seeded share of
attempts fails: the handler sleeps past the client's timeout, or answers 429 or 500. Whether
attempt k of a request fails depends only on (seed, request body, k), not on thread timing, and
attempts from the fifth on always succeed, so a client with 5 retries always gets through.
"""

import base64
import hashlib
import json
import random
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import chat_client
import make_cold_data
import synthetic

ALWAYS_SUCCEED_FROM_ATTEMPT = 4


class FlakyChatServer:
    """`with FlakyChatServer(problems, ...) as server:` serves on server.url until the block ends.

    outcomes counts what the server did: ok, timeout, 429, 500, unauthorized, over_budget; unmatched
    counts requests no record matched (answered 400).
    After max_requests every request gets 503 (counted as over_budget), so a runaway client ends.
    """

    def __init__(self, problems, failure_rate=0.3, seed=0, failure_kinds=("timeout", "429", "500"), hang=1.0,
                 delay=0.0, max_requests=1000, api_key=None, error_rate=0.0):
        self.by_image = {base64.b64encode(open(p["images"][0], "rb").read()).decode(): p for p in problems}
        self.by_description = {p["meta"]["description"]: p for p in problems}
        self.teacher = synthetic.Teachers(seed, error_rate)
        self.failure_rate, self.seed, self.failure_kinds = failure_rate, seed, failure_kinds
        self.hang, self.delay, self.max_requests, self.api_key = hang, delay, max_requests, api_key
        self.attempts, self.outcomes, self.unmatched = Counter(), Counter(), 0
        self.lock = threading.Lock()

    def __enter__(self):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.app = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def decide(self, body, authorization):
        """What to do with this request: 'ok' or a failure kind."""
        with self.lock:
            if sum(self.outcomes.values()) >= self.max_requests:
                verdict = "over_budget"
            elif self.api_key is not None and authorization != f"Bearer {self.api_key}":
                verdict = "unauthorized"
            else:
                key = hashlib.sha256(body).hexdigest()
                attempt = self.attempts[key]
                self.attempts[key] += 1
                rng = random.Random(f"{self.seed}:{key}:{attempt}")
                fails = attempt < ALWAYS_SUCCEED_FROM_ATTEMPT and rng.random() < self.failure_rate
                verdict = rng.choice(self.failure_kinds) if fails else "ok"
            self.outcomes[verdict] += 1
            return verdict

    def complete(self, payload):
        """The teacher's chat completion for a request, or None when no record matches it."""
        content = payload["messages"][0]["content"]
        if isinstance(content, str):
            prompt = content
            problem = next((p for d, p in self.by_description.items() if d in prompt), None)
            step = "reason"
        else:
            prompt = next(part["text"] for part in content if part["type"] == "text")
            url = next(part["image_url"]["url"] for part in content if part["type"] == "image_url")
            problem = self.by_image.get(url.split("base64,", 1)[1])
            step = "describe" if "thinking process" in prompt else "pseudo_cot"
        if problem is None:
            return None
        fields = {"description": problem["meta"]["description"], "answer": problem["answer"],
                  "question": make_cold_data.question_with_choices(problem)}
        reply = self.teacher.ask(chat_client.Request(step, prompt, [], problem, fields))
        message = {"role": "assistant", "content": reply.text}
        if step == "reason":
            cot, answer = make_cold_data.split_reply(reply)
            content = f"Final Answer: {answer}" if answer else ""
            message = {"role": "assistant", "content": content, "reasoning_content": cot}
        return {"id": "cmpl-test", "object": "chat.completion", "model": payload["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": "length" if reply.truncated else "stop"}]}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def reply(self, status, payload, headers=()):
        body = json.dumps(payload).encode()
        try:
            self.send_response(status)
            for name, value in [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *headers]:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up first
            pass

    def do_POST(self):
        app = self.server.app
        body = self.rfile.read(int(self.headers["Content-Length"]))
        verdict = app.decide(body, self.headers.get("Authorization"))
        if verdict == "timeout":
            time.sleep(app.hang)  # past the client's timeout; then the connection just closes
        elif verdict == "429":
            self.reply(429, {"error": {"message": "rate limited"}}, [("Retry-After", "0.01")])
        elif verdict == "500":
            self.reply(500, {"error": {"message": "internal error"}})
        elif verdict == "unauthorized":
            self.reply(401, {"error": {"message": "invalid api key"}})
        elif verdict == "over_budget":
            self.reply(503, {"error": {"message": "test request budget spent"}})
        else:
            time.sleep(app.delay)
            completion = app.complete(json.loads(body))
            if completion is None:
                with app.lock:
                    app.unmatched += 1
                self.reply(400, {"error": {"message": "no record matches this request"}})
            else:
                self.reply(200, completion)
