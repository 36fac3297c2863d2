"""Quality vs sampling steps across a sweep's trials: best FID within each step budget, the Pareto front, and
which trial each registry alias (`fast`, `balanced`, `quality`) should point at. Pure python: no MLflow, no Ray.

A trial contributes one point (k, FID) per step count k it was evaluated at. For a budget b the best model is
the lowest FID over all points with k <= b (ties: fewer steps, then trial name). Budgets where that best strictly
improves on every smaller budget are the Pareto front: no point uses fewer steps at a lower or equal FID.
Under `sweep.rank=posthoc` a trial's point at k steps is its best post-hoc EMA at k steps, and the table names that
EMA length (sigma_rel); otherwise the point is the trial's exported EMA.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class TrialFID:
    trial: str
    run_id: str
    fid: dict[int, float]  # sampling steps -> FID
    ema: dict[int, float] = field(default_factory=dict)  # sampling steps -> the post-hoc EMA length (sigma_rel)


@dataclass(frozen=True)
class BudgetBest:
    budget: int  # at most this many sampling steps
    fid: float | None  # None: no trial samples within the budget
    steps: int | None  # the step count that achieved it
    trial: str | None
    run_id: str | None
    on_front: bool
    ema: float | None = None  # the winner's post-hoc EMA length (sigma_rel); None: its exported (classic) EMA


def best_within(trials: Iterable[TrialFID], budget: int) -> tuple[float, int, TrialFID] | None:
    points = [(v, k, t.trial, t) for t in trials for k, v in t.fid.items() if k <= budget and math.isfinite(v)]
    if not points:
        return None
    fid, steps, _, trial = min(points, key=lambda p: p[:3])
    return fid, steps, trial


def pareto_table(trials: list[TrialFID], budgets: Iterable[int]) -> list[BudgetBest]:
    """One row per budget: every evaluated step count and every alias budget, ascending."""
    rows, best_so_far = [], math.inf
    for b in sorted({k for t in trials for k in t.fid} | set(budgets)):
        found = best_within(trials, b)
        if found is None:
            rows.append(BudgetBest(b, None, None, None, None, False))
            continue
        fid, steps, t = found
        rows.append(BudgetBest(b, fid, steps, t.trial, t.run_id, on_front=fid < best_so_far, ema=t.ema.get(steps)))
        best_so_far = min(best_so_far, fid)
    return rows


def alias_winners(table: list[BudgetBest], budgets: dict[str, int]) -> dict[str, BudgetBest]:
    """alias -> the table's row for its budget; aliases whose budget no trial meets are left out."""
    by_budget = {r.budget: r for r in table}
    return {alias: by_budget[b] for alias, b in budgets.items() if b in by_budget and by_budget[b].fid is not None}


def to_markdown(table: list[BudgetBest], budgets: dict[str, int]) -> str:
    alias_of = {b: a for a, b in budgets.items()}
    lines = ["| budget (steps) | best FID | at steps | trial | EMA | alias | Pareto front |",
             "|---|---|---|---|---|---|---|"]
    for r in table:
        fid = f"{r.fid:.1f}" if r.fid is not None else "-"
        alias = f"@{alias_of[r.budget]}" if r.budget in alias_of and r.fid is not None else ""
        ema = "-" if r.fid is None else f"sigma_rel {r.ema:g}" if r.ema is not None else "exported"
        lines.append(f"| <= {r.budget} | {fid} | {r.steps or '-'} | {r.trial or '-'} | {ema} | {alias} | "
                     f"{'yes' if r.on_front else ''} |")
    return "\n".join(lines) + "\n"


def write_csv(table: list[BudgetBest], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(BudgetBest.__dataclass_fields__))
        w.writeheader()
        w.writerows(asdict(r) for r in table)
    return path


def plot(trials: list[TrialFID], table: list[BudgetBest], path: Path) -> Path:
    """Every trial's FID-vs-steps points (thin lines) and the best-within-budget staircase (the front)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for t in trials:
        ks = sorted(t.fid)
        ax.plot(ks, [t.fid[k] for k in ks], marker="o", lw=0.8, alpha=0.6, label=t.trial)
    front = [r for r in table if r.fid is not None]
    ax.step([r.budget for r in front], [r.fid for r in front], where="post", color="k", lw=2, label="best within")
    ks = sorted({r.budget for r in table})
    ax.set(xscale="log", xlabel="sampling steps (budget)", ylabel="FID")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
