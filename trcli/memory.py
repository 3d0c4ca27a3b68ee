"""Memory plan for `sft` / `align --dry-run` (see docs)."""

from __future__ import annotations

from trcli.config import Config
from trcli.errors import UsageError


def plan_or_none(cfg: Config, stage: str) -> dict | None:
    """The memory plan when --dry-run was asked for, else None."""
    if not cfg.train.dry_run:
        return None
    raise UsageError("--dry-run: the memory plan is not implemented yet")
