"""sweep: the paper's study in one command — align over a grid of settings, then generate and judge
each cell, resumable, locally (cells side by side) or through a scheduler (Slurm via submitit).

A study YAML (see docs/sweep.md):

    recipe: recipes/pythia-410m-hh-align.yaml   # optional base recipe for every cell
    from: runs/sft                              # the run every align cell starts from
    set: {train.max_steps: 200}                 # optional: dotted keys set for every cell
    grid:                                       # dotted schema keys -> values; cells are the product
      align.method: [dpo, tr-dpo]
      align.alpha: [0.3, 0.5, 0.7]
      align.tau: [64, 512]
    generate: {prompts: runs/prep, limit: 200, max_new_tokens: 128, score_with: runs/sft}
    judge: {baseline: from, judge: gpt-4, task: hh}   # baseline: 'from' = the from-run's generations

Each cell is an ordinary run directory, DIR/cells/<name>/ (align/, generations.jsonl, judge/), named
by its settings; settings that do not change what a cell computes (α / τ / update of a static
method) are dropped, so `dpo` is one cell, not six. Each cell's resolved config is written to its
cell.yaml and every stage reads it with `-c`: the one schema serves the whole study. A finished cell
is skipped; a half-done one resumes (align from its checkpoint, generate from the records written,
judge from its cache).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trcli import config as config_mod
from trcli.errors import ConfigError, TrcliError, UsageError
from trcli.runs import claim, read_manifest, write_json, write_text

# Keys whose value does not change what a static (non-TR) method computes.
_TR_ONLY = ("align.alpha", "align.tau", "align.update", "align.kl_target", "align.ref_rank")


class Study(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    recipe: str | None = Field(None, description="Base recipe YAML for every cell.")
    from_run: str = Field(..., alias="from", description="The run every align cell starts from (an sft run).")
    set: dict[str, Any] = Field(default_factory=dict, description="Dotted keys set for every cell.")
    grid: dict[str, list[Any]] = Field(..., description="Dotted schema keys -> values; the cells are the product.")
    generate: dict[str, Any] | None = Field(None, description="generate.* keys for each cell's generations.")
    judge: dict[str, Any] | None = Field(None, description="judge.* keys; baseline: 'from' or a JSONL file.")


def load_study(path: str | Path) -> Study:
    data = config_mod.read_recipe(path)
    try:
        study = Study.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ConfigError(f"{path}: bad study key '{key}': {first['msg']}") from None
    if not study.grid or any(not values for values in study.grid.values()):
        raise ConfigError(f"{path}: 'grid' needs at least one key with at least one value")
    if study.judge is not None and study.generate is None:
        raise ConfigError(f"{path}: 'judge' needs 'generate' (the cells' generations are what is judged)")
    return study


def _tree(dotted: dict[str, Any]) -> dict:
    tree: dict = {}
    for key, value in dotted.items():
        config_mod._set_dotted(tree, key, value, "study")
    return tree


def _value_name(value: Any) -> str:
    return str(value).replace("/", "-").replace(" ", "")


def cells(study: Study, study_path: str | Path) -> list[dict]:
    """Every distinct cell: {name, settings (dotted), config (the resolved cell config as a dict)}."""
    base = config_mod.read_recipe(study.recipe) if study.recipe else {}
    keys = list(study.grid)
    out, seen = [], set()
    for values in itertools.product(*(study.grid[k] for k in keys)):
        settings = dict(zip(keys, values))
        flags = {**study.set, **settings}
        for section, extra in (("generate", study.generate), ("judge", study.judge)):
            for key, value in (extra or {}).items():
                if not (section == "judge" and key == "baseline"):
                    flags[f"{section}.{key}"] = value
        try:
            cfg = config_mod.Config.model_validate(config_mod._merge(base, _tree(flags)))
        except ValidationError as err:
            raise ConfigError(f"{study_path}: cell {settings}: {config_mod._describe(err, 'study')}") from None
        if not cfg.align.trust_region:  # a static method: α / τ do not matter
            settings = {k: v for k, v in settings.items() if k not in _TR_ONLY}
        name = "_".join(f"{k.rsplit('.', 1)[-1]}-{_value_name(v)}" for k, v in settings.items()) or "base"
        if name in seen:
            continue
        seen.add(name)
        out.append({"name": name, "settings": settings, "config": config_mod.dump(cfg)})
    return out


def _trcli(*args: str, label: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """One trcli command in a child process: its stdout captured (the result), its stderr passed on line
    by line, each line prefixed "[label] ": cells side by side interleave their progress in one log."""
    with subprocess.Popen([sys.executable, "-m", "trcli.cli", *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, errors="replace", env=env) as child:
        def relay():
            for line in child.stderr:
                sys.stderr.write(f"[{label}] " + line.removesuffix("\n") + "\n")

        relaying = threading.Thread(target=relay, daemon=True)
        relaying.start()
        try:
            stdout = child.stdout.read()
        except BaseException:  # interrupted (SIGINT / SIGTERM): the child goes too, as with subprocess.run
            child.kill()
            raise
        relaying.join()
    return subprocess.CompletedProcess(child.args, child.returncode, stdout)


def _completed(run_dir: Path) -> bool:
    try:
        return read_manifest(run_dir).get("status") == "completed"
    except TrcliError:
        return False


def run_cell(cell_dir: str, from_run: str, generate: bool, baseline: str | None, device: str | None) -> dict:
    """align -> generate -> judge for one cell, each skipped when done and resumed when half done.
    Runs in the sweep's process (local) or in a scheduler's job (submitit): plain arguments only."""
    cell = Path(cell_dir)
    env = dict(os.environ)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    cfg = ["-c", str(cell / "cell.yaml")]
    trcli = functools.partial(_trcli, label=f"cell {cell.name}", env=env)
    align = cell / "align"
    if not _completed(align):
        resume = ["--resume"] if any(align.glob("checkpoint-*")) else []
        if trcli("align", *cfg, "--from", from_run, *resume, "-o", align).returncode:
            return {"status": "failed", "stage": "align"}
    gens = cell / "generations.jsonl"
    if generate and not (cell / "generations.done").exists():
        if trcli("generate", *cfg, "--from", align, "-o", gens).returncode:
            return {"status": "failed", "stage": "generate"}
        write_text(cell / "generations.done", "")
    if baseline is not None and not _completed(cell / "judge"):
        if trcli("judge", *cfg, "--candidate", gens, "--baseline", baseline, "-o", cell / "judge").returncode:
            return {"status": "failed", "stage": "judge"}
    return {"status": "completed"}


def _devices(n: int) -> list[str | None]:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [str(i % count) if count else None for i in range(n)]


def _summary(cell: dict, cell_dir: Path) -> dict:
    row: dict[str, Any] = {"cell": cell["name"], **{k.rsplit(".", 1)[-1]: v for k, v in cell["settings"].items()}}
    a = cell["config"]["align"]
    row.update(method=a["method"], beta=a["beta"])
    if _completed(cell_dir / "align"):
        final = read_manifest(cell_dir / "align").get("outputs", {}).get("final", {})
        row.update({k: final.get(k) for k in ("loss", "kl/init", "kl/ref", "rewards/accuracies")})
    summary = cell_dir / "judge" / "summary.json"
    if summary.is_file():
        judged = json.loads(summary.read_text(encoding="utf-8"))
        row.update(win_rate=judged.get("win_rate"), win_rate_ci95=judged.get("ci95"),
                   kl_from=((judged.get("kl") or {}).get("candidate") or {}).get("mean"))
    return row


def run(study_path: str, output: str, dry_run: bool = False, max_parallel: int = 1, launcher: str = "local") -> dict:
    study = load_study(study_path)
    todo = cells(study, study_path)
    if not Path(study.from_run, "trcli-run.json").is_file():
        raise UsageError(f"{study_path}: from: {study.from_run} is not a trcli run directory")
    if dry_run:
        plans = []
        for cell in todo:
            tmp = Path(output) / ".plans" / f"{cell['name']}.yaml"
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(yaml.safe_dump(cell["config"]), encoding="utf-8")
            done = _trcli("align", "-c", tmp, "--from", study.from_run, "--dry-run", "--json",
                          label=f"cell {cell['name']}")
            plans.append({"cell": cell["name"], "settings": cell["settings"],
                          "plan": json.loads(done.stdout) if done.returncode == 0 and done.stdout.strip() else None})
        return {"sweep": str(output), "cells": len(todo), "dry_run": True, "plans": plans}

    root = Path(output)
    root.mkdir(parents=True, exist_ok=True)
    claim(root, "sweep")  # one sweep per directory; cells' own runs lock themselves
    baseline = None
    if study.judge is not None:
        baseline = study.judge.get("baseline", "from")
        if baseline == "from":  # the start's generations, made once with the cells' generate settings
            baseline = str(root / "baseline.jsonl")
            if not (root / "baseline.done").exists():
                write_text(root / "baseline.yaml", yaml.safe_dump({"generate": study.generate}))
                if _trcli("generate", "-c", root / "baseline.yaml", "--from", study.from_run, "-o", baseline,
                          label="baseline").returncode:
                    raise UsageError(f"{study_path}: generating the baseline from {study.from_run} failed (see above)")
                write_text(root / "baseline.done", "")
    for cell in todo:
        cell_dir = root / "cells" / cell["name"]
        cell_dir.mkdir(parents=True, exist_ok=True)
        write_text(cell_dir / "cell.yaml", yaml.safe_dump(cell["config"], sort_keys=False))
    jobs = [(str(root / "cells" / c["name"]), os.path.abspath(study.from_run), study.generate is not None, baseline, d)
            for c, d in zip(todo, _devices(len(todo)))]
    if launcher == "local":
        with ThreadPoolExecutor(max_workers=max_parallel) as pool:
            states = list(pool.map(lambda job: run_cell(*job), jobs))
    else:
        states = _submit(jobs, root, launcher, max_parallel)
    rows = [{**_summary(c, root / "cells" / c["name"]), "status": s["status"]} for c, s in zip(todo, states)]
    rows.sort(key=lambda r: (r.get("win_rate") is None, -(r.get("win_rate") or 0.0)))
    result = {"sweep": str(root), "cells": len(rows), "completed": sum(r["status"] == "completed" for r in rows),
              "rows": rows}
    write_json(root / "sweep.json", result)
    if study.judge is not None:  # the figure in the same command: DIR/report/ (frontier, heatmaps, table)
        from trcli import sweep_report

        result["report"] = sweep_report.build(root, root / "report")["figures"]
    failed = [r["cell"] for r in rows if r["status"] != "completed"]
    if failed:
        raise TrcliError(f"{len(failed)} of {len(rows)} cells failed ({', '.join(failed[:5])}); "
                         f"rerun the same command to resume them")
    return result


def _submit(jobs: list[tuple], root: Path, launcher: str, max_parallel: int) -> list[dict]:
    """Hand each cell to a scheduler through submitit: 'slurm' (the cluster it detects) or
    'submitit-local' (local processes, the same code path, for testing without a cluster)."""
    try:
        import submitit
    except ImportError:
        raise UsageError("--launcher slurm needs submitit: pip install 'trcli[slurm]'") from None
    executor = submitit.AutoExecutor(folder=str(root / "submitit"), cluster="local" if launcher == "submitit-local" else None)
    executor.update_parameters(timeout_min=24 * 60, slurm_array_parallelism=max_parallel)
    submitted = [executor.submit(run_cell, *job) for job in jobs]
    return [job.result() for job in submitted]


def render(result: dict):
    from rich.table import Table

    if result.get("dry_run"):
        table = Table(title=f"sweep (dry run): {result['cells']} cells")
        for column in ("cell", "planned peak"):
            table.add_column(column)
        for p in result["plans"]:
            peak = ((p["plan"] or {}).get("plan") or {}).get("total")
            table.add_row(p["cell"], "?" if peak is None else f"{peak / 2**30:.2f} GiB")
        return table
    table = Table(title=f"sweep: {result['completed']} of {result['cells']} cells completed (best first)")
    columns = ["cell", "method", "beta", "loss", "kl/init", "win_rate", "status"]
    for column in columns:
        table.add_column(column)
    fmt = lambda v: "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))  # noqa: E731
    for row in result["rows"]:
        table.add_row(*(fmt(row.get(c)) for c in columns))
    return table
