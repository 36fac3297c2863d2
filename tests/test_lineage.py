"""From a diffusion model to few steps, for real: a tiny `edm` model is trained and registered, then `ect` starts
from it through Ray Train, DeepSpeed ZeRO-2 and the MLflow registry, and the student records its parent. A
mismatched `init_from` is refused on the driver, naming the field, before any run exists."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import worker_env
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from test_train_integration import tiny_config

from fewstep import lineage
from fewstep.config import ConfigError
from fewstep.engine import train
from fewstep.generator import Generator
from fewstep.objectives import build_model

pytestmark = pytest.mark.integration


def config(shards, uri, storage, name, **sets):
    base = {"objective": {"name": name}, "network.noise_embedding_scale": 250, "tracking.experiment": "it-lineage",
            "tracking.registered_model": f"it-{name}", "eval.steps": [1], "optim.total_steps": 10,
            "engine.checkpoint_every": 10}
    return tiny_config(shards, uri, storage, **{**base, **sets})


def test_edm_registered_then_ect_starts_from_it_and_records_its_parent(ray_cluster, mlflow_server, shards, tmp_path):
    client = MlflowClient(mlflow_server)
    edm = config(shards, mlflow_server, tmp_path / "runs", "edm", **{"engine.backend": "local",
                                                                      "engine.num_workers": 1})
    parent = train(edm, run_name="it-edm", output_dir=tmp_path / "out")
    assert parent.registered_model == "it-edm" and parent.steps == 10

    # a student whose network or family does not fit is refused before its run exists
    runs_before = len(client.search_runs([client.get_experiment_by_name("it-lineage").experiment_id]))
    wrong_net = config(shards, mlflow_server, tmp_path / "runs", "ect", **{
        "objective": {"name": "ect", "init_from": "models:/it-edm@champion"}, "network.channels": [8, 8]})
    with pytest.raises(ConfigError, match=r"objective.init_from='models:/it-edm@champion' has another network: "
                                          r"network.channels=\[8, 8\] \(parent: \[8, 16\]\)"):
        train(wrong_net, run_name="it-ect-bad-net")
    vp = config(shards, mlflow_server, tmp_path / "runs", "diffusion")
    Generator(build_model(vp), vp).save(tmp_path / "vp-model")
    wrong_family = config(shards, mlflow_server, tmp_path / "runs", "ect", **{
        "objective": {"name": "ect", "init_from": str(tmp_path / "vp-model")}})
    with pytest.raises(ConfigError, match=r"objective.init_from=.* is a diffusion model \(VP family\): objective.name="
                                          r"ect is VE"):
        train(wrong_family, run_name="it-ect-bad-family")
    assert len(client.search_runs([client.get_experiment_by_name("it-lineage").experiment_id])) == runs_before

    # ECT from the registered EDM model on 2 Ray Train workers (ZeRO-2); lr ~ 0 keeps the student at its start
    student = config(shards, mlflow_server, tmp_path / "runs", "ect", **{
        "objective": {"name": "ect", "init_from": "models:/it-edm@champion"}, "optim.lr": 1e-12})
    s = train(student, run_name="it-ect", output_dir=tmp_path / "out")
    assert s.steps == 10 and student.engine.num_workers == 2 and student.engine.zero_stage == 2
    run = client.get_run(s.run_id)
    assert run.data.tags[lineage.PARENT_TAG] == f"models:/it-edm/{parent.version}"
    assert run.data.tags[lineage.PARENT_RUN_TAG] == parent.run_id
    version = client.get_model_version("it-ect", s.version)
    assert version.tags[lineage.PARENT_TAG] == f"models:/it-edm/{parent.version}"
    assert lineage.describe(client, "it-ect", s.version) == [f"models:/it-ect/{s.version}",
                                                             f"models:/it-edm/{parent.version}"]
    # the student's weights are the parent's EMA weights it started from
    mine = load_file(str(tmp_path / "out" / "it-ect" / "model" / "student.safetensors"))
    theirs = load_file(str(tmp_path / "out" / "it-edm" / "model" / "weights.safetensors"))
    assert mine.keys() == theirs.keys()
    for k in theirs:
        torch.testing.assert_close(mine[k], theirs[k], atol=1e-6, rtol=0, msg=k)
    # a user sampling the student sees where it came from
    out = subprocess.run([sys.executable, "-m", "pipelines.sample", "--model", "models:/it-ect@champion", "--steps",
                          "1,2", "--n", "2", "--out", str(tmp_path / "grid.png"), "--tracking-uri", mlflow_server],
                         capture_output=True, text=True, timeout=300, env={**os.environ, **worker_env()})
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"lineage: models:/it-ect/{s.version} <- models:/it-edm/{parent.version}" in out.stdout
