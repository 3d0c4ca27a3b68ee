"""Is the Hugging Face hub reachable? Asked once, before a hub id is loaded.

huggingface_hub retries a request that fails to connect (unresolvable host, refused, timed out)
five times, sleeping 1 + 2 + 4 + 8 + 8 s (utils/_http.py, _http_backoff_base), for each file it
asks about; transformers asks about several. Offline, a hub id took 25 s (a dataset) to 50 s (a
model and its tokenizer) to fail. One request without retries, within the hub's own timeout for
metadata requests (HF_HUB_ETAG_TIMEOUT, 10 s by default), tells at once; online it costs one HEAD.
"""

from __future__ import annotations

import functools
from pathlib import Path


def unreachable(name: str) -> str | None:
    """Why the hub cannot serve ``name`` ("the Hugging Face hub at URL is unreachable (...)"), or None:
    a local path, offline mode (HF_HUB_OFFLINE: the libraries then read only the local cache, without
    asking), or the hub answered."""
    from huggingface_hub import constants, is_offline_mode

    if Path(name).exists() or is_offline_mode():
        return None
    return _probe(constants.ENDPOINT, constants.HF_HUB_ETAG_TIMEOUT)


@functools.cache
def _probe(endpoint: str, timeout: float) -> str | None:
    from huggingface_hub import get_session

    try:
        get_session().head(endpoint, timeout=timeout)  # any answer, even an error status, is a reachable hub
    except Exception as exc:  # httpx's ConnectError / timeouts, an SSL failure: no answer
        why = (str(exc).splitlines() or [""])[0][:120]
        return f"the Hugging Face hub at {endpoint} is unreachable ({exc.__class__.__name__}: {why})"
    return None
