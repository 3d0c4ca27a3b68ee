"""A scripted, and on request hostile, OpenAI-compatible chat-completions server on 127.0.0.1.

Verdicts are scripted from the texts shown: the server prefers the response containing GOOD
whichever position it is in, always answers "A" for BIAS items (so --swap turns them into ties),
answers junk for JUNK items, junk then a valid answer for FIXME items, and fails the first attempt
of RATE (429 + Retry-After: 0), FAIL (500) and SLOW (reply after the client timeout) items.

``state["fault"]`` (one of FAULTS) makes it misbehave on every request, or only on the first
``state["fault_times"]`` attempts of each request body; ``state["delay"]`` seconds pace every answer.

AlpacaEval-style questions (``--protocol alpacaeval``) are answered with one identifier, "m" or
"M", and, when the request asks for ``logprobs``, the identifiers' log-probabilities among the top
5 (with other tokens beside them): P(GOOD's identifier) = 0.9; BIAS items P("m") = 0.8 whatever is
shown. ``state["alpaca"]`` (one of ALPACA_MODES) changes that. Arena-Hard-style questions
(``--protocol arena``) get an answer of the judge's own, then a verdict: the response containing
GOOD is slightly better ([[A>B]] / [[B>A]]), one containing GREAT significantly ([[A>>B]]), neither
or both a tie; BIAS items always [[A>B]]; JUNK items a malformed verdict (``state["arena_junk"]``,
one of ARENA_JUNK), FIXME items a malformed one and then, re-asked, a valid one.
"""

from __future__ import annotations

import base64
import json
import math
import re
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from trcli.judge.cache import request_key
from trcli.judge.prompts import ALPACAEVAL_SYSTEM, CRITERIA

KEY = "sk-test-SECRETkey0123456789"
USAGE = {"prompt_tokens": 100, "completion_tokens": 10}
TIMEOUT = 0.5

FAULTS = {
    "no_usage": "a 200 without `usage`",
    "inflated_usage": "usage claims every request byte as a prompt token and max_tokens of answer",
    "junk_usage": "usage whose token counts are not numbers",
    "echo_key": "a 200 whose answer and body echo the Authorization header (raw, base64, another format)",
    "ambiguous": "the verdict line is state['ambiguous'] (e.g. 'More helpful: A or B'); a re-ask gets a clear "
                 "verdict with state['clear_reask']",
    "empty_list": "a 200 whose body is []",
    "content_list": "message.content is a list of parts",
    "content_int": "message.content is a number",
    "not_json": "a 200 whose body is an HTML page",
    "gzip_junk": "Content-Encoding: gzip on a body that is not gzip",
    "unauthorized": "401 whose message echoes the key in other formats",
    "retry_after": "429 with Retry-After: state['retry_after']",
    "slow": "answers after the client's timeout",
}

JUNK = {  # fault -> (body bytes, extra headers) of a 200 answer
    "empty_list": (b"[]", {}),
    "content_list": (json.dumps({"choices": [{"message": {"content": [{"type": "text", "text": "A"}]}}],
                                 "usage": USAGE}).encode(), {}),
    "content_int": (json.dumps({"choices": [{"message": {"content": 7}}], "usage": USAGE}).encode(), {}),
    "not_json": (b"<html><body>502 Bad Gateway</body></html>", {}),
    "gzip_junk": (json.dumps({"choices": [{"message": {"content": "More helpful: A"}}]}).encode(),
                  {"Content-Encoding": "gzip"}),
}


ALPACA_MODES = {
    "logprobs": "the default: the identifier's log-probabilities when asked for",
    "longer": "prefers the longer output: logit P(longer) = state['length_k'] * tanh(len difference / "
              "state['length_scale']), in characters (the length-controlled GLM's own form)",
    "no_logprobs": "never sends logprobs (an endpoint that ignores the parameter): only the sampled identifier",
    "bad_logprobs": "sends logprobs whose values are not numbers",
}
ARENA_JUNK = {  # the malformed verdicts of JUNK items
    "no_label": "Assistant A is significantly better.",
    "conflict": "At first sight [[A>B]], but on reflection [[B>A]].",
    "invalid": "My final verdict is: [[A>>>B]]",
}


def key_echoes(auth: str) -> list[str]:
    """What a leaky proxy might echo: the header, its base64, the key with another separator."""
    return [auth, base64.b64encode(auth.encode()).decode(), KEY.replace("-", "_"), KEY.upper()[3:]]


def first_question(messages: list[dict]) -> str:
    return next(m["content"] for m in messages if m["role"] == "user")


def alpaca_answer(messages: list[dict], state: dict, body: dict) -> tuple[str, dict | None]:
    """The sampled identifier and, when asked for and given, choices[0].logprobs."""
    question = first_question(messages)
    reasked = len(messages) > 2
    outputs = dict(re.findall(r'"model_identifier": "(m|M)",\n {8}"output": """(.*?)"""', question, re.S))
    mode = state.get("alpaca", "logprobs")
    if "JUNK" in question or ("FIXME" in question and not reasked):
        p_m = None
    elif "BIAS" in question:
        p_m = 0.8
    elif mode == "longer":
        diff = len(outputs["m"]) - len(outputs["M"])
        p_m = 1 / (1 + math.exp(-state.get("length_k", 3.0) * math.tanh(diff / state["length_scale"])))
    else:
        p_m = 0.9 if "GOOD" in outputs["m"] else 0.1 if "GOOD" in outputs["M"] else 0.5
    token = "The" if p_m is None else "m" if p_m >= 0.5 else "M"
    if not body.get("logprobs") or mode == "no_logprobs":
        return token, None
    top = [("The", 0.015), ("**", 0.005)]
    if p_m is not None:
        top += [(t, 0.98 * p) for t, p in (("m", p_m), ("M", 1 - p_m)) if p > 0]
    top = sorted(top, key=lambda tp: -tp[1])[:body.get("top_logprobs", 0) or 1]
    entries = [{"token": t, "logprob": "n/a" if mode == "bad_logprobs" else math.log(p), "bytes": list(t.encode())}
               for t, p in top]
    return token, {"content": [{**entries[0], "top_logprobs": entries}]}


