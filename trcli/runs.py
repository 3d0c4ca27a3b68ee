"""Run directories: manifests (trcli-run.json), --from chaining, atomic writes, the run lock and
JSONL files that survive a torn last line."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

from trcli import common
from trcli.config import Config, dump
from trcli.errors import UsageError

MANIFEST = "trcli-run.json"
LOCK = ".trcli.lock"
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


# --- JSONL files that trcli appends to -----------------------------------------------------------

def _stderr(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def read_jsonl_repairing(path: str | Path, repair: bool = True, warn: Callable[[str], None] = _stderr,
                         strict: bool = True) -> list[dict]:
    """The rows (JSON objects) of a JSONL file that trcli appends to, one per line.

    A torn last line (an append cut short by a kill, a power loss or a full disk: no newline and
    not valid JSON, or a tail of NUL bytes) is left out and said once through ``warn``; with
    ``repair`` it is also cut off the file, so that appending goes on from a whole line. Only the
    file's writer repairs (it holds the run lock: a reader could cut a line still being written).
    A complete last line without its newline is kept (and the newline added when repairing). A bad
    line before the last is an error naming file and line, or with ``strict=False`` left out and said.
    A missing file has no rows."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    rows: list[dict] = []
    lines = data.split(b"\n")  # the last element is what follows the final newline (b"" if none)
    last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
    offset, invalid = 0, object()
    for i, raw in enumerate(lines):
        start, offset = offset, offset + len(raw) + 1
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            row = invalid
        if isinstance(row, dict):
            rows.append(row)
            continue
        if i == last and row is invalid:
            warn(f"{path}:{i + 1}: not valid JSON (a torn last line of {len(raw)} bytes: a write cut short by a "
                 f"kill, a crash or a full disk, or still being written); {'removed it' if repair else 'left it out'}")
            if repair:
                os.truncate(path, start)
            return rows
        problem = "not valid JSON" if row is invalid else "not a JSON object"
        if strict:
            raise UsageError(f"{path}:{i + 1}: {problem}; fix or delete that line")
        warn(f"{path}:{i + 1}: {problem}, left out")
    if repair and data and not data.endswith(b"\n"):
        with open(path, "ab") as fh:  # a whole last line without its newline
            fh.write(b"\n")
    return rows


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


# --- the run lock -------------------------------------------------------------------------------

def _lock_path(target: Path, file: bool) -> Path:
    """A run directory's lock is inside it; an output file's (generate) is a hidden sibling."""
    return target.parent / f".{target.name}.lock" if file else target / LOCK


def _unwritable(target: Path, exc: OSError) -> UsageError:
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        return UsageError(f"{target}: exists and is not a directory (or a parent is a file); choose another --output")
    if isinstance(exc, IsADirectoryError):
        return UsageError(f"{target}: is a directory; --output names a file here")
    return UsageError(f"{target}: cannot write there ({exc.strerror or exc}); choose another --output")


def _read_holder(fd: int) -> dict:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe_holder(info: dict) -> str:
    if not info.get("pid"):
        return "another trcli process"
    stage = f"trcli {info['stage']}" if info.get("stage") else "trcli"
    since = f", since {info['since']}" if info.get("since") else ""
    return f"{stage} (pid {info['pid']} on {info.get('host', '?')}{since})"


class RunLock:
    """An exclusive ``flock`` on ``DIR/.trcli.lock`` (a run directory) or ``.NAME.lock`` beside an
    output file. The kernel drops it when the holding process dies, however it dies, so a lock
    left by a killed run is simply taken over; the file names the holder (pid, host, stage) for
    the refusal and is removed on release. Taken with :func:`claim` / :func:`output_lock`."""

    def __init__(self, target: Path, file: bool = False):
        self.target, self.file = target, file
        self.path = _lock_path(target, file)
        self.fd: int | None = None
        self.info: dict = {}

    def acquire(self, stage: str | None) -> None:
        try:
            if self.file:
                self.target.parent.mkdir(parents=True, exist_ok=True)
                if self.target.is_dir():
                    raise IsADirectoryError(errno.EISDIR, "is a directory")
            else:
                self.target.mkdir(parents=True, exist_ok=True)
            fd = self._locked_fd()
        except OSError as exc:
            raise _unwritable(self.target, exc) from None
        previous = _read_holder(fd)
        if previous.get("pid"):  # its holder died without releasing (the kernel did)
            common.log(f"{self.target}: taking over the lock left by {_describe_holder(previous)}, "
                            "which is no longer running")
        self.fd = fd
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "since": now()}
        self.set_stage(stage)

    def _locked_fd(self) -> int:
        waited = 0
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                if waited < 5:  # perhaps a reader's instant probe (holder()): look again shortly
                    waited += 1
                    time.sleep(0.05)
                    continue
                where = "this directory" if not self.file else "this file"
                raise UsageError(f"{self.target}: {where} is in use by {_describe_holder(holder)}; "
                                 "wait for that run to end or choose another --output") from None
            try:  # the previous holder may have removed the file between our open and flock
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def set_stage(self, stage: str | None) -> None:
        if self.fd is None or stage is None:
            return
        self.info["stage"] = stage
        text = json.dumps(self.info).encode()
        try:  # who holds it is for the refusal message; the lock itself is the flock
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, text, 0)
        except OSError:
            pass

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still held: whoever opened it before re-checks (samestat)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


