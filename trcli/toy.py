"""The paper's toy overoptimization experiment (arXiv 2404.09656), exact and on CPU.

A tiny autoregressive policy generates fixed-length strings over a handful of symbols, so the
whole sequence space (``symbols ** length`` strings) is enumerated and every probability below
is exact, with no sampling noise. The model is first fine-tuned (SFT) on the strings of a small
preference set; every method then trains from that same start with the project's own losses
(:mod:`trcli.losses`), update schedule and reference update (:mod:`trcli.trust_region`). At
every logging step it records the probability mass on the chosen strings, on the rejected
strings, on strings the data never showed (out of distribution) and KL(π‖π_SFT). Findings and
numbers: docs/toy.md.
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trcli.config import read_recipe
from trcli.errors import ConfigError

CURVE_KEYS = ("p_chosen", "p_rejected", "p_ood", "kl_init")


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    loss: Literal["dpo", "ipo"]
    update: Literal["none", "soft", "hard"] = "none"
    alpha: float | None = Field(None, gt=0, le=1, description="Mixing weight; soft default 0.6, hard = 1.")
    tau: int = Field(1, ge=1, description="Optimizer steps between reference updates.")
    beta: float | None = Field(None, gt=0, description="This method's β; default: the toy's `beta`.")

    @model_validator(mode="after")
    def _hard_copies(self) -> "Method":
        if self.update == "hard" and self.alpha not in (None, 1.0):
            raise ValueError("update=hard copies the policy (alpha = 1)")
        if self.alpha is None:  # the same defaults as align (AlignConfig.resolved_alpha)
            self.alpha = 0.6 if self.update == "soft" else 1.0
        return self


def _default_methods() -> list[Method]:
    """As in recipes/toy-overoptimization.yaml: DPO at β = 1, IPO at β = 0.1 (docs/toy.md says why)."""
    return [
        Method(name="dpo", loss="dpo", beta=1.0),
        Method(name="ipo", loss="ipo", beta=0.1),
        Method(name="tr-dpo-soft", loss="dpo", update="soft", alpha=0.6, tau=1, beta=1.0),
        Method(name="tr-dpo-hard", loss="dpo", update="hard", tau=8, beta=1.0),
        Method(name="tr-ipo-soft", loss="ipo", update="soft", alpha=0.6, tau=1, beta=0.1),
        Method(name="tr-ipo-hard", loss="ipo", update="hard", tau=32, beta=0.1),
    ]


class ToyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    symbols: int = Field(4, ge=2, le=16, description="Alphabet size.")
    length: int = Field(3, ge=1, le=6, description="String length; the space holds symbols**length strings.")
    pairs: int = Field(8, ge=1, description="Preference pairs (2 * pairs distinct strings are in the data).")
    hidden_size: int = Field(8, ge=2, description="Width of the policy's state.")
    sft_steps: int = Field(150, ge=0)
    sft_lr: float = Field(1e-2, gt=0)
    steps: int = Field(600, ge=1, description="Preference optimization steps per method (full batch).")
    lr: float = Field(1e-2, gt=0)
    beta: float = Field(0.1, gt=0, description="β of every method that sets none of its own.")
    logging_steps: int = Field(5, ge=1)
    seed: int = 0
    threads: int = Field(1, ge=1, description="torch CPU threads (tiny ops: one is fastest).")
    methods: list[Method] = Field(default_factory=_default_methods)

    @model_validator(mode="after")
    def _fits(self) -> "ToyConfig":
        if 2 * self.pairs > self.symbols ** self.length:
            raise ValueError(f"pairs={self.pairs} needs {2 * self.pairs} distinct strings, "
                             f"the space holds {self.symbols ** self.length}")
        if len({m.name for m in self.methods}) != len(self.methods):
            raise ValueError("method names must be unique")
        return self


def load_config(path: str | Path | None) -> ToyConfig:
    data = read_recipe(path) if path is not None else {}
    data = data.get("toy", data)  # a recipe may nest the keys under `toy:`
    try:
        return ToyConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(["toy", *(str(p) for p in first["loc"])])
        what = "unknown key" if first["type"] == "extra_forbidden" else "bad value for"
        msg = "" if first["type"] == "extra_forbidden" else ": " + first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{path or 'defaults'}: {what} '{key}'{msg}") from None


@dataclass
class Task:
    """The enumerated sequence space and the preference data on it (token ids, BOS = 0)."""

    space: torch.Tensor      # all strings, [N, length + 1], BOS first
    chosen: torch.Tensor     # indices into space, [pairs]
    rejected: torch.Tensor   # indices into space, [pairs]
    ood: torch.Tensor        # bool mask over space: strings in no pair


def make_task(cfg: ToyConfig) -> Task:
    """Near-miss pairs: each rejected string is its chosen string with one symbol changed, the
    way real preference pairs differ in a detail. Symbols are token ids 1..symbols; 0 is BOS."""
    strings = list(itertools.product(range(1, cfg.symbols + 1), repeat=cfg.length))
    index = {s: i for i, s in enumerate(strings)}
    gen = torch.Generator().manual_seed(cfg.seed)
    used: set[int] = set()
    chosen, rejected = [], []
    for i in torch.randperm(len(strings), generator=gen).tolist():
        if len(chosen) == cfg.pairs:
            break
        if i in used:
            continue
        edits = [index[strings[i][:pos] + (sym,) + strings[i][pos + 1:]]
                 for pos in range(cfg.length) for sym in range(1, cfg.symbols + 1) if sym != strings[i][pos]]
        edits = [j for j in edits if j not in used]
        if not edits:
            continue
        j = edits[int(torch.randint(len(edits), (1,), generator=gen))]
        chosen.append(i)
        rejected.append(j)
        used.update((i, j))
    if len(chosen) < cfg.pairs:
        raise ConfigError(f"toy.pairs={cfg.pairs}: only {len(chosen)} near-miss pairs fit in the space")
    space = torch.tensor([[0, *s] for s in strings])
    ood = torch.ones(len(strings), dtype=torch.bool)
    ood[list(used)] = False
    return Task(space, torch.tensor(chosen), torch.tensor(rejected), ood)


class Policy(torch.nn.Module):
    """A tiny autoregressive model: the state after t tokens is tanh(W · Σ_{s≤t} e(s, y_s) + b),
    e a (position, token) embedding, and the next-token logits are linear in that state. Every
    string shares the same few weights, so pushing one string down moves the others too."""

    def __init__(self, symbols: int, length: int, hidden: int):
        super().__init__()
        self.slots = symbols + 1  # BOS and the symbols
        self.embed = torch.nn.Embedding(self.slots * (length + 1), hidden)
        self.mix = torch.nn.Linear(hidden, hidden)
        self.out = torch.nn.Linear(hidden, symbols)

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        """Next-token log-probabilities after each prefix, [batch, length, symbols]."""
        positions = torch.arange(seqs.shape[1] - 1)
        state = self.embed(seqs[:, :-1] + positions * self.slots).cumsum(1)
        return torch.log_softmax(self.out(torch.tanh(self.mix(state))), -1)


def build_model(cfg: ToyConfig) -> Policy:
    torch.manual_seed(cfg.seed)
    return Policy(cfg.symbols, cfg.length, cfg.hidden_size)


def sequence_logps(model: Policy, seqs: torch.Tensor) -> torch.Tensor:
    """log π(y) summed over the string's tokens (BOS is the prompt and is not scored)."""
    targets = seqs[:, 1:] - 1  # symbols are ids 1..symbols, logits index 0..symbols-1
    return model(seqs).gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(-1)


