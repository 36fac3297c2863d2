"""FID results over seeds: a table per model and step count, its protocol, JSON files, comparison and a plot.

A table holds, for every (model, step count), one FID per seed, and the protocol they share: samples per step
count and seed, the seeds, the sampler, the noise block size and the reference statistics' identity (sha256 of
the reference images, their number and where they came from). Two FIDs are comparable only when their reference
hashes and sample counts match; `check_comparable` refuses anything else, naming both.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class IncomparableFID(ValueError):
    """Two FID results measured against different references or with different sample counts."""


@dataclass
class ModelInfo:
    """Where a row's model came from; name/version/run_id only for a registered model (what `record` logs to)."""

    label: str
    uri: str | None = None
    name: str | None = None
    version: str | None = None
    run_id: str | None = None


@dataclass
class FIDRow:
    model: str
    steps: int
    fid: list[float]  # one per seed, in the order of FIDTable.seeds

    @property
    def mean(self) -> float:
        return sum(self.fid) / len(self.fid)

    @property
    def std(self) -> float:
        """Sample standard deviation over the seeds (n - 1 in the denominator); 0 for one seed."""
        if len(self.fid) < 2:
            return 0.0
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.fid) / (len(self.fid) - 1))

    @property
    def min(self) -> float:
        return min(self.fid)

    def summary(self) -> str:
        """"mean ± std" (what the model-version tag fid_steps_<k> holds)."""
        return f"{self.mean:.2f} ± {self.std:.2f}"


@dataclass
class FIDTable:
    rows: list[FIDRow]
    n: int  # generated images per step count and seed
    seeds: list[int]
    reference: dict[str, Any]  # {"sha256", "n", "size", "source"}
    sampler: str | None = None
    seed_block: int = 50
    models: dict[str, ModelInfo] = field(default_factory=dict)

    def by_model(self, model: str) -> dict[int, FIDRow]:
        return {r.steps: r for r in self.rows if r.model == model}

    def only(self, model: str) -> FIDTable:
        """The rows of one model, with the same protocol."""
        rows = [r for r in self.rows if r.model == model]
        return FIDTable(rows, self.n, self.seeds, self.reference, self.sampler, self.seed_block,
                        {model: self.models[model]} if model in self.models else {})

    def protocol(self) -> str:
        """One line: what was measured against what (logged with every FID)."""
        ref = self.reference
        seeds = ",".join(str(s) for s in self.seeds)
        return (f"{self.n} samples per step count and seed (seeds {seeds}"
                f"{f', sampler {self.sampler}' if self.sampler else ''}) vs {ref['n']} images of {ref['source']} "
                f"at {ref['size']}px (reference sha256 {ref['sha256']})")

    def format(self) -> str:
        """A plain-text table: model, steps, mean ± std, min, the FID of every seed."""
        w = max([len("model"), *(len(r.model) for r in self.rows)])  # names in full: they are the models' URIs
        lines = [f"FID: {self.protocol()}",
                 f"{'model':<{w}} {'steps':>5} {'mean ± std':>16} {'min':>8}  per seed"]
        for r in self.rows:
            lines.append(f"{r.model:<{w}} {r.steps:>5} {r.summary():>16} {r.min:>8.2f}  "
                         + " ".join(f"{v:.2f}" for v in r.fid))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n, "seeds": self.seeds, "sampler": self.sampler, "seed_block": self.seed_block,
            "reference": self.reference, "models": {k: asdict(v) for k, v in self.models.items()},
            "rows": [{"model": r.model, "steps": r.steps, "fid": r.fid, "mean": r.mean, "std": r.std, "min": r.min}
                     for r in self.rows],
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "FID table") -> FIDTable:
        try:
            rows = [FIDRow(r["model"], int(r["steps"]), [float(v) for v in r["fid"]]) for r in d["rows"]]
            ref = d["reference"]
            if not isinstance(ref, dict) or "sha256" not in ref:
                raise KeyError("reference.sha256")
            models = {k: ModelInfo(**v) for k, v in d.get("models", {}).items()}
            return cls(rows, int(d["n"]), [int(s) for s in d["seeds"]], ref, d.get("sampler"),
                       int(d.get("seed_block", 50)), models)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source} is not a fewstep FID table: missing or bad field {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> FIDTable:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read an FID table: {e}") from None
        return cls.from_dict(data, source=str(path))


def check_comparable(a: FIDTable, b: FIDTable, names: tuple[str, str] = ("A", "B")) -> None:
    """Raise IncomparableFID unless a and b were measured against the same reference images (sha256) with the
    same number of generated samples; the message names both values."""
    ha, hb = a.reference["sha256"], b.reference["sha256"]
    if ha != hb:
        raise IncomparableFID(
            f"FIDs are not comparable: {names[0]} was measured against reference sha256 {ha} "
            f"({a.reference['n']} images of {a.reference['source']}), {names[1]} against sha256 {hb} "
            f"({b.reference['n']} images of {b.reference['source']})"
        )
    if a.n != b.n:
        raise IncomparableFID(
            f"FIDs are not comparable: {names[0]} used {a.n} samples per step count, {names[1]} {b.n} "
            "(FID is biased by the sample count; compare equal counts)"
        )


def compare(a: FIDTable, b: FIDTable, names: tuple[str, str] = ("A", "B")) -> str:
    """Side by side, per step count both measured (every model of each): mean ± std and B - A of the means.
    Refuses (IncomparableFID) unless check_comparable passes."""
    check_comparable(a, b, names)
    lines = [f"reference sha256 {a.reference['sha256']} ({a.reference['n']} images), {a.n} samples per step count",
             f"{'steps':>5}  {names[0][-28:]:>28}  {names[1][-28:]:>28}  {'B - A':>8}"]
    for ra in a.rows:
        for rb in b.rows:
            if rb.steps == ra.steps:
                lines.append(f"{ra.steps:>5}  {ra.model[-12:] + ' ' + ra.summary():>28}  "
                             f"{rb.model[-12:] + ' ' + rb.summary():>28}  {rb.mean - ra.mean:>+8.2f}")
    return "\n".join(lines)


def plot(table: FIDTable, path: str | Path, title: str | None = None) -> Path:
    """FID vs sampling steps, one line per model with error bars of +- one standard deviation over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    xs_all: set[int] = set()
    for model in dict.fromkeys(r.model for r in table.rows):
        rows = sorted(table.by_model(model).values(), key=lambda r: r.steps)
        xs = [r.steps for r in rows]
        xs_all.update(xs)
        ax.errorbar(xs, [r.mean for r in rows], yerr=[r.std for r in rows], marker="o", capsize=3, label=model)
    ax.set(xscale="log", xlabel="sampling steps", ylabel="FID",
           title=title or f"n={table.n}, {len(table.seeds)} seeds")
    ax.set_xticks(sorted(xs_all), [str(s) for s in sorted(xs_all)])
    if len({r.model for r in table.rows}) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
