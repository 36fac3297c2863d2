"""pipelines.posthoc_ema end to end: a tiny ema.mode=posthoc run on the local backend (stopped at step 10 and resumed
to 20), logged to a real MLflow server; the CLI reconstructs EMA lengths from its snapshots, evaluates them with
the real Inception FID and registers @best-<k>step, which loads from the registry and generates."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.integration


def config(shards, uri, tmp_path, total_steps):
    from fewstep.config import load_config
    from pipelines.presets import preset_path

    sets = {
        "data.shards": str(shards), "data.test_shards": str(shards),
        "network.channels": [8, 16], "network.attention": [False, False], "network.attention_head_dim": 8,
        "optim.batch_size": 8, "optim.total_steps": total_steps, "optim.warmup_steps": 2, "optim.lr": 2e-3,
        "objective.curriculum_steps": 20,
        "engine.backend": "local", "engine.num_workers": 1, "engine.checkpoint_every": 10, "engine.log_every": 10,
        "engine.storage_path": str(tmp_path / "runs"),
        "ema.mode": "posthoc", "ema.sigma_rels": [0.05, 0.15], "ema.snapshot_every": 4,
        "eval.every": 20, "eval.grid_size": 2, "eval.steps": [1],
        "tracking.uri": uri, "tracking.experiment": "posthoc-it", "tracking.registered_model": "it-posthoc",
    }
    return load_config(preset_path("fashion-ict"), None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])


def test_posthoc_cli_registers_best_ema_per_step_budget(mlflow_server, shards, tmp_path, capsys):
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from fewstep.engine import run
    from fewstep.generator import Generator
    from fewstep.posthoc_ema import reconstruct
    from fewstep.posthoc_select import latest_checkpoint
    from fewstep.teacher import model_dir
    from pipelines.posthoc_ema import main

    assert run(config(shards, mlflow_server, tmp_path, 10), "ph").status == "finished"
    cfg = config(shards, mlflow_server, tmp_path, 20)
    r = run(cfg, "ph")  # resumes from step 10 in the same MLflow run
    assert r.status == "finished" and r.metrics["step"] == 20
    ckpt = latest_checkpoint(cfg, "ph")
    assert ckpt == r.checkpoint
    names = sorted(p.name for p in (ckpt / "posthoc_ema" / "snapshots").iterdir())
    assert [int(n.split("_")[1]) for n in names[::2]] == [4, 8, 10, 12, 16, 20]  # 10: the stopped run's end

    rc = main(["--run", "ph", "--sigma-rel", "0.05,0.15", "--steps", "1,2", "--n", "8", "--n-ref", "16",
               "--reference", str(shards), "--output-dir", str(tmp_path / "out"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0, out
    client = MlflowClient(mlflow_server)
    assert {f.path.split("/")[-1] for f in client.list_artifacts(r.run_id, "posthoc_ema")} == {
        "posthoc_ema.md", "posthoc_ema.csv", "posthoc_ema.png"}
    metrics = client.get_run(r.run_id).data.metrics
    for k in (1, 2):
        mv = client.get_model_version_by_alias("it-posthoc", f"best-{k}step")
        sigma = float(mv.tags["posthoc.sigma_rel"])
        assert mv.run_id == r.run_id and sigma in (0.05, 0.15)
        assert metrics[f"posthoc_sigma_rel_steps_{k}"] == pytest.approx(sigma)
        assert float(mv.tags[f"fid_steps_{k}"]) == pytest.approx(metrics[f"posthoc_fid_steps_{k}"], abs=1e-3)
        assert f"models:/it-posthoc@best-{k}step -> version {mv.version}" in out

    # @best-1step through fewstep's loader: its weights are the reconstruction, and it generates
    mv = client.get_model_version_by_alias("it-posthoc", "best-1step")
    from fewstep.ema import checkpoint_snapshots

    expected, _ = reconstruct(checkpoint_snapshots(ckpt), float(mv.tags["posthoc.sigma_rel"]))
    path = model_dir("models:/it-posthoc@best-1step", mlflow_server, tmp_path / "dl")
    got = load_file(str(path / "weights.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    served = load_file(str(ckpt / "model" / "weights.safetensors"))  # the run's export: the tracked 0.05 EMA
    tracked, _ = reconstruct(checkpoint_snapshots(ckpt), 0.05)
    assert max(float((served[k] - v).abs().max()) for k, v in tracked.items()) < 1e-5
    gen = Generator.from_dir(path)
    images = gen.generate(4, num_steps=1, labels=[0, 1, 2, 3])
    assert images.shape == (4, 32, 32, 1) and images.std() > 0
    import mlflow  # ... and as the pyfunc model `mlflow models serve` loads (MLFLOW_TRACKING_URI: the server)
    import pandas as pd

    served_images = mlflow.pyfunc.load_model("models:/it-posthoc@best-1step").predict(
        pd.DataFrame({"class_label": [0, 1, 2, 3]}), params={"num_steps": 1, "seed": 0})
    assert served_images.shape == (4, 32, 32, 1) and served_images.std() > 0

    # what a sweep with sweep.rank=posthoc reads from a trial's run, and registers for a winning budget
    from tune.publish import register, trial_fid

    t = trial_fid(client.get_run(r.run_id), "posthoc")
    assert t.fid == {k: metrics[f"posthoc_fid_steps_{k}"] for k in (1, 2)} and set(t.ema) == {1, 2}
    version = register(client, "it-posthoc-sweep", t, "sweep", t.ema[1])
    assert register(client, "it-posthoc-sweep", t, "sweep", t.ema[1]) == version  # one version per run and length
    path = model_dir(f"models:/it-posthoc-sweep/{version}", mlflow_server, tmp_path / "dl-sweep")
    assert all(torch.equal(load_file(str(path / "weights.safetensors"))[k], v) for k, v in expected.items())

    # a run of the classic EMA is refused with a clear error (before any checkpoint or FID is looked at)
    from fewstep.tracking import start_or_resume_run

    classic = config(shards, mlflow_server, tmp_path, 2).model_copy(deep=True)
    classic.ema.mode = "classic"
    start_or_resume_run(classic, "classic", mlflow_server)
    assert main(["--run", "classic", "--reference", str(shards)]) == 2
    assert "ema.mode=classic" in capsys.readouterr().err
