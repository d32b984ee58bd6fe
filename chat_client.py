"""The client of an OpenAI-compatible chat-completions server (vLLM, SGLang, the DeepSeek API, any
OpenAI-style endpoint), and the request and reply every model backend speaks: make_cold_data.py's
describer and reasoner, evaluate.py's judge, the synthetic world's teachers (synthetic.Teachers).

    backend = OpenAIBackend("http://localhost:8000/v1", "Qwen2.5-VL-72B-Instruct")
    reply = backend.ask(Request("describe", "Describe the image.", ["cat.png"], problem={}))
    reply.text, reply.reasoning, reply.truncated

Standard library only (urllib): no SDK, threads may share one client.
"""

import base64
import http.client
import io
import json
import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from PIL import Image


class BackendError(Exception):
    """A request that failed for good (after its retries); the record counts as failed and a restart retries it."""


@dataclass
class Request:
    """One call of a step: the rendered prompt and its images for chat models, and the record and the
    template's fields for the synthetic teachers, which read structure instead of pixels."""

    step: str  # "pseudo_cot", "describe" or "reason"
    prompt: str
    images: list
    problem: dict
    fields: dict = field(default_factory=dict)


@dataclass
class Reply:
    """A model's answer: `text` (the message content), `reasoning` (the reasoning text when the server
    returns it separately, as DeepSeek's `reasoning_content`), `truncated` (cut at the token limit)."""

    text: str
    reasoning: str | None = None
    truncated: bool = False


def image_data_url(source):
    """A path or raw bytes as a `data:image/<format>;base64,...` URL, the way chat servers take images."""
    if isinstance(source, bytes):
        raw = source
    else:
        with open(source, "rb") as f:
            raw = f.read()
    image_format = Image.open(io.BytesIO(raw)).format.lower()
    return f"data:image/{image_format};base64,{base64.b64encode(raw).decode()}"


def retry_after(headers):
    """Seconds a 429 / 503 response asks us to wait (`Retry-After: 7`), or None."""
    value = (headers or {}).get("Retry-After", "")
    return float(value) if value.strip().replace(".", "", 1).isdigit() else None


class OpenAIBackend:
    """A client of one OpenAI-compatible server (POST {url}/chat/completions), safe to call from threads.

    Each request is retried on timeouts, dropped connections, 429 and 5xx (and on unreadable bodies)
    up to max_retries times, waiting Retry-After when the server says so, else an exponential
    backoff with jitter: attempt k waits d/2 + uniform(0, d/2), d = min(60, backoff * 2**k), so
    clients that failed together do not retry together. Other 4xx (a bad request, a wrong key) fail
    at once. `timeout` bounds each socket operation (connect, and every read of the response).
    """

    max_backoff = 60.0

    def __init__(self, url, model, api_key=None, timeout=900.0, max_retries=5, backoff=1.0, max_tokens=16384,
                 temperature=0.6, seed=0):
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.timeout, self.max_retries, self.backoff = model, timeout, max_retries, backoff
        self.max_tokens, self.temperature = max_tokens, temperature
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.rng = random.Random(seed)

    def ask(self, request):
        content = request.prompt
        if request.images:
            content = [*({"type": "image_url", "image_url": {"url": image_data_url(s)}} for s in request.images),
                       {"type": "text", "text": request.prompt}]
        body = {"model": self.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": self.max_tokens, "temperature": self.temperature}
        return self.post(json.dumps(body).encode())

    def post(self, body):
        request = urllib.request.Request(self.url, body, self.headers)  # a malformed URL fails here, at once
        for attempt in range(self.max_retries + 1):
            wait = None
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return parse_completion(response.read())
            except urllib.error.HTTPError as e:
                e.close()
                if e.code != 429 and e.code < 500:
                    raise BackendError(f"{self.url}: HTTP {e.code} {e.reason}") from None
                error, wait = f"HTTP {e.code}", retry_after(e.headers)
            except (TimeoutError, ConnectionError, urllib.error.URLError, http.client.HTTPException, ValueError) as e:
                error = f"{type(e).__name__}: {e}"
            if attempt == self.max_retries:
                raise BackendError(f"{self.url}: gave up after {attempt + 1} attempts, last: {error}")
            delay = min(self.max_backoff, self.backoff * 2 ** attempt)
            time.sleep(min(wait, self.max_backoff) if wait is not None else delay / 2 + self.rng.uniform(0, delay / 2))


def parse_completion(body):
    """A chat-completions response body as a Reply; ValueError when it is not one.

    Reasoning servers return the reasoning apart: `reasoning_content` (DeepSeek API, vLLM and SGLang
    reasoning parsers) or `reasoning` (newer vLLM).
    """
    try:
        choice = json.loads(body)["choices"][0]
        message = choice["message"]
        return Reply(message.get("content") or "", message.get("reasoning_content") or message.get("reasoning"),
                     choice.get("finish_reason") == "length")
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise ValueError(f"not a chat completion: {body[:120]!r}") from e
