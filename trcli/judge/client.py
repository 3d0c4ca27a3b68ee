"""A small client for OpenAI-compatible chat-completion endpoints (OpenAI, vLLM, TGI, ...).

Retries 408, 429, 5xx, timeouts, connection errors and malformed answers with exponential backoff,
honouring Retry-After (and OpenAI's retry-after-ms); every answer goes through the on-disk cache
first; a cost budget reserves each request's worst case before sending it, so the spend never
passes --max-cost-usd. Thread-safe: the stage calls it from a bounded thread pool.

Why httpx and not the ``openai`` SDK: the SDK retries inside one ``create()`` call, where trcli
cannot keep its guarantees. (1) Budget: every attempt may be billed (a request that timed out on
our side may still complete on the server), so the worst case is reserved before *each* attempt
and settled after it; the SDK has no hook around an attempt that fails with an exception, so it
would have to reserve (max_retries + 1) worst cases per question, refusing items that fit.
(2) Retry-After: the SDK waits up to 120 s and does not retry at all above that, with no cap of
its own and only an INFO log line; trcli caps the wait (BACKOFF_MAX) and says the wait it used.
(3) A 200 whose body is not a chat completion (an HTML page from a proxy, a gzip header on plain
bytes, content that is a list) is returned by the SDK, not retried; trcli retries it like a 5xx,
within the same --max-retries count, and never caches it. With the SDK's retries off
(max_retries=0) all of this stays here and the SDK would only replace the one ``httpx`` call
below, for six more packages (openai, httpx2, httpcore2, jiter, truststore, sniffio) and a second
HTTP stack; it also reads OPENAI_ORG_ID / OPENAI_PROJECT_ID from the environment and sends them
as headers to whatever --base-url names.

The API key is only ever put in the Authorization header. Everything an endpoint sends back is
scrubbed of it (:class:`Scrubber`) before trcli parses, caches, writes or prints it: OpenAI echoes
part of a wrong key in its 401 message, and a proxy may echo the whole header in a 200 answer.
"""

from __future__ import annotations

import base64
import json
import math
import random
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

import httpx

from trcli.errors import TrcliError, UsageError
from trcli.judge.cache import Cache

# Backoff before retry n (0-based) is about BACKOFF_BASE * 2**n seconds; no wait (a server's
# Retry-After included) is longer than BACKOFF_MAX. Module constants so that tests can make them small.
BACKOFF_BASE = 1.0
BACKOFF_MAX = 60.0

# USD per 1K tokens (input, output), list prices. Longest prefix wins ("gpt-4o-mini" before "gpt-4").
PRICES = {
    "gpt-4o-mini": (0.00015, 0.0006),
    "gpt-4o": (0.0025, 0.01),
    "gpt-4.1-nano": (0.0001, 0.0004),
    "gpt-4.1-mini": (0.0004, 0.0016),
    "gpt-4.1": (0.002, 0.008),
    "gpt-4-turbo": (0.01, 0.03),
    "gpt-4-32k": (0.06, 0.12),
    "gpt-4": (0.03, 0.06),
    "gpt-3.5-turbo": (0.0005, 0.0015),
}


def price(model: str) -> tuple[float, float] | None:
    matches = [name for name in PRICES if model.startswith(name)]
    return PRICES[max(matches, key=len)] if matches else None


def cost_usd(model: str, usage: dict) -> float | None:
    rates = price(model)
    if rates is None:
        return None
    return (usage.get("prompt_tokens", 0) * rates[0] + usage.get("completion_tokens", 0) * rates[1]) / 1000


def clean_usage(value) -> dict:
    """{"prompt_tokens", "completion_tokens"} from an answer's ``usage`` when both are non-negative
    numbers, else {}: a missing or malformed usage is unknown, never zero."""
    if not isinstance(value, dict):
        return {}
    out = {}
    for key in ("prompt_tokens", "completion_tokens"):
        n = value.get(key)
        if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n < 0:
            return {}
        out[key] = math.ceil(n)
    return out


