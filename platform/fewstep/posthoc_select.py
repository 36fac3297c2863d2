"""Choosing the EMA length after training [EDM2 sec. 3.2]: a run's snapshots (fewstep.ema, `ema.mode=posthoc`) ->
the EMA of each candidate length (fewstep.posthoc_ema.reconstruct) -> FID at each sampling step count -> the best
length per step count, logged to the run and registered as `@best-<k>step`. Used by pipelines.posthoc_ema and by
sweeps with `sweep.rank=posthoc` (fewstep.sweeps)."""

from __future__ import annotations

import csv
import json
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file

from fewstep.config import ConfigError, TrainConfig, build_config
from fewstep.ema import checkpoint_snapshots
from fewstep.evaluation import evaluate_generators
from fewstep.generator import WEIGHTS, Generator
from fewstep.objectives import build_model, build_objective
from fewstep.posthoc_ema import Snapshot, reconstruct
from fewstep.tracking import RUN_NAME_TAG

ARTIFACTS = "posthoc_ema"  # the run's artifact folder for the table and plot
FID_KEY = "posthoc_fid_steps_{k}"  # metrics of the run: the best post-hoc FID at k steps ...
SIGMA_KEY = "posthoc_sigma_rel_steps_{k}"  # ... and the EMA length that reached it


@dataclass(frozen=True)
class Row:
    sigma_rel: float
    steps: int
    fid: float  # the mean over the sampling seeds
    std: float = 0.0  # their sample standard deviation (0 for one seed)


def alias(k: int) -> str:
    return f"best-{k}step"


def model_name(sigma_rel: float) -> str:
    """The logged model of one reconstructed EMA inside its run (MLflow names take no dots)."""
    return f"ema-sigma-rel-{sigma_rel:g}".replace(".", "p")


def find_run(client: MlflowClient, ref: str):
    """An MLflow run by id, else by its fewstep run name (ValueError naming `ref` when neither exists)."""
    try:
        return client.get_run(ref)
    except Exception:  # noqa: BLE001  not an id of this server: try it as a run name
        found = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                   filter_string=f"tags.`{RUN_NAME_TAG}` = '{ref}'", max_results=1)
        if not found:
            raise ValueError(f"--run {ref!r}: no MLflow run with that id or run name") from None
        return found[0]


def run_config(client: MlflowClient, run_id: str) -> TrainConfig:
    with tempfile.TemporaryDirectory() as d:
        path = client.download_artifacts(run_id, "config.yaml", d)
        return build_config(yaml.safe_load(Path(path).read_text()), source=f"run {run_id} config.yaml")


def latest_checkpoint(cfg: TrainConfig, run_name: str) -> Path:
    """The run's checkpoint of the highest step in its storage (engine.storage_path / run name)."""
    from fewstep.engine import storage_dir
    from fewstep.loop import STATE

    root = storage_dir(cfg, run_name)
    if root is None:
        raise ValueError(f"engine.storage_path={cfg.engine.storage_path} is not a local path: pass --checkpoint DIR")
    states = list(root.glob(f"checkpoint_*/{STATE}"))
    if not states:
        raise ValueError(f"{root}: no checkpoint of run {run_name!r} (engine.storage_path={cfg.engine.storage_path})")
    return max(states, key=lambda p: json.loads(p.read_text())["step"]).parent


def ema_generator(checkpoint: Path, cfg: TrainConfig, weights: dict[str, torch.Tensor], device: str = "cpu"):
    """The checkpoint's exported model with its parameters replaced by `weights` (buffers kept)."""
    state = load_file(str(checkpoint / "model" / WEIGHTS))
    unknown = set(weights) - set(state)
    if unknown:
        raise ValueError(f"{checkpoint}: snapshot tensors {sorted(unknown)[:3]} are not parameters of the model")
    state.update(weights)
    model = build_model(cfg)
    model.load_state_dict(state)
    return Generator(model.to(device).eval(), cfg)


def evaluate_grid(checkpoint: Path, cfg: TrainConfig, sigma_rels: list[float], steps: list[int], n: int, n_ref: int,
                  reference_shards: str | None = None, seeds: int = 1, device: str = "cpu",
                  snapshots: list[Snapshot] | None = None, num_workers: int = 0) -> list[Row]:
    """FID of every (EMA length x step count), each EMA reconstructed at the last snapshot's step; the FID is the
    mean over sampling seeds 0..seeds-1 (fewstep.evaluation.evaluate_generators: the same seeded samples whatever
    `num_workers`, a progress bar with ETA)."""
    caps = build_objective(cfg).capabilities
    for k in steps:
        caps.steps.check(k, f"objective.name={cfg.objective.name}")
    shards = reference_shards or cfg.data.test_shards
    if not shards:
        raise ConfigError("the run's config has no data.test_shards (the FID reference): pass --reference SHARDS")
    snapshots = snapshots if snapshots is not None else checkpoint_snapshots(checkpoint)
    gens = {sigma: ema_generator(checkpoint, cfg, reconstruct(snapshots, sigma)[0], device) for sigma in sigma_rels}
    table = evaluate_generators({f"sigma_rel {sigma:g}": g for sigma, g in gens.items()}, steps, n, shards, n_ref,
                                seeds, num_workers=num_workers, use_gpu=device != "cpu")
    cell = {(sigma, k): table.by_model(f"sigma_rel {sigma:g}")[k] for sigma in sigma_rels for k in steps}
    return [Row(sigma, k, cell[sigma, k].mean, cell[sigma, k].std) for sigma in sigma_rels for k in steps]


