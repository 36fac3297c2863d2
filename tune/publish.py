"""The end of a sweep: read the trials' FIDs from their MLflow child runs, write the Pareto table (CSV, markdown)
and plot as artifacts of the parent run, register the winners and point the budget aliases at them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from fewstep.posthoc_select import FID_KEY, SIGMA_KEY, model_name
from fewstep.sweeps import FID_PREFIX, MODEL_TAG, PARENT_TAG, SWEEP_TAG, TRIAL_TAG
from tune.pareto import BudgetBest, TrialFID, alias_winners, pareto_table, plot, to_markdown, write_csv


@dataclass
class Published:
    table: list[BudgetBest]
    markdown: str
    aliases: dict[str, tuple[str, BudgetBest]]  # alias -> (registered version, its row)
    trials: list[TrialFID]


def child_runs(client: MlflowClient, parent_run_id: str) -> list:
    exp = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=1000)


def trial_fid(run, rank: str = "final") -> TrialFID | None:
    """A finished child run's FID per step count: its final in-training FID, or (rank posthoc) its best post-hoc
    EMA's with that EMA's length."""
    m = run.data.metrics
    if rank == "posthoc":
        prefix, sigma = FID_KEY.format(k=""), SIGMA_KEY.format(k="")
        fid = {int(k.removeprefix(prefix)): v for k, v in m.items() if k.startswith(prefix)}
        ema = {k: m[f"{sigma}{k}"] for k in fid if f"{sigma}{k}" in m}
    else:
        fid, ema = {int(k.removeprefix(FID_PREFIX)): v for k, v in m.items() if k.startswith(FID_PREFIX)}, {}
    trial = run.data.tags.get(TRIAL_TAG, run.info.run_id)
    return TrialFID(trial, run.info.run_id, fid, ema) if fid else None


def trial_fids(client: MlflowClient, parent_run_id: str, rank: str = "final") -> list[TrialFID]:
    """Finished trials (model logged) with their FID at each evaluated step count."""
    out = []
    for run in child_runs(client, parent_run_id):
        if not run.data.tags.get(MODEL_TAG) or run.data.tags.get("fewstep.status", "finished") != "finished":
            continue  # stopped early by ASHA, diverged or failed: no model to rank or register
        if (t := trial_fid(run, rank)) is not None:
            out.append(t)
    return sorted(out, key=lambda t: t.trial)


def register(client: MlflowClient, name: str, t: TrialFID, sweep: str, ema: float | None = None) -> str:
    """The registered version of a trial's model (one version per run and post-hoc EMA length `ema`, reused when
    the sweep is re-published)."""
    label = "exported" if ema is None else f"{ema:g}"
    found = [v for v in client.search_model_versions(f"name = '{name}' and run_id = '{t.run_id}'")
             if v.tags.get("posthoc.sigma_rel", "exported") == label]
    if found:
        return str(found[0].version)
    model = "model" if ema is None else model_name(ema)
    version = str(mlflow.register_model(f"runs:/{t.run_id}/{model}", name).version)
    if ema is not None:
        client.set_model_version_tag(name, version, "posthoc.sigma_rel", label)
    for k, v in sorted(t.fid.items()):
        client.set_model_version_tag(name, version, f"{FID_PREFIX}{k}", f"{v:.3f}")
    client.set_model_version_tag(name, version, SWEEP_TAG, sweep)
    client.set_model_version_tag(name, version, TRIAL_TAG, t.trial)
    return version


def publish(
    uri: str, parent_run_id: str, sweep: str, registered_model: str, budgets: dict[str, int], out_dir: Path,
    fid_samples: str, rank: str = "final",
) -> Published:
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    trials = trial_fids(client, parent_run_id, rank)
    if not trials:
        raise RuntimeError(f"sweep {sweep}: no trial finished with a model and an FID; see the Tune output above")
    table = pareto_table(trials, budgets.values())
    md = to_markdown(table, budgets)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "pareto.md").write_text(md)
    files = [out_dir / "pareto.md", write_csv(table, out_dir / "pareto.csv"),
             plot(trials, table, out_dir / "pareto.png")]
    for f in files:
        client.log_artifact(parent_run_id, str(f), "pareto")
    by_run = {t.run_id: t for t in trials}
    aliases = {}
    for alias, row in alias_winners(table, budgets).items():
        version = register(client, registered_model, by_run[row.run_id], sweep, row.ema)
        client.set_model_version_tag(registered_model, version, "fid_samples", fid_samples)
        client.set_registered_model_alias(registered_model, alias, version)
        aliases[alias] = (version, row)
    for alias, (version, row) in aliases.items():
        ema = f", EMA sigma_rel {row.ema:g}" if row.ema is not None else ""
        client.set_tag(parent_run_id, f"alias.{alias}", f"{registered_model}/{version} ({row.steps} steps, FID "
                       f"{row.fid:.1f}{ema})")
    return Published(table, md, aliases, trials)