def check_base_url(url: str) -> None:
    """A malformed --base-url is a usage error at once, not five retries."""
    try:
        parsed = httpx.URL(url)
        ok = parsed.scheme in ("http", "https") and bool(parsed.host) and (parsed.port or 1) <= 65535
    except (httpx.InvalidURL, TypeError, ValueError):
        ok = False
    if not ok:
        raise UsageError(f"--base-url {url!r} is not an http(s) URL with a host (e.g. http://127.0.0.1:8000/v1)")


# ---------------------------------------------------------------- budget

class BudgetExhausted(Exception):
    """The next request's worst case does not fit in --max-cost-usd; nothing was sent."""


@dataclass
class Budget:
    """Settled spend plus the reservations of requests in flight, which never pass ``limit``.

    A request reserves its worst-case cost before it is sent and settles at the cost its answer
    reports (at the reservation when the answer reports no usable usage, or none came back). A
    request that does not fit waits for those in flight; it is refused only when nothing is in
    flight and it still does not fit. An endpoint reporting more than the worst case (one ignoring
    max_tokens, say) is taken at its word, and later reservations grow by the same factor."""

    limit: float | None
    spent: float = 0.0
    reserved: float = 0.0
    in_flight: int = 0
    overrun: float = 1.0
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def reserve(self, worst: float) -> float:
        with self._cond:
            while True:
                need = worst * self.overrun
                if self.limit is None or self.spent + self.reserved + need <= self.limit:
                    self.reserved += need
                    self.in_flight += 1
                    return need
                if self.in_flight == 0:
                    raise BudgetExhausted
                self._cond.wait()

    def settle(self, held: float, actual: float | None) -> None:
        """``actual`` None: unknown, counted as ``held``."""
        with self._cond:
            actual = held if actual is None else actual
            self.in_flight -= 1
            self.reserved = max(0.0, self.reserved - held) if self.in_flight else 0.0
            self.spent += actual
            if held > 0 and actual > held:
                self.overrun *= actual / held
            self._cond.notify_all()


# ---------------------------------------------------------------- the key

# OpenAI-style keys and their masked forms ("sk-proj-****abcd"), not words such as "risk-averse".
SK_PATTERN = re.compile(r"\bsk-(?:[A-Za-z0-9_\-]{16,}|[A-Za-z0-9_\-]*\*[A-Za-z0-9_\-*]*)")
RUN = 8  # a run of this many characters of the key (or of its base64 forms) is scrubbed


def _base64_forms(secret: bytes) -> list[str]:
    """The parts of base64(x + secret + y) that depend on the secret alone, for each of the three
    alignments, in the standard and URL-safe alphabets (e.g. the key inside a Basic auth header)."""
    forms = []
    for pad in range(3):
        encoded = base64.b64encode(b"\0" * pad + secret).decode().rstrip("=")
        start, stop = math.ceil(8 * pad / 6), (8 * (pad + len(secret))) // 6
        for text in (encoded, encoded.replace("+", "-").replace("/", "_")):
            forms.append(text[start:stop])
    return forms


