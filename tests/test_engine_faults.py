"""The engine under fire, for real (local Ray, 2 DeepSpeed workers, an MLflow server, tar shards): non-finite
losses, a SIGKILLed worker, and exact resume. Faults are injected with the test-only `engine.debug` hooks."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from test_train_integration import tiny_config

from fewstep.engine import train
from fewstep.faults import DivergenceError
from fewstep.generator import STUDENT_WEIGHTS, WEIGHTS
from fewstep.tracking import RUN_NAME_TAG

pytestmark = pytest.mark.integration


def steps_of(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def checkpointed_steps(storage: Path, run_name: str) -> list[int]:
    states = (storage / run_name).glob("checkpoint_*/trainer_state.json")
    return sorted(json.loads(p.read_text())["step"] for p in states)


def test_divergence_guard_skips_then_stops_and_keeps_the_last_good_checkpoint(
    ray_cluster, mlflow_server, shards, tmp_path
):
    storage = tmp_path / "runs"
    sets = {
        "optim.total_steps": 8,
        "engine.checkpoint_every": 2,
        "engine.keep_checkpoints": 3,
        "engine.max_bad_steps": 3,
        "eval.every": 100,
        "tracking.registered_model": None,
    }
    # micro-batch 2 is NaN on rank 0 only (skipped by both ranks); 6, 7, 8 are three in a row at step 5
    bad = tiny_config(shards, mlflow_server, storage, **sets, **{"engine.debug": {"nan_batches": [2, 6, 7, 8]}})
    with pytest.raises(DivergenceError) as err:
        train(bad, run_name="it-diverge", output_dir=tmp_path / "out")
    msg = str(err.value)
    assert "diverged at step 5" in msg and "engine.max_bad_steps=3" in msg and "checkpoint is step 4" in msg
    assert str(storage / "it-diverge") in msg
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("it").experiment_id],
                                f"tags.`{RUN_NAME_TAG}` = 'it-diverge'")
    assert run.info.status == "FAILED"
    assert steps_of(mlflow_server, run.info.run_id, "loss") == [1, 2, 3, 4]  # step 5 never happened
    skipped = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "skipped_steps")}
    assert skipped[1] == 0 and skipped[2] == 1 and skipped[4] == 1
    assert checkpointed_steps(storage, "it-diverge") == [2, 4]  # nothing saved after the divergence

    # the cause removed, the same run name resumes from the last good checkpoint and finishes
    s = train(tiny_config(shards, mlflow_server, storage, **sets), run_name="it-diverge", output_dir=tmp_path / "out")
    assert s.run_id == run.info.run_id and s.steps == 8
    assert client.get_run(s.run_id).info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(s.run_id, "resumed_from_step")] == [4.0]
    assert steps_of(mlflow_server, s.run_id, "loss") == list(range(1, 9))
    assert client.get_metric_history(s.run_id, "skipped_steps")[-1].value == 1  # counted across the restart


def test_killed_worker_restores_from_checkpoint_and_logs_every_step_once(
    ray_cluster, mlflow_server, shards, tmp_path
):
    """kill -9 of rank 1 after step 12 (checkpoint at 10): Ray Train restarts both workers from step 10; the
    replayed steps 11-12 are not logged again, so the loss curve has steps 1..20 exactly once."""
    storage = tmp_path / "runs"
    cfg = tiny_config(
        shards, mlflow_server, storage,
        **{
            "engine.checkpoint_every": 5,
            "engine.max_failures": 1,
            "engine.debug": {"kill_step": 12, "kill_rank": 1, "nan_batches": [3]},
            "eval.every": 100,
            "tracking.registered_model": None,
        },
    )
    s = train(cfg, run_name="it-kill", output_dir=tmp_path / "out")
    assert s.steps == 20
    assert (storage / f".debug-killed-{s.run_id}").read_text() == "12"  # the kill happened
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("it").experiment_id], f"tags.`{RUN_NAME_TAG}` = 'it-kill'")
    assert [r.info.run_id for r in runs] == [s.run_id]  # one MLflow run
    assert [m.value for m in client.get_metric_history(s.run_id, "resumed_from_step")] == [10.0]
    loss = client.get_metric_history(s.run_id, "loss")
    assert sorted(m.step for m in loss) == list(range(1, 21))  # no step missing, none twice
    assert max(checkpointed_steps(storage, "it-kill")) == 20


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    """A single 64-image shard: with 1 worker, batch 16 and no shuffle buffer every epoch is the same 4
    batches in the same order, so a restarted data stream (which begins at epoch 0 again) matches."""
    from fewstep.data.shards import write_shards
    from fewstep.data.sources import fashion_mnist

    out = tmp_path_factory.mktemp("one_shard")
    write_shards(itertools.islice(fashion_mnist("test"), 64), out / "train", samples_per_shard=64)
    return out / "train"


def test_stopped_run_resumes_and_matches_a_straight_run_bitwise(ray_cluster, mlflow_server, one_shard, tmp_path):
    """8 steps straight vs 4 + restart + 4. The restarted job continues the same MLflow run from step 5 (same
    step counter and N(k)); the checkpoint restores weights, RAdam state, LR schedule, EMA, step (curriculum
    position), the data position and the rank's RNG; the data order is the same by construction (one_shard).
    Expected bitwise: 1 worker and 1 thread run the same CPU kernels in the same order, and no collective
    reorders a sum (with 2+ workers ZeRO's reductions are still deterministic, but Ray Data's split is not)."""
    import ray.data

    sets = {
        "data.shuffle_buffer": 0,
        "engine.num_workers": 1,
        "optim.total_steps": 8,
        "optim.decay_fraction": 0.0,  # the stop below shortens total_steps: a decaying lr would differ from step 1
        "engine.checkpoint_every": 4,
        "eval.every": 4,
        "tracking.registered_model": None,
    }
    ctx = ray.data.DataContext.get_current()
    old = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        straight = train(tiny_config(one_shard, mlflow_server, tmp_path / "a", **sets), "it-straight", tmp_path)
        half = {**sets, "optim.total_steps": 4}
        first = train(tiny_config(one_shard, mlflow_server, tmp_path / "b", **half), "it-halves", tmp_path)
        # the stopped run's checkpoint carries the data position (shard-level resume, fewstep.data.stream)
        state = json.loads(max((tmp_path / "b" / "it-halves").glob("checkpoint_*/trainer_state.json")).read_text())
        assert state["step"] == 4 and state["data"]["num_shards"] == 1 and len(state["data"]["ranks"]) == 1
        resumed = train(tiny_config(one_shard, mlflow_server, tmp_path / "b", **sets), "it-halves", tmp_path)
    finally:
        ctx.execution_options.preserve_order = old
    assert first.steps == 4 and straight.steps == resumed.steps == 8
    assert resumed.run_id == first.run_id  # the same MLflow run continues
    assert steps_of(mlflow_server, resumed.run_id, "loss") == list(range(1, 9))  # no step repeated or lost
    levels = {m.step: m.value for m in MlflowClient(mlflow_server).get_metric_history(resumed.run_id, "n_levels")}
    # curriculum_steps=20, s0=10, s1=160 -> K' = 4: N(k) doubles every 4 steps, continuing across the restart
    assert (levels[4], levels[5], levels[8]) == (11.0, 21.0, 21.0)
    for name in (STUDENT_WEIGHTS, WEIGHTS):  # the trained weights, and the EMA
        a = load_file(str(tmp_path / "it-straight" / "model" / name))
        b = load_file(str(tmp_path / "it-halves" / "model" / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    la = MlflowClient(mlflow_server).get_metric_history(straight.run_id, "loss")
    lb = MlflowClient(mlflow_server).get_metric_history(resumed.run_id, "loss")
    assert [m.value for m in sorted(la, key=lambda m: m.step)] == [m.value for m in sorted(lb, key=lambda m: m.step)]