def sft(model: Policy, task: Task, cfg: ToyConfig) -> None:
    """Maximum likelihood on every string of the data (chosen and rejected alike), so the
    start puts most of its mass on the data's support, as an SFT model on in-domain text does."""
    data = task.space[torch.cat([task.chosen, task.rejected])]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.sft_lr)
    for _ in range(cfg.sft_steps):
        loss = -sequence_logps(model, data).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def measure(policy: Policy, start: Policy, task: Task) -> dict:
    """Exact masses by enumeration, and KL(π‖π_SFT) = Σ_y π(y) (log π(y) - log π_SFT(y))."""
    logp = sequence_logps(policy, task.space)
    p = logp.exp()
    return {
        "p_chosen": float(p[task.chosen].sum()),
        "p_rejected": float(p[task.rejected].sum()),
        "p_ood": float(p[task.ood].sum()),
        "kl_init": float((p * (logp - sequence_logps(start, task.space))).sum()),
    }


def train_method(start: Policy, task: Task, cfg: ToyConfig, method: Method) -> list[dict]:
    """One preference run from the SFT start; returns one row per logging step (step 0 included)."""
    from trcli import losses
    from trcli.trust_region import Schedule, update_full_reference

    policy = copy.deepcopy(start).requires_grad_(True)
    reference = copy.deepcopy(start)  # frozen, moved only by the trust-region update
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    loss_fn = losses.dpo_loss if method.loss == "dpo" else losses.ipo_loss
    schedule = Schedule(mode=method.update, alpha=method.alpha, tau=method.tau)
    # IPO on per-token-averaged log-ratios, the project's default (align.ipo_average).
    scale = 1.0 / cfg.length if method.loss == "ipo" else 1.0
    batch = task.space[torch.cat([task.chosen, task.rejected])]
    n = len(task.chosen)
    beta = method.beta if method.beta is not None else cfg.beta

    rows = [{"method": method.name, "step": 0, "loss": None, "ref_updates": 0, **measure(policy, start, task)}]
    for step in range(1, cfg.steps + 1):
        logp = sequence_logps(policy, batch) * scale
        with torch.no_grad():
            ref = sequence_logps(reference, batch) * scale
        loss = loss_fn(logp[:n], logp[n:], ref[:n], ref[n:], beta)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if schedule.due(step):
            update_full_reference(policy, reference, schedule.alpha)
            schedule.applied()
        if step % cfg.logging_steps == 0 or step == cfg.steps:
            rows.append({"method": method.name, "step": step, "loss": loss.item(),
                         "ref_updates": schedule.updates, **measure(policy, start, task)})
    return rows