class Scrubber:
    """Removes the API key from text: the key, its base64 forms, any run of RUN or more of their
    characters (case-insensitively: a key echoed in part or in another format), and OpenAI-style
    ``sk-...`` keys. A key shorter than RUN (a placeholder such as "EMPTY" for a local server) is
    removed where it stands as a whole word, in its own case; one shorter than 4 is left alone."""

    def __init__(self, key: str | None):
        pieces: set[str] = set()
        self._short = None
        if key and len(key) >= RUN:
            for secret in [key, *_base64_forms(key.encode())]:
                pieces.update(secret[i:i + RUN] for i in range(len(secret) - RUN + 1))
        elif key and len(key) >= 4:
            self._short = re.compile(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])")
        alternatives = "|".join(re.escape(p) for p in sorted(pieces))
        self._find = re.compile(f"(?=({alternatives}))", re.IGNORECASE) if pieces else None

    def __call__(self, text: str) -> str:
        text = SK_PATTERN.sub("sk-***", text)
        if self._short is not None:
            text = self._short.sub("***", text)
        if self._find is None:
            return text
        spans: list[list[int]] = []  # merged [start, end) of every occurrence
        for m in self._find.finditer(text):
            start, end = m.start(), m.start() + len(m.group(1))
            if spans and start <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], end)
            else:
                spans.append([start, end])
        out, last = [], 0
        for start, end in spans:
            out += [text[last:start], "***"]
            last = end
        return "".join(out) + text[last:]

    def json(self, value):
        """Every string (keys included) of a JSON value, scrubbed."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, list):
            return [self.json(v) for v in value]
        if isinstance(value, dict):
            return {self(str(k)): self.json(v) for k, v in value.items()}
        return value


# ---------------------------------------------------------------- answers

class BadAnswer(ValueError):
    """A 200 whose body is not a chat completion: retried like a 5xx, never cached."""


def answer_text(raw) -> str:
    """choices[0].message.content of a chat completion; null content (a refusal) is empty text."""
    if not isinstance(raw, dict):
        raise BadAnswer(f"a JSON {type(raw).__name__} instead of an object")
    choices = raw.get("choices")
    message = choices[0].get("message") if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
    if not isinstance(message, dict):
        raise BadAnswer("no choices[0].message")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise BadAnswer(f"choices[0].message.content that is a JSON {type(content).__name__}, not text")
    return content or ""


@dataclass
class Reply:
    text: str
    usage: dict
    cached: bool
    retries: int
    raw: dict


class Client:
    def __init__(self, base_url: str, model: str, api_key: str | None, cache: Cache, *, timeout: float,
                 max_retries: int, temperature: float, max_tokens: int, budget: Budget, concurrency: int):
        check_base_url(base_url)
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.scrub = Scrubber(api_key)
        self.cache = cache
        self.max_retries = max_retries
        self.sampling = {"temperature": temperature, "max_tokens": max_tokens}
        self.budget = budget
        if api_key is not None and not (api_key.isascii() and api_key.isprintable()):
            raise UsageError("the API key holds characters an HTTP header cannot carry (check --api-key-env)")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(headers=headers, timeout=timeout,
                                  limits=httpx.Limits(max_connections=concurrency))
        self.sent = 0  # HTTP requests actually made, retries included
        self._count = threading.Lock()

    def close(self) -> None:
        self._http.close()

    def body(self, messages: list[dict], **extra) -> dict:
        """The exact request: also the cache key. ``extra`` adds or overrides request fields (a
        protocol's own max_tokens, logprobs)."""
        return {"model": self.model, "messages": messages, **self.sampling, **extra}

    def worst_case(self, data: bytes, max_tokens: int | None = None) -> float:
        """Cost bound of one request: every byte of the UTF-8 request body counted as a prompt token
        (a BPE token is at least one byte, and the JSON around the messages outweighs the chat
        template's few tokens per message), plus max_tokens of answer (the request's own)."""
        answer = self.sampling["max_tokens"] if max_tokens is None else max_tokens
        return cost_usd(self.model, {"prompt_tokens": len(data), "completion_tokens": answer}) or 0.0

    def cached(self, body: dict) -> Reply | None:
        """The stored answer to this exact request; a damaged entry counts as none."""
        raw = self.cache.get(body, answer_text)
        if raw is None:
            return None
        return Reply(self.scrub(answer_text(raw)), clean_usage(raw.get("usage")), True, 0, raw)

    def complete(self, messages: list[dict], **extra) -> Reply:
        body = self.body(messages, **extra)
        reply = self.cached(body)
        if reply is not None:
            return reply
        raw, retries = self._post(body)
        raw = self.scrub.json(raw)
        self.cache.put(self.scrub.json(body), raw, key_of=body)
        return Reply(answer_text(raw), clean_usage(raw.get("usage")), False, retries, raw)

    def _post(self, body: dict) -> tuple[dict, int]:
        data = json.dumps(body, ensure_ascii=False).encode()
        worst = self.worst_case(data, body.get("max_tokens"))
        for attempt in range(self.max_retries + 1):
            held = self.budget.reserve(worst)  # waits for requests in flight, or BudgetExhausted
            cost = None  # unknown: counted at the reservation
            wait = problem = None
            try:
                with self._count:
                    self.sent += 1
                try:
                    resp = self._http.post(self.url, content=data, headers={"Content-Type": "application/json"})
                except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                    cost, problem = 0.0, type(exc).__name__  # never reached the server
                except httpx.DecodingError:
                    problem = "an answer whose Content-Encoding cannot be decoded"
                except httpx.UnsupportedProtocol:
                    raise UsageError(f"--base-url {self.scrub(self.url)}: unsupported protocol") from None
                except httpx.HTTPError as exc:  # timeouts, dropped connections, protocol errors
                    problem = type(exc).__name__
                else:
                    if resp.status_code == 200:
                        raw = None
                        try:
                            raw = resp.json()
                            answer_text(raw)
                        except BadAnswer as exc:
                            problem = f"HTTP 200 with {exc}"
                        except (ValueError, RecursionError):
                            problem = "HTTP 200 with a body that is not JSON"
                        usage = clean_usage(raw.get("usage")) if isinstance(raw, dict) else {}
                        cost = cost_usd(self.model, usage) if usage else None  # a junk answer may be billed too
                        if problem is None:
                            return raw, attempt
                    elif resp.status_code in (408, 429) or resp.status_code >= 500:
                        cost, problem = 0.0, f"HTTP {resp.status_code}"
                        wait = retry_wait(resp.headers)
                    else:
                        cost = 0.0
                        raise self._fatal(resp)
            finally:
                self.budget.settle(held, cost)
            if attempt == self.max_retries:
                raise TrcliError(self.scrub(f"judge endpoint {self.url}: {problem} after {self.max_retries} retries "
                                            f"(answers so far are cached: rerun to resume)"))
            delay = wait if wait is not None else BACKOFF_BASE * 2 ** attempt * random.uniform(0.5, 1.0)
            used = min(delay, BACKOFF_MAX)
            why = "" if wait is None else (f" (Retry-After {wait:g}s)" if used == wait else
                                           f" (Retry-After {wait:g}s, capped at {used:g}s)")
            print(self.scrub(f"trcli judge: {problem}; retry {attempt + 1}/{self.max_retries} in {used:.1f}s{why}"),
                  file=sys.stderr)
            time.sleep(used)
        raise AssertionError("unreachable")

    def _fatal(self, resp: httpx.Response) -> TrcliError:
        detail = self.scrub(" ".join(resp.text.split()))[:300]  # scrubbed before it is cut
        cls = UsageError if resp.status_code in (400, 401, 403, 404) else TrcliError
        hint = " (check the API key variable, --api-key-env)" if resp.status_code in (401, 403) else ""
        return cls(f"judge endpoint {self.scrub(self.url)}: HTTP {resp.status_code}{hint}: {detail}")


def retry_wait(headers) -> float | None:
    """Seconds the server asks to wait: ``retry-after-ms`` (OpenAI's, in milliseconds) when it is a
    number, else ``Retry-After``."""
    ms = headers.get("retry-after-ms")
    try:
        seconds = float(ms) / 1000 if ms is not None else None
    except ValueError:
        seconds = None
    if seconds is not None and math.isfinite(seconds):
        return max(0.0, seconds)
    return _retry_after(headers.get("retry-after"))


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None