# The outputs this process has claimed: their lock on rank 0, None on the other ranks.
_HELD: dict[tuple[Path, bool], RunLock | None] = {}


def holder(target: str | Path, file: bool = False) -> dict | None:
    """Who holds ``target``'s run lock ({pid, host, stage, since}, {} if it cannot be read), or None
    when no live process does: a manifest saying "running" with a free lock is a dead run."""
    path = _lock_path(Path(target), file)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def claim(output: str | Path, stage: str | None = None, file: bool = False) -> RunLock | None:
    """Take ``output``'s run lock for the rest of the run, or refuse (exit 2) naming its holder.
    Idempotent within a process. Under several processes every rank calls it and only rank 0
    locks; a refusal stops all of them. A fresh lock first clears staging directories that a
    killed write left behind (nobody else can be writing them now)."""
    target = Path(output)
    key = (target.resolve(), file)
    if key in _HELD:
        if _HELD[key] is not None:
            _HELD[key].set_stage(stage)
        return _HELD[key]
    lock, refused = None, None
    if common.is_main():
        lock = RunLock(target, file)
        try:
            lock.acquire(stage)
        except UsageError as err:
            lock, refused = None, err
    if common.any_rank(refused is not None):  # every rank stops, none waits in a collective
        raise refused or UsageError(f"{target}: rank 0 could not take the run lock")
    _HELD[key] = lock
    if lock is None:  # not rank 0
        return None
    clean_staging(target.parent if file else target, only=target.name if file else None)
    return lock


def release(output: str | Path, file: bool = False) -> None:
    lock = _HELD.pop((Path(output).resolve(), file), None)
    if lock is not None:
        lock.release()


@contextmanager
def output_lock(output: str | Path | None, stage: str, file: bool = False) -> Iterator[RunLock | None]:
    """The run lock around a stage's writes to ``output`` (a directory, or with ``file=True`` a file
    such as generate's JSONL); nothing for no output or '-' (stdout). A second run on the same
    output is refused with exit 2 naming the holder (pid, host)."""
    if output is None or str(output) == "-":
        yield None
        return
    already = (Path(output).resolve(), file) in _HELD
    lock = claim(output, stage, file=file)
    try:
        yield lock
    finally:
        if not already:
            release(output, file=file)


_STAGING = re.compile(r"\.(?P<name>.+)\.(?:[a-z0-9_]{8}|staging)")


def clean_staging(directory: Path, only: str | None = None) -> list[str]:
    """Remove the hidden staging directories of writes that never finished (``atomic_path``'s
    ``.NAME.XXXXXXXX/``, e.g. ``.checkpoint-6.k2j4h1x0/``; ``save_weights``' ``.NAME.staging/``),
    or only those of the file ``only``. The caller holds the lock, so none is being written."""
    try:
        entries = list(directory.iterdir())
    except OSError:
        return []
    removed = []
    for entry in entries:
        match = _STAGING.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and only in (None, match.group("name")):
            _rmtree(entry)
            removed.append(entry.name)
    if removed:
        common.log(f"{directory}: removed {len(removed)} staging director{'y' if len(removed) == 1 else 'ies'} "
                        f"left by an interrupted write ({', '.join(sorted(removed))})")
    return removed


# --- manifests ----------------------------------------------------------------------------------

_ACTIVE: list["Run"] = []


