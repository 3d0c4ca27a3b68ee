"""On-disk cache of judge requests and raw responses.

The key is a hash of the exact request body (model, messages, sampling). The API key lives only in
an HTTP header, so it is never part of the key or of what is stored. One JSON file per request,
written atomically, so an interrupted run leaves only complete entries and a rerun resends nothing
it already has an answer for.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from trcli.runs import write_json


def default_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "trcli" / "judge"


def request_key(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class Cache:
    def __init__(self, directory: str | Path | None):
        self.dir = Path(directory) if directory else default_dir()

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def get(self, body: dict) -> dict | None:
        """The stored raw response for this exact request, or None."""
        path = self._path(request_key(body))
        try:
            return json.loads(path.read_text(encoding="utf-8"))["response"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return None

    def has(self, body: dict) -> bool:
        return self._path(request_key(body)).is_file()

    def put(self, body: dict, response: dict) -> None:
        write_json(self._path(request_key(body)), {"request": body, "response": response})
