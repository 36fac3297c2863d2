"""A sweep on the driver: the parent MLflow run, Tune's Tuner over fewstep.sweeps.run_trial (restored if the
sweep's experiment already exists), then tune.publish."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient
from ray import tune

from fewstep.cluster import connect_ray
from fewstep.config import TrainConfig, load_config, to_yaml
from fewstep.data.storage import absolute_spec
from fewstep.engine import preflight
from fewstep.sweeps import SWEEP_TAG, run_trial
from fewstep.tracking import resolve_uri, run_url, start_or_resume_run
from pipelines.presets import preset_path
from tune.publish import Published, publish
from tune.spaces import Space, load_space, space_path

log = logging.getLogger("fewstep.sweep")


@dataclass
class SweepSummary:
    name: str
    parent_run_id: str
    parent_url: str
    restored: bool
    published: Published
    registered_model: str
    out_dir: Path
    trial_metrics: dict[str, dict]  # Tune trial id -> its last Tune result (what ASHA / Optuna saw)
    errors: dict[str, str]  # trial directory -> the last line of its error (the full text: error.txt there)


def base_tree(cfg: TrainConfig, uri: str) -> dict:
    """The preset resolved with absolute paths and URI: trial actors run in Tune's trial directories."""
    tree = cfg.model_dump(mode="json")
    tree["data"]["shards"] = absolute_spec(cfg.data.shards)
    if cfg.data.test_shards:
        tree["data"]["test_shards"] = absolute_spec(cfg.data.test_shards)
    tree["engine"]["storage_path"] = os.path.abspath(os.path.expanduser(cfg.engine.storage_path))
    tree["tracking"]["uri"] = uri
    return tree


def concurrency(cfg: TrainConfig, space: Space) -> int:
    """Trials at once: the cluster's CPUs over one trial's workers, keeping one CPU for Ray Data."""
    if space.sweep.max_concurrent:
        return space.sweep.max_concurrent
    per_trial = cfg.engine.num_workers * cfg.engine.cpus_per_worker
    return max(1, math.floor((ray.cluster_resources().get("CPU", 1) - 1) / per_trial))


def tune_config(space: Space, n_concurrent: int) -> tune.TuneConfig:
    s = space.sweep
    search = None
    if s.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search = OptunaSearch()
    scheduler = None
    if s.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        # time = Tune results = checkpoint reports (every eval.fid_every steps, each with a fresh FID)
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=10_000, grace_period=s.grace_period,
                                  reduction_factor=s.reduction_factor)
    return tune.TuneConfig(metric=s.metric, mode=s.mode, num_samples=s.num_samples, search_alg=search,
                           scheduler=scheduler, max_concurrent_trials=n_concurrent)


def run_sweep(
    preset: str, space_file: str, samples: int | None = None, overrides: list[str] = (), name: str | None = None,
    output_dir: str | Path = "outputs",
) -> SweepSummary:
    """`overrides`: `--set` values; `sweep.*` keys go to the space's SweepConfig, the rest to the preset."""
    sweep_sets = [o for o in overrides if o.startswith("sweep.")]
    cfg = load_config(preset_path(preset), None, [o for o in overrides if not o.startswith("sweep.")])
    space = load_space(space_file, cfg, sweep_sets)
    if samples:
        space.sweep.num_samples = samples
    name = name or f"{cfg.name}-{space_path(space_file).stem}"
    uri = resolve_uri(cfg.tracking.uri)
    preflight(cfg)  # shards, the MLflow server, teacher / init_from: before the parent run or Ray exist
    registered = cfg.tracking.registered_model or f"{cfg.name}-sweep"
    parent = start_or_resume_run(cfg, name, uri)  # the same parent run when a stopped sweep is re-run
    client = MlflowClient(uri)
    client.set_tag(parent, SWEEP_TAG, name)
    client.log_text(parent, space_path(space_file).read_text(), "sweep/space.yaml")
    client.log_text(parent, to_yaml(space.sweep), "sweep/sweep.yaml")

    connect_ray(cfg.engine.ray_address)
    max_steps = max(space.sweep.budgets.values())
    trainable = tune.with_parameters(run_trial, base_tree=base_tree(cfg, uri), scale=space.scale, sweep=name,
                                     parent_run_id=parent, max_steps=max_steps, rank=space.sweep.rank,
                                     posthoc_sigma_rels=space.sweep.posthoc_sigma_rels)
    # The trial actor only drives the inner TorchTrainer; its workers reserve the CPUs (a 1-CPU trial
    # driver starves the trainers of two concurrent trials).
    trainable = tune.with_resources(trainable, {"cpu": 0, "memory": 1})
    storage = os.path.abspath(os.path.expanduser(space.sweep.storage_path))
    path = os.path.join(storage, name)
    restored = tune.Tuner.can_restore(path)
    if restored:
        log.info("restoring sweep %s from %s: finished trials are kept, the others resume", name, path)
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space.tune_space(), tune_config=tune_config(space, concurrency(cfg, space)),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1),
        )
    results = tuner.fit()
    metrics, errors = {}, {}
    for r in results:
        if r.error:
            last = (str(r.error).strip().splitlines() or [type(r.error).__name__])[-1]
            errors[r.path] = f"{type(r.error).__name__}: {last}"
            log.warning("trial %s failed (%s): see %s/error.txt", r.path, errors[r.path], r.path)
        metrics[(r.metrics or {}).get("trial_id", r.path)] = r.metrics or {}
    e = cfg.eval
    out = Path(output_dir) / name
    what = "post-hoc EMA FID" if space.sweep.rank == "posthoc" else "in-training FID"
    published = publish(uri, parent, name, registered, space.sweep.budgets, out,
                        f"{e.fid_n} generated vs {e.fid_n_ref} held-out ({what})", rank=space.sweep.rank)
    client.set_terminated(parent, "FINISHED")  # RUNNING until here: a sweep that broke never shows FINISHED
    return SweepSummary(name, parent, run_url(uri, parent), restored, published, registered, out.resolve(),
                        metrics, errors)
