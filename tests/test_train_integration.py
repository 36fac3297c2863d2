"""The spine, for real: local Ray, 2 workers, DeepSpeed ZeRO-2, an MLflow server with a registry, tar shards
on disk. Tiny net, ~20 steps."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from fewstep.config import load_config
from fewstep.engine import train
from pipelines.presets import preset_path

pytestmark = pytest.mark.integration


def tiny_config(shards, uri, storage, **overrides):
    """The fashion-ict preset shrunk to a ~20-step CPU run (shared by the engine tests)."""
    sets = {
        "data.shards": str(shards),
        "data.test_shards": None,
        "network.channels": [8, 16],
        "network.attention": [False, False],
        "network.attention_head_dim": 8,
        "optim.batch_size": 16,
        "optim.total_steps": 20,
        "optim.warmup_steps": 2,
        "objective.curriculum_steps": 20,
        "objective.s1": 160,  # pinned (not the preset's): test_engine_faults checks N(k) doubling across a resume
        "engine.checkpoint_every": 10,
        "engine.log_every": 1,
        "engine.storage_path": str(storage),
        "eval.every": 10,
        "eval.grid_size": 2,
        "tracking.uri": uri,
        "tracking.experiment": "it",
        "tracking.registered_model": "it-fashion-ict",
        **overrides,
    }
    return load_config(preset_path("fashion-ict"), None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])


def test_train_track_register_and_load_in_fresh_process(ray_cluster, mlflow_server, shards, tmp_path):
    cfg = tiny_config(shards, mlflow_server, tmp_path / "runs")
    assert cfg.engine.num_workers == 2 and cfg.engine.zero_stage == 2
    s = train(cfg, run_name="it-spine", output_dir=tmp_path / "out")
    assert s.steps == 20 and s.samples_png.is_file()

    client = MlflowClient(mlflow_server)
    run = client.get_run(s.run_id)
    assert run.data.params["objective.name"] == "ict"
    loss = client.get_metric_history(s.run_id, "loss")
    assert sorted(m.step for m in loss) == list(range(1, 21))
    assert all(math.isfinite(m.value) for m in loss)
    assert {m.value for m in client.get_metric_history(s.run_id, "n_levels")} <= {11.0, 21.0, 41.0, 81.0, 161.0}
    artifacts = {f.path for f in client.list_artifacts(s.run_id)}
    assert "config.yaml" in artifacts and "samples" in artifacts
    assert any("samples_1step" in f.path for f in client.list_artifacts(s.run_id, "images"))

    mv = client.get_model_version_by_alias("it-fashion-ict", "champion")
    assert mv.version == s.version and mv.run_id == s.run_id
    code = (
        "import mlflow, pandas as pd\n"
        "m = mlflow.pyfunc.load_model('models:/it-fashion-ict@champion')\n"
        "x = m.predict(pd.DataFrame({'class_label': [0, 3, 9]}), params={'num_steps': 2, 'seed': 1})\n"
        "print(x.shape, x.dtype)\n"
        "try:\n    m.predict(pd.DataFrame({'class_label': [0]}), params={'num_steps': 3})\n"
        "except Exception as e:\n    print('REFUSED', 'num_steps=3' in str(e))\n"
    )
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(3, 32, 32, 1) uint8" in out.stdout
    assert "REFUSED True" in out.stdout

    # FID by step count lands on the model version (tags) and its run (metrics + plot)
    from fewstep.evaluation import evaluate

    ev = evaluate("models:/it-fashion-ict@champion", [1, 2], n=10, reference_shards=str(shards), n_ref=10, seeds=1,
                  progress=False)
    assert set(ev.fid) == {1, 2} and all(math.isfinite(v) and v > 0 for v in ev.fid.values())
    assert client.get_metric_history(s.run_id, "fid_steps_2")[0].value == pytest.approx(ev.fid[2])
    tags = client.get_model_version("it-fashion-ict", mv.version).tags
    assert tags["fid_steps_1"] == f"{ev.fid[1]:.2f} ± 0.00"
    assert tags["fid_reference_sha256"] == ev.table.reference["sha256"] and tags["fid_reference_n"] == "10"
    assert "fid_vs_steps.png" in {f.path.split("/")[-1] for f in client.list_artifacts(s.run_id, "evaluation")}
    assert (shards / "fid_stats_10_32px.npz").is_file()  # reference statistics cached next to the shards
    assert (shards / "fid_stats_10_32px.json").is_file()  # with the sha256 of their images


def test_diffusion_teacher_then_multistep_cd_distils_its_registered_model(ray_cluster, mlflow_server, shards, tmp_path):
    """The S = infinity end trains and registers like any model (with a tiny in-training FID); its registered
    version is then the frozen teacher of multistep CD, whose student starts from the teacher's weights."""
    import mlflow
    import numpy as np
    import pandas as pd
    import torch

    from fewstep.config import ConfigError
    from fewstep.evaluation import evaluate
    from fewstep.generator import Generator

    client = MlflowClient(mlflow_server)
    teacher_cfg = tiny_config(
        shards,
        mlflow_server,
        tmp_path / "runs",
        **{
            "objective": {"name": "diffusion", "distance": "l2_squared"},
            "data.test_shards": str(shards),
            "optim.total_steps": 4,
            "engine.checkpoint_every": 4,
            "eval.every": 4,
            "eval.steps": [2],
            "eval.fid_every": 4,  # one FID at the end, 4 samples vs 4 held-out images: Inception on CPU is slow
            "eval.fid_n": 4,
            "eval.fid_n_ref": 4,
            "tracking.registered_model": "it-fashion-diffusion",
        },
    )
    t = train(teacher_cfg, run_name="it-diffusion", output_dir=tmp_path / "out")
    assert t.steps == 4
    fid = client.get_metric_history(t.run_id, "fid_steps_2")
    assert [m.step for m in fid] == [4] and math.isfinite(fid[0].value) and fid[0].value > 0
    tags = client.get_run(t.run_id).data.tags  # the in-training FID names its reference
    assert len(tags["fid_train_reference_sha256"]) == 64 and tags["fid_train_reference_n"] == "4"
    assert (shards / "fid_stats_4_32px.npz").is_file()

    # serving: any step count, sampler ddim (default) or addim, a clear error for anything else
    model = mlflow.pyfunc.load_model("models:/it-fashion-diffusion@champion")
    frame = pd.DataFrame({"class_label": [1, 7]})
    ddim = model.predict(frame, params={"num_steps": 3, "seed": 0})
    assert ddim.shape == (2, 32, 32, 1)
    assert np.array_equal(ddim, model.predict(frame, params={"num_steps": 3, "seed": 0, "sampler": "ddim"}))
    assert not np.array_equal(ddim, model.predict(frame, params={"num_steps": 3, "seed": 0, "sampler": "addim"}))
    with pytest.raises(Exception, match=r"sampler='ict' is not available for this diffusion model"):
        model.predict(frame, params={"num_steps": 3, "sampler": "ict"})
    # a diffusion model's served default is its largest eval step count (eval.steps), not 1
    assert np.array_equal(model.predict(frame, params={"seed": 0}), model.predict(frame, params={"num_steps": 2}))
    ev = evaluate("models:/it-fashion-diffusion@champion", [2], n=4, reference_shards=str(shards), n_ref=4,
                  sampler="addim", seeds=1, progress=False)
    assert client.get_metric_history(t.run_id, "fid_steps_2_addim")[0].value == pytest.approx(ev.fid[2])

    # a student whose network differs cannot start from the teacher: refused before any run or worker exists
    cd = {"name": "multistep_cd", "teacher": "models:/it-fashion-diffusion@champion", "student_steps": 2,
          "n_start": 8, "n_end": 16, "anneal_steps": 4}
    bad = tiny_config(shards, mlflow_server, tmp_path / "runs",
                      **{"objective": cd, "network.channels": [8, 8], "eval.steps": [2]})
    with pytest.raises(ConfigError, match=r"objective.init_from='teacher' has another network: network.channels"):
        train(bad, run_name="it-mcd-bad")

    # multistep CD; lr ~ 0 so that the exported student must still be the teacher it started from
    student_cfg = tiny_config(
        shards,
        mlflow_server,
        tmp_path / "runs",
        **{
            "objective": cd,
            "optim.total_steps": 4,
            "optim.lr": 1e-12,
            "engine.checkpoint_every": 4,
            "eval.every": 4,
            "eval.steps": [2],
            "tracking.registered_model": "it-fashion-mcd",
        },
    )
    s = train(student_cfg, run_name="it-mcd", output_dir=tmp_path / "out")
    assert s.steps == 4
    teacher_version = client.get_model_version_by_alias("it-fashion-diffusion", "champion").version
    assert client.get_run(s.run_id).data.tags["fewstep.teacher"] == f"models:/it-fashion-diffusion/{teacher_version}"
    loss = client.get_metric_history(s.run_id, "loss")
    assert sorted(m.step for m in loss) == [1, 2, 3, 4] and all(math.isfinite(m.value) and m.value > 0 for m in loss)
    # N_teacher(i) = 8 * 2^(i/4), i = 0..3 -> N_seg = round(N / 2) = 4, 5, 6, 7 -> T = 8, 10, 12, 14
    assert {m.value for m in client.get_metric_history(s.run_id, "n_teacher")} == {8.0, 10.0, 12.0, 14.0}
    student = Generator.from_dir(client.download_artifacts(s.run_id, "model/artifacts/model", str(tmp_path / "s")))
    teacher = Generator.from_dir(client.download_artifacts(t.run_id, "model/artifacts/model", str(tmp_path / "t")))
    for (k, a), b in zip(student.model.state_dict().items(), teacher.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)
    student_model = mlflow.pyfunc.load_model("models:/it-fashion-mcd@champion")
    assert student_model.predict(frame).shape == (2, 32, 32, 1)  # default num_steps = S = 2
    with pytest.raises(Exception, match=r"num_steps=3 is not available .*student_steps = 2"):
        student_model.predict(frame, params={"num_steps": 3})