class Run:
    """A stage's run directory and its manifest, written at start and at the end. The run holds
    the directory's lock (:func:`claim`) until it finishes or is abandoned (:func:`abandon`)."""

    def __init__(self, stage: str, output: str | Path, config: Config):
        self.stage = stage
        self.dir = Path(output)
        claim(self.dir, stage)
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
        _ACTIVE.append(self)
        self.save()

    def add_input(self, name: str, path: str | Path | None) -> None:
        if path is None:
            return
        entry: dict[str, Any] = {"path": str(path)}
        if Path(path).exists():
            entry["hash"] = content_hash(path)
        self.manifest["inputs"][name] = entry
        self.save()

    def finish(self, **outputs: Any) -> None:
        self.manifest["outputs"].update(outputs)
        self._end("completed")

    def _end(self, status: str | None) -> None:
        """Record how the run ended (``None``: leave the manifest as it is) and let go of the lock."""
        try:
            if status is not None:
                self.manifest["status"] = status
                self.manifest["ended"] = now()
                self.save()
        finally:
            if self in _ACTIVE:
                _ACTIVE.remove(self)
            release(self.dir)

    def save(self) -> None:
        if not common.is_main():  # under several processes rank 0 writes the manifest
            return
        write_json(self.dir / MANIFEST, self.manifest)


def abandon(status: str | None) -> list[Path]:
    """The stage stopped early: record ``status`` ("failed", "interrupted") in every unfinished
    manifest, as far as the disk allows (one that cannot be written stays "running", and its free
    lock then says the run is dead), and release every run lock this process holds. Returns the
    run directories that were active."""
    dirs = []
    for run in list(_ACTIVE):
        dirs.append(run.dir)
        try:
            run._end(status)
        except Exception:  # e.g. the disk is full: the manifest stays as it was
            pass
    for target, file in list(_HELD):
        release(target, file=file)
    return dirs


def out_of_space(exc: BaseException, path: str | Path | None = None) -> bool:
    """Whether a failed write failed for want of space: ENOSPC / EDQUOT anywhere in the exception's
    chain or message (safetensors words it so), or, for errors that hide it (torch.save's
    "unexpected pos"), less than 1 MiB left on ``path``'s file system."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(exc) for words in ("No space left on device", "Disk quota exceeded")):
            return True
        exc = exc.__cause__ or exc.__context__
    if path is None:
        return False
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        fs = os.statvfs(probe)
    except OSError:
        return False
    return fs.f_bavail * fs.f_frsize < (1 << 20)


def intact(run_dir: Path) -> str:
    """What a run that stopped early left whole: every write is atomic, so finished files are
    intact and an unfinished one was discarded; its latest checkpoint is what --resume continues."""
    found = [(int(m.group(1)), p.name) for p in run_dir.glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    last = f"the latest checkpoint is {max(found)[1]} (--resume continues from it)" if found else "no checkpoint yet"
    return f"{run_dir}: the files written before are intact, the one being written was discarded; {last}"


def status(run_dir: str | Path, manifest: dict) -> str:
    """The manifest's status, except that a "running" run whose lock no live process holds is "died"."""
    value = manifest.get("status", "unknown")
    if value == "running" and holder(run_dir) is None:
        return "died"
    return value


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
    out["status"] = status(run_dir, manifest)
    out["config"] = cfg
    return out


def inherit(cfg: Config) -> dict:
    """Fill the model, tokenizer and data path that ``--from`` hands over (flags win) and return
    what the upstream run produced (its ``adapter`` / ``weights`` / ``policy`` ...)."""
    if not cfg.from_run:
        return {}
    up = upstream(cfg.from_run)
    if up["status"] == "running":
        raise UsageError(f"{cfg.from_run}: that {up['stage']} run is still running "
                         f"({_describe_holder(holder(cfg.from_run) or {})}); wait for it to end")
    if up["status"] == "died":
        raise UsageError(f"{cfg.from_run}: that {up['stage']} run did not complete (its manifest says running, "
                         "but no process holds it: it was killed); finish it with --resume")
    if up["status"] != "completed":
        raise UsageError(f"{cfg.from_run}: that {up['stage']} run did not complete (status {up['status']})")
    if cfg.model.name_or_path is None:
        cfg.model.name_or_path = up.get("model")
    if cfg.model.tokenizer is None:
        cfg.model.tokenizer = up.get("tokenizer")
    if cfg.data.path is None and up.get("data"):
        cfg.data.path = up["data"]
    return up
