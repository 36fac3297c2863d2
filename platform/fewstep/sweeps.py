"""One sweep trial = one full distributed training run, as a Ray Tune *function trainable*.

Train V2 pattern: Tune runs `run_trial` in a trial actor; it builds the same TorchTrainer as `python -m
pipelines.train` (fewstep.engine.fit) and calls fit(). Metrics reach Tune through a Train V2 callback
(`SweepReportCallback`, Ray's TuneReportCallback): every checkpoint report of rank 0 (step, loss, the latest
fid_steps_<k>) becomes a Tune result, plus `fid_best` = min over k, on which ASHA and Optuna decide; the final
result is reported by run_trial after the model is logged. Each trial
logs to its own MLflow child run of the sweep's parent run and logs its model there (registered only if it
wins a budget, by the driver, tune/publish.py). With `sweep.rank=posthoc`, a finished trial also reconstructs its
post-hoc EMAs (fewstep.posthoc_select), logs the best one per step count as models of its run, and reports their
FIDs as its final result. Names are deterministic (sweep name + Tune trial id), so a
restored sweep's trials resume their Ray Train run from its last checkpoint and continue the same MLflow run.
This module runs in Ray actors: it imports only fewstep.
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from fewstep.config import TrainConfig, build_config, set_dotted
from fewstep.objectives import build_objective

FID_PREFIX = "fid_steps_"
SWEEP_TAG = "fewstep.sweep"
TRIAL_TAG = "fewstep.trial"
MODEL_TAG = "fewstep.model_logged"
POSTHOC_TAG = "fewstep.posthoc_logged"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests child runs under it


def with_fid_best(metrics: dict[str, Any]) -> dict[str, Any]:
    """fid_best = the lowest FID over the evaluated step counts (what ASHA and Optuna rank trials on)."""
    fids = [v for k, v in metrics.items() if k.startswith(FID_PREFIX)]
    return {**metrics, "fid_best": min(fids)} if fids else dict(metrics)


class SweepReportCallback(TuneReportCallback):
    """Rank 0's Train report -> a Tune result, except the final one: run_trial reports that itself once the model
    is logged, so that ASHA stopping the trial on it cannot lose a finished trial's model."""

    def __init__(self, total_steps: int):
        super().__init__()
        self.total_steps = total_steps

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if metrics[0].get("step", 0) >= self.total_steps:
            return
        super().after_report(run_context, [with_fid_best(metrics[0]), *metrics[1:]], checkpoint)


def apply(base_tree: dict[str, Any], sample: dict[str, Any], scale: dict[str, float]) -> dict[str, Any]:
    """The config tree of one trial: the base tree with each sampled value (times its scale, if any) set."""
    tree = copy.deepcopy(base_tree)
    for key, value in sample.items():
        set_dotted(tree, key, value * scale[key] if key in scale else value)
    return tree


def eval_steps(cfg: TrainConfig, max_steps: int) -> list[int]:
    """Every step count the model can sample, up to the largest alias budget: [S] for multistep, 1..1+len(sigma_mid)
    for iCT, powers of two for diffusion."""
    return build_objective(cfg).capabilities.steps.upto(max_steps)


def trial_config(tree: dict[str, Any], max_steps: int, source: str) -> TrainConfig:
    """A trial's config: FID at every sampleable step count, computed at each checkpoint so that every Tune
    result carries it (ASHA compares trials on it); at least once, at the end."""
    cfg = build_config(tree, source=source)
    steps = eval_steps(cfg, max_steps)
    every = cfg.eval.fid_every or cfg.optim.total_steps
    evals = cfg.eval.model_copy(update={"steps": steps, "fid_steps": steps, "fid_every": every})
    engine = cfg.engine.model_copy(update={"checkpoint_every": every})
    return build_config({**cfg.model_dump(mode="json"), "eval": evals.model_dump(), "engine": engine.model_dump()},
                        source=source)