def arena_answer(messages: list[dict], state: dict) -> str:
    question = first_question(messages)
    reasked = len(messages) > 2
    a, b = re.search(r"Assistant A's Answer\|>\n(.*?)\n<\|The End.*Assistant B's Answer\|>\n(.*?)\n<\|The End",
                     question, re.S).groups()
    own = "My own answer: it depends.\n\n"
    if "JUNK" in question or ("FIXME" in question and not reasked):
        return own + ARENA_JUNK[state.get("arena_junk", "no_label")]
    if "BIAS" in question:
        label = "A>B"
    else:
        def rank(text):
            return 2 if "GREAT" in text else 1 if "GOOD" in text else 0
        ra, rb = rank(a), rank(b)
        best = max(ra, rb)
        label = "A=B" if ra == rb else (("A>>B" if best == 2 else "A>B") if ra > rb else ("B>>A" if best == 2 else "B>A"))
    return own + f"Both are fine, one is better.\n\nMy final verdict is: [[{label}]]"


def verdict(messages: list[dict]) -> str:
    question = first_question(messages)
    if question.startswith("Rate the response"):  # --protocol hc: 8 for GOOD responses, else 5
        if "JUNK" in question and len(messages) == 1:
            return "A fine answer overall."
        score = 8 if "GOOD" in question else 5
        return "\n".join(f"{c.capitalize()}: {score}" for c in CRITERIA)
    if "JUNK" in question or ("FIXME" in question and len(messages) == 1):
        return "I cannot decide, both are fine."
    a = re.search(r"Response A:\n(.*?)\n\nResponse B:", question, re.S).group(1)
    choice = "A" if "BIAS" in question or "GOOD" in a else "B"
    return f"Comparison: one is better.\nMore helpful: {choice}"


class Judge(BaseHTTPRequestHandler):
    state: dict  # set per server: requests, their sizes, auth headers, attempts per body, fault

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_POST(self):
        data = self.rfile.read(int(self.headers["Content-Length"]))
        body = json.loads(data)
        state = self.state
        key = request_key(body)
        auth = self.headers.get("Authorization") or ""
        with state["lock"]:
            state["requests"].append(body)
            state["sizes"].append(len(data))
            state["auth"].add(self.headers.get("Authorization"))
            attempt = state["attempts"][key] = state["attempts"].get(key, 0) + 1
        fault = state.get("fault") if attempt <= state.get("fault_times", math.inf) else None
        question = first_question(body["messages"])
        if state.get("status"):
            return self._send(state["status"], {"error": {
                "message": f"Incorrect API key provided: {KEY[:8]}****{KEY[-4:]}", "key": KEY}})
        if fault == "unauthorized":
            return self._send(401, {"error": {"message": "invalid key " + " / ".join(key_echoes(auth))}})
        if fault == "retry_after":
            return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": state["retry_after"]})
        if fault in JUNK:
            return self._send_bytes(200, *JUNK[fault])
        if attempt == 1 and "RATE" in question:
            return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
        if attempt == 1 and "FAIL" in question:
            return self._send(500, {"error": {"message": "oops"}})
        if (attempt == 1 and "SLOW" in question) or fault == "slow":
            time.sleep(TIMEOUT * 3)
        time.sleep(state.get("delay", 0))  # pacing, so that requests overlap as against a real endpoint
        logprobs = None
        if body["messages"][0]["content"] == ALPACAEVAL_SYSTEM:
            content, logprobs = alpaca_answer(body["messages"], state, body)
        elif question.startswith("<|User Prompt|>"):
            content = arena_answer(body["messages"], state)
        else:
            content = verdict(body["messages"])
        payload = {"choices": [{"message": {"role": "assistant", "content": content}}], "usage": dict(USAGE)}
        if logprobs is not None:
            payload["choices"][0]["logprobs"] = logprobs
        if fault == "no_usage":
            del payload["usage"]
        elif fault == "inflated_usage":
            payload["usage"] = {"prompt_tokens": len(data), "completion_tokens": body["max_tokens"]}
        elif fault == "junk_usage":
            payload["usage"] = {"prompt_tokens": "many", "completion_tokens": [1]}
        elif fault == "echo_key":
            payload["choices"][0]["message"]["content"] = f"(debug: {' | '.join(key_echoes(auth))})\n{content}"
            payload["echo"] = {"headers": dict(self.headers), auth: "seen"}
        elif fault == "ambiguous" and not (state.get("clear_reask") and len(body["messages"]) > 1):
            payload["choices"][0]["message"]["content"] = f"Comparison: hard to say.\n{state['ambiguous']}"
        self._send(200, payload)

    def _send(self, status, payload, headers=None):
        self._send_bytes(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _send_bytes(self, status, data, headers):
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass


@contextmanager
def serve():
    """A server in a thread; yields its state (url, requests, sizes, auth, attempts; set fault...)."""
    state = {"requests": [], "sizes": [], "auth": set(), "attempts": {}, "lock": threading.Lock()}
    handler = type("ScriptedJudge", (Judge,), {"state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
