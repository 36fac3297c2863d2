"""Sweeps: space validation and Pareto/alias selection (pure python), and a real 2-trial sweep through Ray Tune,
Ray Train, DeepSpeed and the MLflow server, re-run to check that a finished sweep restores instead of restarting."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from fewstep.config import ConfigError, load_config
from pipelines.presets import preset_path
from tune.pareto import TrialFID, alias_winners, pareto_table, to_markdown
from tune.spaces import load_space

BUDGETS = {"fast": 1, "balanced": 4, "quality": 8}


# --- Pareto and aliases on synthetic numbers ---------------------------------------------------------------

def test_pareto_best_within_budget_and_front():
    trials = [
        TrialFID("a", "ra", {1: 90.0, 2: 60.0}),  # iCT: 1-2 steps
        TrialFID("b", "rb", {4: 40.0}),  # multistep S = 4
        TrialFID("c", "rc", {1: 80.0, 2: 70.0}),
        TrialFID("d", "rd", {8: 45.0}),  # worse than b although it may use more steps: not on the front
    ]
    table = {r.budget: r for r in pareto_table(trials, BUDGETS.values())}
    assert sorted(table) == [1, 2, 4, 8]
    assert (table[1].trial, table[1].steps, table[1].fid) == ("c", 1, 80.0)
    assert (table[2].trial, table[2].steps) == ("a", 2)
    assert (table[4].trial, table[4].steps) == ("b", 4)
    assert (table[8].trial, table[8].fid) == ("b", 40.0)  # the best within 8 steps is b's 4-step model
    assert [table[b].on_front for b in (1, 2, 4, 8)] == [True, True, True, False]
    winners = alias_winners(list(table.values()), BUDGETS)
    assert {a: w.run_id for a, w in winners.items()} == {"fast": "rc", "balanced": "rb", "quality": "rb"}
    md = to_markdown(list(table.values()), BUDGETS)
    assert "| <= 1 | 80.0 | 1 | c | exported | @fast | yes |" in md
    assert "| <= 8 | 40.0 | 4 | b | exported | @quality |  |" in md


def test_posthoc_rank_reads_the_best_ema_per_step_count_and_the_table_names_its_length():
    """sweep.rank=posthoc: a trial's point at k steps is its best post-hoc EMA at k (posthoc_fid_steps_<k>, with the
    length posthoc_sigma_rel_steps_<k>), not its in-training FID; the Pareto rows carry that length."""
    from mlflow.entities import Metric, Run, RunData, RunInfo, RunTag

    from tune.publish import trial_fid

    def run(run_id, trial, metrics):
        info = RunInfo(run_id, "0", "u", "FINISHED", 0, 1, "active", run_name=trial)
        return Run(info, RunData(metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                                 tags=[RunTag("fewstep.trial", trial)]))

    a = run("ra", "a", {"fid_steps_1": 90.0, "fid_steps_2": 60.0, "posthoc_fid_steps_1": 70.0,
                        "posthoc_sigma_rel_steps_1": 0.2, "posthoc_fid_steps_2": 55.0,
                        "posthoc_sigma_rel_steps_2": 0.05})
    b = run("rb", "b", {"fid_steps_1": 75.0, "posthoc_fid_steps_1": 74.0, "posthoc_sigma_rel_steps_1": 0.1})
    assert trial_fid(a) == TrialFID("a", "ra", {1: 90.0, 2: 60.0})
    posthoc = [trial_fid(a, "posthoc"), trial_fid(b, "posthoc")]
    assert posthoc[0] == TrialFID("a", "ra", {1: 70.0, 2: 55.0}, {1: 0.2, 2: 0.05})
    assert trial_fid(run("rc", "c", {"fid_steps_1": 80.0}), "posthoc") is None  # no post-hoc result: not ranked
    # ranked on the in-training FID, b wins 1 step; on the post-hoc FID, a's sigma_rel 0.2 EMA does
    assert pareto_table([trial_fid(a), trial_fid(b)], [1])[0].trial == "b"
    table = {r.budget: r for r in pareto_table(posthoc, BUDGETS.values())}
    assert (table[1].trial, table[1].fid, table[1].ema) == ("a", 70.0, 0.2)
    assert (table[4].steps, table[4].ema) == (2, 0.05)  # the best within 4 steps samples in 2, with another EMA
    md = to_markdown(list(table.values()), BUDGETS)
    assert "| <= 1 | 70.0 | 1 | a | sigma_rel 0.2 | @fast | yes |" in md
    assert "| <= 4 | 55.0 | 2 | a | sigma_rel 0.05 | @balanced |  |" in md


def test_posthoc_rank_needs_posthoc_trials(tmp_path):
    ict = load_config(preset_path("fashion-ict"))
    with pytest.raises(ConfigError, match=r"sweep.rank=posthoc needs .*ema.mode=posthoc"):
        load_space("pseudo_huber", ict, ["sweep.rank=posthoc"])
    posthoc = load_config(preset_path("fashion-ict"), None, ["ema.mode=posthoc"])
    space = load_space("pseudo_huber", posthoc, ["sweep.rank=posthoc"])
    assert space.sweep.rank == "posthoc" and space.sweep.posthoc_sigma_rels == [0.02, 0.05, 0.1, 0.2]


def test_pareto_budget_no_trial_meets_and_ties():
    trials = [TrialFID("x", "rx", {4: 50.0, 2: float("nan")}), TrialFID("w", "rw", {4: 50.0})]
    table = pareto_table(trials, [1, 4])
    assert table[0].budget == 1 and table[0].fid is None and not table[0].on_front  # nan never wins
    assert table[-1].trial == "w"  # equal FID at equal steps: the first trial by name, deterministically
    assert set(alias_winners(table, BUDGETS)) == {"balanced"}  # no row for budget 8: the alias is not set


# --- space validation --------------------------------------------------------------------------------------

def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


def test_space_errors_name_the_file_and_key(tmp_path):
    ict = load_config(preset_path("fashion-ict"))
    with pytest.raises(ConfigError, match=r"space.yaml: 'objective.pmean' is not a field.*p_mean"):
        load_space(write(tmp_path, "ict:\n  objective.pmean: {uniform: [-1, 0]}\n"), ict)
    with pytest.raises(ConfigError, match=r"'objective.n_start' is not a field .*objective ict"):
        load_space(write(tmp_path, "ict:\n  objective.n_start: {choice: [16]}\n"), ict)  # a multistep field
    with pytest.raises(ConfigError, match=r"'optim' is a section"):
        load_space(write(tmp_path, "all:\n  optim: {choice: [1]}\n"), ict)
    bound = r"(?s)space.yaml: objective.p_std=0.0:.*p_std: Input should be greater than 0"  # the config refuses it
    with pytest.raises(ConfigError, match=bound):
        load_space(write(tmp_path, "ict:\n  objective.p_std: {uniform: [0.0, 2.0]}\n"), ict)
    with pytest.raises(ConfigError, match=r"objective.s0: Value error, give exactly one of"):
        load_space(write(tmp_path, "ict:\n  objective.s0: {choice: [5], randint: [1, 9]}\n"), ict)
    with pytest.raises(ConfigError, match=r"sweep.search"):
        load_space(write(tmp_path, "sweep: {search: grid}\nict:\n  objective.s0: {choice: [5]}\n"), ict)
    with pytest.raises(ConfigError, match=r"no params for objective multistep_ct"):
        load_space(write(tmp_path, "ict:\n  objective.s0: {choice: [5]}\n"), load_config(preset_path("fashion-mct")))


def test_shipped_spaces_load_for_every_fashion_preset():
    for preset in ("fashion-ict", "fashion-mct", "fashion-mcd"):
        cfg = load_config(preset_path(preset))
        for space in ("pseudo_huber", "schedule", "step_budget"):
            assert load_space(space, cfg).params
    huber = load_space("pseudo_huber", load_config(preset_path("fashion-ict")))
    assert huber.scale["objective.huber_c"] == pytest.approx(0.00054 * 32)  # D = 1 x 32 x 32


# --- a real sweep -------------------------------------------------------------------------------------------

def tiny_sets(shards, uri, tmp_path) -> list[str]:
    sets = {
        "data.shards": str(shards),
        "data.test_shards": str(shards),  # the FID reference: tiny, and cached next to the shards
        "network.channels": [8, 16],
        "network.attention": [False, False],
        "network.attention_head_dim": 8,
        "optim.batch_size": 16,
        "optim.total_steps": 10,
        "optim.warmup_steps": 2,
        "engine.cpus_per_worker": 0.5,  # two 2-worker trials fit the 4-CPU test cluster next to Ray Data
        "engine.log_every": 5,
        "engine.storage_path": str(tmp_path / "runs"),
        "eval.every": 10,
        "eval.grid_size": 2,
        "eval.fid_n": 8,
        "eval.fid_n_ref": 16,
        "tracking.uri": uri,
        "tracking.experiment": "sweep-it",
        "tracking.registered_model": "it-sweep",
        "sweep.storage_path": str(tmp_path / "sweeps"),
        "sweep.search": "optuna",
        # ASHA (the space's scheduler) judges each trial at its only report, the final one, which run_trial makes
        # after logging the model: a trial ASHA stops there still reaches the Pareto table (CI once lost one).
    }
    return [f"{k}={json.dumps(v)}" for k, v in sets.items()]


@pytest.mark.integration
def test_two_trial_sweep_registers_the_pareto_winners(ray_cluster, mlflow_server, shards, tmp_path):
    from mlflow.tracking import MlflowClient

    from tune.runner import run_sweep

    sets = tiny_sets(shards, mlflow_server, tmp_path)
    s = run_sweep("fashion-ict", "pseudo_huber", samples=2, overrides=sets, name="it-sweep",
                  output_dir=tmp_path / "out")
    client = MlflowClient(mlflow_server)
    assert not s.errors, s.errors
    assert not s.restored and len(s.trial_metrics) == 2
    for m in s.trial_metrics.values():  # Tune saw the FID reported through the Train V2 callback
        assert m["step"] == 10 and m["fid_best"] == min(m["fid_steps_1"], m["fid_steps_2"])

    # one child run per trial, nested under the parent, with the trial's draw, curves and FIDs
    children = client.search_runs([client.get_run(s.parent_run_id).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{s.parent_run_id}'")
    assert len(children) == 2
    for run in children:
        c, dist = float(run.data.params["objective.huber_c"]), run.data.params["objective.distance"]
        assert dist in ("pseudo_huber", "l2") and 0.1 * 0.01728 <= c <= 10 * 0.01728 + 1e-9
        assert float(run.data.tags["sweep.objective.huber_c"]) == pytest.approx(c / 0.01728, rel=1e-6)
        assert len(client.get_metric_history(run.info.run_id, "loss")) == 2  # steps 5, 10
        assert {"fid_steps_1", "fid_steps_2"} <= set(run.data.metrics)
        assert {f.path for f in client.list_artifacts(run.info.run_id, "images")}  # sample grids

    # the Pareto artifact of the parent, and every alias at the version of the run the table names
    assert {f.path.split("/")[-1] for f in client.list_artifacts(s.parent_run_id, "pareto")} == {
        "pareto.csv", "pareto.md", "pareto.png"}
    local = client.download_artifacts(s.parent_run_id, "pareto/pareto.csv", str(tmp_path))
    rows = {int(r["budget"]): r for r in csv.DictReader(open(local))}
    assert sorted(rows) == [1, 2, 4, 8]
    by_run = {r.info.run_id: r for r in children}
    for alias, budget in BUDGETS.items():
        mv = client.get_model_version_by_alias("it-sweep", alias)
        assert mv.run_id == rows[budget]["run_id"] and mv.run_id in by_run
        best = min(v for k, v in by_run[mv.run_id].data.metrics.items() if k.startswith("fid_steps_")
                   and int(k.rsplit("_", 1)[1]) <= budget)
        assert float(rows[budget]["fid"]) == pytest.approx(best)
        assert float(mv.tags["fid_steps_1"]) == pytest.approx(by_run[mv.run_id].data.metrics["fid_steps_1"],
                                                               abs=1e-3)
    # the lowest 1-step FID wins @fast; an exact tie goes to the lower trial id (tune/pareto.py). Ties are real at
    # this scale: two 10-step models can sample the same 8 uint8 images (CI once failed on a min() without it).
    fastest = min(children, key=lambda r: (r.data.metrics["fid_steps_1"], r.data.tags["fewstep.trial"]))
    assert rows[1]["run_id"] == fastest.info.run_id
    assert all(math.isfinite(float(r["fid"])) for r in rows.values())

    # re-running the same sweep restores it: no trial runs again, no new child run or model version
    versions = {v.version for v in client.search_model_versions("name = 'it-sweep'")}
    again = run_sweep("fashion-ict", "pseudo_huber", samples=2, overrides=sets, name="it-sweep",
                      output_dir=tmp_path / "out")
    assert again.restored and again.parent_run_id == s.parent_run_id
    assert len(client.search_runs([children[0].info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{s.parent_run_id}'")) == 2
    assert {v.version for v in client.search_model_versions("name = 'it-sweep'")} == versions


@pytest.mark.integration
def test_a_trial_that_diverges_after_its_first_checkpoint_is_marked_and_never_ranked(
    ray_cluster, mlflow_server, shards, tmp_path
):
    """A grid of two trials, the second fed NaN losses after its step-5 checkpoint: it ends `diverged` in Tune and
    in MLflow (FAILED, tagged), logs no model, and the Pareto table and aliases name only the finished trial."""
    from mlflow.tracking import MlflowClient

    from fewstep.sweeps import MODEL_TAG
    from tune.runner import run_sweep

    space = write(tmp_path, "sweep: {search: random, scheduler: none}\n"
                            "all:\n  engine.debug.nan_batches: {grid: [[], [6, 7, 8]]}\n")
    sets = tiny_sets(shards, mlflow_server, tmp_path) + [
        "sweep.search=random", "eval.fid_every=5", "tracking.registered_model=it-sweep-div"]
    s = run_sweep("fashion-ict", str(space), samples=1, overrides=sets, name="it-sweep-div",
                  output_dir=tmp_path / "out")
    assert not s.errors, s.errors
    by_status = {m["status"]: m for m in s.trial_metrics.values()}
    assert set(by_status) == {"finished", "diverged"}
    assert by_status["diverged"]["fid_best"] == math.inf and math.isfinite(by_status["finished"]["fid_best"])

    client = MlflowClient(mlflow_server)
    children = client.search_runs([client.get_run(s.parent_run_id).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{s.parent_run_id}'")
    runs = {r.data.tags["fewstep.status"]: r for r in children}
    assert set(runs) == {"finished", "diverged"}
    bad = runs["diverged"]
    assert bad.info.status == "FAILED" and "non-finite losses in a row" in bad.data.tags["fewstep.failure"]
    assert MODEL_TAG not in bad.data.tags and "fid_steps_1" in bad.data.metrics  # it had a checkpoint and a FID
    assert {t.run_id for t in s.published.trials} == {runs["finished"].info.run_id}
    assert {mv.run_id for mv in client.search_model_versions("name = 'it-sweep-div'")} == {
        runs["finished"].info.run_id}