def run_trial(
    config: dict[str, Any], *, base_tree: dict, scale: dict, sweep: str, parent_run_id: str, max_steps: int,
    rank: str = "final", posthoc_sigma_rels: list[float] = (),
) -> None:
    """Tune's function trainable: config = this trial's draw {dotted.key: value}. The same driver path as
    `pipelines.train` (fewstep.engine.run); a trial that diverges or fails is reported to Tune with its status and
    no FID, and no model is logged for it, so it is never ranked or registered."""
    from fewstep.engine import export_model, run
    from fewstep.tracking import log_and_register

    trial_id = tune.get_context().get_trial_id()
    run_name = f"{sweep}-{trial_id}"
    cfg = trial_config(apply(base_tree, config, scale), max_steps, f"sweep {sweep} trial {trial_id}")
    cfg = cfg.model_copy(update={"name": run_name})
    uri = cfg.tracking.uri

    def tag(run_id: str) -> None:  # once the MLflow run exists (found again by its run-name tag when restored)
        client = MlflowClient(uri)
        for k, v in {PARENT_TAG: parent_run_id, SWEEP_TAG: sweep, TRIAL_TAG: trial_id}.items():
            client.set_tag(run_id, k, v)
        for key, value in config.items():
            client.set_tag(run_id, f"sweep.{key}", str(value))  # the raw draw (huber_c: before `times`)

    result = run(cfg, run_name, callbacks=[SweepReportCallback(cfg.optim.total_steps)], before_fit=tag)
    if result.status == "failed":
        raise result.error
    if result.status == "diverged":
        tune.report({"step": result.metrics.get("step", 0), "status": "diverged", "fid_best": math.inf})
        return
    if result.checkpoint is None:
        raise RuntimeError(f"trial {run_name} finished without a checkpoint")
    client = MlflowClient(uri)
    if not client.get_run(result.run_id).data.tags.get(MODEL_TAG):  # else: a restored trial that had finished
        with tempfile.TemporaryDirectory() as d:
            model_dir = export_model(result.checkpoint, Path(d) / "model")
            unregistered = cfg.model_copy(
                update={"tracking": cfg.tracking.model_copy(update={"registered_model": None})})
            log_and_register(result.run_id, model_dir, unregistered, uri)  # registered only if it wins a budget
        client.set_tag(result.run_id, MODEL_TAG, "true")
    final = with_fid_best(result.metrics)
    if rank == "posthoc":
        final = {**result.metrics, **posthoc_result(client, result, cfg, list(posthoc_sigma_rels))}
    tune.report({**final, "status": "finished"})  # the final result, after the model is safe


def posthoc_result(client: MlflowClient, result, cfg: TrainConfig, sigma_rels: list[float]) -> dict[str, float]:
    """sweep.rank=posthoc: the trial's best post-hoc EMA per step count (evaluated and logged once per run),
    as posthoc_fid_steps_<k>, posthoc_sigma_rel_steps_<k> and fid_best, the lowest of those FIDs."""
    import torch

    from fewstep import posthoc_select as ph
    from fewstep.ema import checkpoint_snapshots

    if not client.get_run(result.run_id).data.tags.get(POSTHOC_TAG):  # else: a restored trial that had finished
        e = cfg.eval
        snapshots = checkpoint_snapshots(result.checkpoint)
        device = "cuda" if cfg.engine.use_gpu and torch.cuda.is_available() else "cpu"
        rows = ph.evaluate_grid(result.checkpoint, cfg, sigma_rels, e.fid_steps or e.steps, e.fid_n, e.fid_n_ref,
                                device=device, snapshots=snapshots)
        best = ph.best_per_steps(rows)
        with tempfile.TemporaryDirectory() as d:
            ph.log_results(client, result.run_id, rows, best, cfg.ema.sigma_rels, Path(d))
        ph.log_models(result.run_id, result.checkpoint, cfg, cfg.tracking.uri, {r.sigma_rel for r in best.values()},
                      snapshots)
        client.set_tag(result.run_id, POSTHOC_TAG, "true")
    m = client.get_run(result.run_id).data.metrics
    out = {k: v for k, v in m.items() if k.startswith(("posthoc_fid_steps_", "posthoc_sigma_rel_steps_"))}
    fids = [v for k, v in out.items() if k.startswith("posthoc_fid_steps_")]
    return {**out, "fid_best": min(fids) if fids else math.inf}