def summarize(rows: list[dict]) -> dict:
    """Per method: the final values, the start, the lowest P(chosen) and the highest OOD mass on
    the way (the dip)."""
    out: dict = {}
    for method, group in itertools.groupby(rows, key=lambda r: r["method"]):
        group = list(group)
        last = group[-1]
        out[method] = {**{k: last[k] for k in CURVE_KEYS},
                       "start_p_chosen": group[0]["p_chosen"],
                       "min_p_chosen": min(r["p_chosen"] for r in group),
                       "start_p_ood": group[0]["p_ood"],
                       "max_p_ood": max(r["p_ood"] for r in group),
                       "ref_updates": last["ref_updates"]}
    return out


def plot(rows: list[dict], path: Path) -> None:
    """Four panels (P(chosen), P(rejected), OOD mass, KL to the start), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"p_chosen": "P(chosen strings)", "p_rejected": "P(rejected strings)",
              "p_ood": "mass out of distribution", "kl_init": "KL(π ‖ π_SFT)"}
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    for ax, key in zip(axes.flat, CURVE_KEYS):
        for method, group in itertools.groupby(rows, key=lambda r: r["method"]):
            group = list(group)
            ax.plot([r["step"] for r in group], [r[key] for r in group], label=method,
                    linestyle="-" if method.startswith("tr-") else "--")
        ax.set_title(titles[key])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    from trcli.runs import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def run(cfg: ToyConfig, output: str | Path) -> dict:
    from trcli.runs import Run, write_json, write_text

    torch.set_num_threads(cfg.threads)
    started = time.monotonic()
    run_dir = Run("toy", output, cfg)
    task = make_task(cfg)
    start = build_model(cfg)
    sft(start, task, cfg)
    start.requires_grad_(False)
    print(f"toy: {len(task.space)} strings, {len(task.chosen)} pairs, "
          f"{int(task.ood.sum())} strings never in the data", file=sys.stderr)
    rows: list[dict] = []
    for method in cfg.methods:
        rows.extend(train_method(start, task, cfg, method))
        last = rows[-1]
        print(f"toy: {method.name:<12} P(chosen) {last['p_chosen']:.3f}  OOD {last['p_ood']:.3f}  "
              f"KL {last['kl_init']:.3f}", file=sys.stderr)

    out = Path(output)
    write_text(out / "curves.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "curves.csv", buf.getvalue())
    plot(rows, out / "toy.png")
    summary = {"methods": summarize(rows), "strings": len(task.space), "pairs": len(task.chosen),
               "ood_strings": int(task.ood.sum()), "seconds": round(time.monotonic() - started, 1)}
    write_json(out / "summary.json", summary)
    run_dir.finish(curves="curves.jsonl", csv="curves.csv", plot="toy.png", summary="summary.json")
    return summary


def render(result: dict):
    from rich.table import Table

    table = Table(title=f"toy: {result['strings']} strings, {result['ood_strings']} never in the data")
    for col in ("method", "P(chosen) start", "min", "end", "P(rejected)", "OOD start", "max", "end",
                "KL to SFT"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for name, m in result["methods"].items():
        table.add_row(name, f"{m['start_p_chosen']:.3f}", f"{m['min_p_chosen']:.3f}", f"{m['p_chosen']:.3f}",
                      f"{m['p_rejected']:.3f}", f"{m['start_p_ood']:.3f}", f"{m['max_p_ood']:.3f}",
                      f"{m['p_ood']:.3f}", f"{m['kl_init']:.3f}")
    return table
