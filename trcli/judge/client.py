"""A small client for OpenAI-compatible chat-completion endpoints (OpenAI, vLLM, TGI, ...).

Retries 429, 5xx, timeouts and connection errors with exponential backoff, honouring
Retry-After; every answer goes through the on-disk cache first; a cost budget stops sending
before it would be exceeded. Thread-safe: the stage calls it from a bounded thread pool.

The API key is only ever put in the Authorization header, and is scrubbed from any error text an
endpoint sends back (OpenAI echoes part of a wrong key in its 401 message).
"""

from __future__ import annotations

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

# Backoff before retry n (0-based) is about BACKOFF_BASE * 2**n seconds, at most BACKOFF_MAX;
# module constants so that tests can make them small.
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


class BudgetExhausted(Exception):
    """The next request could take the spend over --max-cost-usd; nothing was sent."""


@dataclass
class Budget:
    """Spend so far and a worst-case guess for the next request (reserved while it is in flight)."""

    limit: float | None
    spent: float = 0.0
    reserved: float = 0.0
    largest: float = 0.0  # the dearest request seen: prompts are similar, so a fair worst case
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reserve(self, estimate: float) -> float:
        with self.lock:
            need = max(estimate, self.largest)
            if self.limit is not None and self.spent + self.reserved + need > self.limit:
                raise BudgetExhausted
            self.reserved += need
            return need

    def settle(self, reserved: float, actual: float) -> None:
        with self.lock:
            self.reserved -= reserved
            self.spent += actual
            self.largest = max(self.largest, actual)


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
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self._key = api_key
        self.cache = cache
        self.max_retries = max_retries
        self.sampling = {"temperature": temperature, "max_tokens": max_tokens}
        self.budget = budget
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(headers=headers, timeout=timeout,
                                  limits=httpx.Limits(max_connections=concurrency))
        self.sent = 0  # HTTP requests actually made, retries included
        self._count = threading.Lock()

    def close(self) -> None:
        self._http.close()

    def body(self, messages: list[dict]) -> dict:
        """The exact request: also the cache key."""
        return {"model": self.model, "messages": messages, **self.sampling}

    def complete(self, messages: list[dict]) -> Reply:
        body = self.body(messages)
        raw = self.cache.get(body)
        if raw is not None:
            return Reply(_text(raw), raw.get("usage") or {}, True, 0, raw)
        chars = sum(len(m["content"]) for m in messages)
        estimate = cost_usd(self.model, {"prompt_tokens": math.ceil(chars / 3),
                                         "completion_tokens": self.sampling["max_tokens"]}) or 0.0
        reserved = self.budget.reserve(estimate)
        actual = 0.0
        try:
            raw, retries = self._post(body)
            actual = cost_usd(self.model, raw.get("usage") or {}) or 0.0
        finally:
            self.budget.settle(reserved, actual)
        _text(raw)  # a 200 without a message is the endpoint's bug: fail before caching it
        self.cache.put(body, raw)
        return Reply(_text(raw), raw.get("usage") or {}, False, retries, raw)

    def _post(self, body: dict) -> tuple[dict, int]:
        for attempt in range(self.max_retries + 1):
            with self._count:
                self.sent += 1
            wait = None
            try:
                resp = self._http.post(self.url, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                problem = f"{type(exc).__name__}"
            else:
                if resp.status_code == 200:
                    try:
                        return resp.json(), attempt
                    except ValueError:
                        problem = "HTTP 200 with a body that is not JSON"
                elif resp.status_code == 429 or resp.status_code >= 500:
                    problem = f"HTTP {resp.status_code}"
                    wait = _retry_after(resp.headers.get("retry-after"))
                else:
                    raise self._fatal(resp)
            if attempt == self.max_retries:
                raise TrcliError(f"judge endpoint {self.url}: {problem} after {self.max_retries} retries "
                                 f"(answers so far are cached: rerun to resume)")
            delay = wait if wait is not None else BACKOFF_BASE * 2 ** attempt * random.uniform(0.5, 1.0)
            print(f"trcli judge: {problem}; retry {attempt + 1}/{self.max_retries} in {delay:.1f}s", file=sys.stderr)
            time.sleep(min(delay, BACKOFF_MAX))
        raise AssertionError("unreachable")

    def _fatal(self, resp: httpx.Response) -> TrcliError:
        detail = self.scrub(resp.text.strip().replace("\n", " ")[:300])
        cls = UsageError if resp.status_code in (400, 401, 403, 404) else TrcliError
        hint = " (check the API key variable, --api-key-env)" if resp.status_code in (401, 403) else ""
        return cls(f"judge endpoint {self.url}: HTTP {resp.status_code}{hint}: {detail}")

    def scrub(self, text: str) -> str:
        if self._key:
            text = text.replace(self._key, "***")
        return re.sub(r"sk-[A-Za-z0-9_\-*]{4,}", "sk-***", text)


def _text(raw: dict) -> str:
    try:
        content = raw["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise TrcliError("judge endpoint answered 200 without choices[0].message.content") from None
    return content or ""


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
