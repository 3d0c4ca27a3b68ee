"""How much trcli says on stderr, and what third-party libraries may say there.

Three levels: ``-q`` errors only; the default, trcli's own warnings and progress; ``-v`` (or
``TRCLI_DEBUG=1``), also the libraries' logs, warnings and progress bars (bars on a terminal
only). The level travels in ``TRCLI_VERBOSITY`` so that the processes a command starts (sweep
cells) say as much as it does. A leaf module: nothing heavy is imported here, the libraries that
are not imported yet are quieted through the environment variables they read when they are.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Callable

QUIET, NORMAL, VERBOSE = -1, 0, 1
ENV = "TRCLI_VERBOSITY"
_NAMES = {"quiet": QUIET, "normal": NORMAL, "verbose": VERBOSE}

# Read by each library when it is imported (set only where the user has not set them).
_LIBRARY_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DATASETS_VERBOSITY": "error",
    "HF_HUB_VERBOSITY": "error",  # its "Retrying in 1s [Retry 1/5]" lines for an unreachable hub
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' bars follow the hub's ("Writing model shards")
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}
_BAR_ENV = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")
# Loggers kept at ERROR unless verbose. DeepSpeed sets its own logger's level when it is imported (by
# transformers or trcli, also without --deepspeed) and warns "Setting accelerator to CPU" on a machine
# without a GPU: a filter on that logger outlives the level. The others take a level (their modules log
# through child loggers, which a level on the parent covers and a filter would not).
_FILTERED = ("DeepSpeed",)
_LEVELLED = ("bitsandbytes", "accelerate")


def level() -> int:
    """The level in force: TRCLI_DEBUG=1 is verbose; else TRCLI_VERBOSITY (quiet | normal | verbose)."""
    if os.environ.get("TRCLI_DEBUG"):
        return VERBOSE
    return _NAMES.get(os.environ.get(ENV, "").strip().lower(), NORMAL)


def quiet() -> bool:
    return level() == QUIET


def verbose() -> bool:
    return level() == VERBOSE


class _ErrorsOnly:
    """stderr under -q: what is written through it is dropped; :func:`errors` is the real stream."""

    def __init__(self, real):
        self.real = real

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):  # fileno, encoding ...: the real stream's
        return getattr(self.real, name)


def errors():
    """The stream for error lines: stderr, also under -q."""
    return sys.stderr.real if isinstance(sys.stderr, _ErrorsOnly) else sys.stderr


def _below_error_unless_verbose(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or verbose()


def apply(verbose_flag: bool = False, quiet_flag: bool = False) -> Callable[[], None]:
    """Set the level for one command (flags over TRCLI_VERBOSITY), quiet the libraries accordingly
    and, under -q, drop what is written to stderr except through :func:`errors`. Returns the undo,
    for the end of the command (commands also run in-process, in tests)."""
    saved_env = {key: os.environ.get(key) for key in (ENV, *_LIBRARY_ENV)}
    saved_filters = warnings.filters[:]
    real = sys.stderr
    if verbose_flag or quiet_flag:
        os.environ[ENV] = "verbose" if verbose_flag else "quiet"
    libraries(level())
    if quiet():
        sys.stderr = _ErrorsOnly(real)

    def restore() -> None:
        if isinstance(sys.stderr, _ErrorsOnly) and sys.stderr.real is real:
            sys.stderr = real
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        warnings.filters[:] = saved_filters

    return restore


def libraries(lvl: int | None = None) -> None:
    """Third-party logs, advisory warnings and progress bars: shown when verbose (bars on a terminal
    only), else off. Libraries already imported are set directly, the others through the environment."""
    lvl = level() if lvl is None else lvl
    for name in _FILTERED:
        logger = logging.getLogger(name)
        if _below_error_unless_verbose not in logger.filters:
            logger.addFilter(_below_error_unless_verbose)
    for name in _LEVELLED:
        logging.getLogger(name).setLevel(logging.NOTSET if lvl == VERBOSE else logging.ERROR)
    terminal = bool(getattr(sys.stderr, "isatty", lambda: False)())
    if lvl == VERBOSE:
        if not terminal:
            for key in _BAR_ENV:
                os.environ.setdefault(key, "1")
        _set_imported(log_level=logging.WARNING, bars=terminal)
        return
    for key, value in _LIBRARY_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    _set_imported(log_level=logging.ERROR, bars=False)


def _set_imported(log_level: int, bars: bool) -> None:
    """Verbosity and bars of the Hugging Face libraries that are imported already."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as tf_logging

        tf_logging.set_verbosity(log_level)
        tf_logging.enable_progress_bar() if bars else tf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.logging.set_verbosity(log_level)
        datasets.enable_progress_bars() if bars else datasets.disable_progress_bars()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub import utils as hub_utils

        hub_utils.logging.set_verbosity(log_level)
        hub_utils.enable_progress_bars() if bars else hub_utils.disable_progress_bars()
