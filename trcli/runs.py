"""Run directories: manifests (trcli-run.json), --from chaining and atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from trcli import distributed
from trcli.config import Config, dump
from trcli.errors import UsageError

MANIFEST = "trcli-run.json"
_PACKAGES = ("trcli", "torch", "transformers", "peft", "datasets", "accelerate", "bitsandbytes")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it over ``path`` (file or directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / path.name
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            old = tmp.parent / (path.name + ".old")
            os.replace(path, old)
            os.replace(tmp, path)
            _rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        _rmtree(tmp.parent)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def content_hash(path: str | Path) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents, sorted)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


class Run:
    """A stage's run directory and its manifest, written at start and at the end."""

    def __init__(self, stage: str, output: str | Path, config: Config):
        self.stage = stage
        self.dir = Path(output)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest: dict[str, Any] = {
            "stage": stage,
            "status": "running",
            "config": dump(config),
            "inputs": {},
            "outputs": {},
            "versions": package_versions(),
            "started": now(),
            "ended": None,
        }
        self.save()

    def add_input(self, name: str, path: str | Path | None) -> None:
        if path is None:
            return
        entry: dict[str, Any] = {"path": str(path)}
        if Path(path).exists():
            entry["hash"] = content_hash(path)
        self.manifest["inputs"][name] = entry
        self.save()

    def add_output(self, name: str, value: Any) -> None:
        self.manifest["outputs"][name] = value
        self.save()

    def finish(self, **outputs: Any) -> None:
        self.manifest["outputs"].update(outputs)
        self.manifest["status"] = "completed"
        self.manifest["ended"] = now()
        self.save()

    def save(self) -> None:
        if not distributed.is_main():  # under several processes rank 0 writes the manifest
            return
        write_json(self.dir / MANIFEST, self.manifest)


def read_manifest(run_dir: str | Path) -> dict:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise UsageError(f"{run_dir}: not a trcli run directory (no {MANIFEST})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}:{exc.lineno}: manifest is not valid JSON") from None


def upstream(run_dir: str | Path) -> dict:
    """What a previous run hands to the next stage: data dir, base model, adapter / weights."""
    manifest = read_manifest(run_dir)
    run_dir = Path(run_dir)
    out = dict(manifest.get("outputs", {}))
    # Output paths are stored relative to the run directory, so a run can be moved.
    for key in ("data", "adapter", "weights", "policy", "reference", "generations"):
        if out.get(key) and not Path(out[key]).is_absolute():
            out[key] = str(run_dir / out[key])
    cfg = manifest.get("config", {})
    out.setdefault("model", cfg.get("model", {}).get("name_or_path"))
    out.setdefault("tokenizer", cfg.get("model", {}).get("tokenizer"))
    out["stage"] = manifest.get("stage")
    out["status"] = manifest.get("status")
    out["config"] = cfg
    return out


def inherit(cfg: Config) -> dict:
    """Fill the model, tokenizer and data path that ``--from`` hands over (flags win) and return
    what the upstream run produced (its ``adapter`` / ``weights`` / ``policy`` ...)."""
    if not cfg.from_run:
        return {}
    up = upstream(cfg.from_run)
    if up["status"] != "completed":
        raise UsageError(f"{cfg.from_run}: that {up['stage']} run did not complete (status {up['status']})")
    if cfg.model.name_or_path is None:
        cfg.model.name_or_path = up.get("model")
    if cfg.model.tokenizer is None:
        cfg.model.tokenizer = up.get("tokenizer")
    if cfg.data.path is None and up.get("data"):
        cfg.data.path = up["data"]
    return up
