"""On-disk cache of judge requests and raw responses.

The key is a hash of the exact request body (model, messages, sampling). The API key lives only in
an HTTP header, so it is never part of the key, and what is stored has been scrubbed of it. One
JSON file per request, written atomically (never appended to), so an interrupted run leaves only
complete entries and a rerun resends nothing it already has an answer for.

An entry that cannot be used all the same (cut short, e.g. by a crash of the machine before the
data reached the disk, or not holding a chat completion) counts as missing: the request is sent
again and the entry rewritten whole. :attr:`Cache.damaged` collects such entries so that the
stage can say so in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Callable

from trcli.errors import TrcliError
from trcli.runs import write_json


def default_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "trcli" / "judge"


def request_key(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class Cache:
    def __init__(self, directory: str | Path | None):
        self.dir = Path(directory) if directory else default_dir()
        self.damaged: set[Path] = set()
        self._lock = threading.Lock()

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def get(self, body: dict, check: Callable[[dict], object] | None = None) -> dict | None:
        """The stored raw response for this exact request, or None (also for a damaged entry:
        one that is not complete JSON, or whose response ``check`` rejects with a ValueError)."""
        path = self._path(request_key(body))
        try:
            response = json.loads(path.read_bytes())["response"]
            if check is not None:
                check(response)
            return response
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            with self._lock:
                self.damaged.add(path)
            return None

    def put(self, body: dict, response: dict, key_of: dict | None = None) -> None:
        """Store ``body`` and ``response`` under the key of ``key_of`` (default ``body``)."""
        path = self._path(request_key(key_of if key_of is not None else body))
        try:
            write_json(path, {"request": body, "response": response})
        except OSError as exc:
            raise TrcliError(f"cannot write the judge cache {self.dir}: {exc.strerror or exc} "
                             f"(choose another with --cache-dir)") from None