def best_per_steps(rows: list[Row]) -> dict[int, Row]:
    """k -> the row of the lowest finite FID at k steps (ties: the shorter EMA)."""
    best: dict[int, Row] = {}
    for r in sorted(rows, key=lambda r: (r.steps, r.fid, r.sigma_rel)):
        if math.isfinite(r.fid) and r.steps not in best:
            best[r.steps] = r
    return best


def cell_text(r: Row) -> str:
    return f"{r.fid:.2f} ± {r.std:.2f}" if r.std else f"{r.fid:.2f}"


def to_markdown(rows: list[Row], best: dict[int, Row]) -> str:
    steps = sorted({r.steps for r in rows})
    by = {(r.sigma_rel, r.steps): r for r in rows}
    lines = ["| sigma_rel | " + " | ".join(f"FID {k} step{'s' if k > 1 else ''}" for k in steps) + " |",
             "|---" * (len(steps) + 1) + "|"]
    for sigma in sorted({r.sigma_rel for r in rows}):
        cells = [f"**{cell_text(by[sigma, k])}**" if best.get(k) == by[sigma, k] else cell_text(by[sigma, k])
                 for k in steps]
        lines.append(f"| {sigma:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path, tracked: list[float]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for k in sorted({r.steps for r in rows}):
        pts = sorted((r.sigma_rel, r.fid, r.std) for r in rows if r.steps == k)
        x, y, err = zip(*pts, strict=True)
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{k} step{'s' if k > 1 else ''}")
    for s in tracked:
        ax.axvline(s, color="grey", lw=0.6, ls=":")
    ax.set(xscale="log", xlabel="EMA length sigma_rel (dotted: tracked)", ylabel="FID", title="post-hoc EMA")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_results(client: MlflowClient, run_id: str, rows: list[Row], best: dict[int, Row], tracked: list[float],
                out_dir: Path) -> str:
    """The table (markdown, CSV) and plot as artifacts of the run, and the best FID and length per step count as
    its metrics; returns the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = to_markdown(rows, best)
    (out_dir / "posthoc_ema.md").write_text(md)
    with open(out_dir / "posthoc_ema.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(Row.__dataclass_fields__))
        w.writeheader()
        w.writerows(asdict(r) for r in rows)
    plot(rows, out_dir / "posthoc_ema.png", tracked)
    for name in ("posthoc_ema.md", "posthoc_ema.csv", "posthoc_ema.png"):
        client.log_artifact(run_id, str(out_dir / name), ARTIFACTS)
    for k, r in best.items():
        client.log_metric(run_id, FID_KEY.format(k=k), r.fid)
        client.log_metric(run_id, SIGMA_KEY.format(k=k), r.sigma_rel)
    return md


def log_models(run_id: str, checkpoint: Path, cfg: TrainConfig, uri: str, sigma_rels: set[float],
               snapshots: list[Snapshot], registered_model: str | None = None) -> dict[float, str | None]:
    """Log each EMA length's reconstruction as a model of the run (`model_name`), registered under
    `registered_model` if given; returns sigma_rel -> registered version (None when not registered)."""
    from fewstep.engine import export_model
    from fewstep.tracking import log_and_register

    tracking = cfg.tracking.model_copy(update={"registered_model": registered_model})
    versions = {}
    for sigma in sorted(sigma_rels):
        weights, _ = reconstruct(snapshots, sigma)
        with tempfile.TemporaryDirectory() as d:
            out = export_model(checkpoint, Path(d) / "model")
            state = load_file(str(out / WEIGHTS))
            state.update(weights)
            save_file(state, str(out / WEIGHTS))
            _, versions[sigma] = log_and_register(run_id, out, cfg.model_copy(update={"tracking": tracking}), uri,
                                                  name=model_name(sigma), alias=None)
    return versions


def register_best(client: MlflowClient, run_id: str, checkpoint: Path, cfg: TrainConfig, uri: str,
                  best: dict[int, Row], registered_model: str, snapshots: list[Snapshot]) -> dict[str, str]:
    """One model version per distinct best EMA length; alias best-<k>step -> the version best at k steps."""
    versions = log_models(run_id, checkpoint, cfg, uri, {r.sigma_rel for r in best.values()}, snapshots,
                          registered_model)
    out = {}
    for k, r in sorted(best.items()):
        v = versions[r.sigma_rel]
        client.set_model_version_tag(registered_model, v, "posthoc.sigma_rel", f"{r.sigma_rel:g}")
        client.set_model_version_tag(registered_model, v, f"fid_steps_{k}", f"{r.fid:.3f}")
        client.set_registered_model_alias(registered_model, alias(k), v)
        out[alias(k)] = v
    return out
