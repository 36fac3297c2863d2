"""Registry consumption as a user would: `mlflow models serve -m models:/NAME@ALIAS` answers real HTTP requests
with base64 PNGs and refuses bad ones with a 400 and a clear message; pyfunc and pipelines.sample load the same
URI. The model is a tiny untrained generator registered through fewstep's own export path (serving does not
depend on what the weights learned)."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, free_port, wait_until_up
from PIL import Image

pytestmark = pytest.mark.integration
MODEL = "it-serve"


@pytest.fixture(scope="module")
def registered(mlflow_server, tmp_path_factory):
    """models:/it-serve@quality: a tiny class-conditional iCT generator (random weights), logged from code, at most
    4 images per request."""
    from fewstep.config import load_config
    from fewstep.generator import Generator
    from fewstep.objectives import build_model
    from fewstep.tracking import log_and_register, start_or_resume_run
    from pipelines.presets import preset_path

    sets = ["network.channels=[8, 16]", "network.attention=[false, false]", "network.attention_head_dim=8",
            "serving.max_images=4",
            f"tracking.uri={mlflow_server}", "tracking.experiment=serve", f"tracking.registered_model={MODEL}",
            "tracking.alias=quality"]
    cfg = load_config(preset_path("fashion-ict"), None, sets)
    model_dir = Generator(build_model(cfg), cfg).save(tmp_path_factory.mktemp("serve") / "model")
    run_id = start_or_resume_run(cfg, "it-serve", mlflow_server)
    name, version = log_and_register(run_id, model_dir, cfg, mlflow_server)
    return f"models:/{name}@quality"


@pytest.fixture(scope="module")
def server(registered, mlflow_server, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    # MLflow execs `uvicorn` by name: the venv's bin must be on PATH even when the venv is not activated
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "PATH": path}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", registered, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/ping", proc, log, timeout=180, what="mlflow models serve")
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)  # its own session: the uvicorn worker goes with it
            proc.wait(timeout=30)


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_rest_answers_with_pngs_and_refuses_bad_requests(server):
    status, out = post(server, {"dataframe_split": {"columns": ["class_label"], "data": [[0], [7], [9]]},
                                "params": {"num_steps": 2, "seed": 3}})
    assert status == 200, out
    images = [Image.open(io.BytesIO(base64.b64decode(s))) for s in out["predictions"]]
    assert [(im.format, im.size, im.mode) for im in images] == [("PNG", (32, 32), "L")] * 3
    again = post(server, {"inputs": {"class_label": [0, 7, 9]}, "params": {"num_steps": 2, "seed": 3}})[1]
    assert again["predictions"] == out["predictions"]  # same seed, same images, either input format

    bad = {
        "class_label 12 is out of range": {"dataframe_split": {"columns": ["class_label"], "data": [[12]]}},
        "num_steps=0 is out of range": {"inputs": {"class_label": [1]}, "params": {"num_steps": 0}},
        "num_steps=3 is not available": {"inputs": {"class_label": [1]}, "params": {"num_steps": 3}},
        "prompt is 10000000 characters long": {"inputs": {"class_label": [1], "prompt": ["x" * 10_000_000]}},
        "conditioned on class labels, not text": {"inputs": {"class_label": [1], "prompt": ["a red dress"]}},
        # the model's serving.max_images (4 here, 256 by default) caps the images of one request
        "asks for 5 images; at most serving.max_images=4": {"inputs": {"class_label": [0, 1, 2, 3, 4]}},
        "class_label": {"dataframe_split": {"columns": ["class_label"], "data": [[3.7]]}},  # not truncated to 3
    }
    for message, body in bad.items():
        status, err = post(server, body)
        assert status == 400, (message, status, err)
        assert message in err["message"] and err["error_code"] == "INVALID_PARAMETER_VALUE", err
    status, err = post(server, {"inputs": {"class_label": ["x"]}})
    assert status == 400 and "class_label" in err["message"], err
    status, out = post(server, {"inputs": {"class_label": [1, 2, 3, 4]}, "params": {"num_steps": 1}})  # at the limit
    assert status == 200 and len(out["predictions"]) == 4, out


def test_pyfunc_and_sample_cli_load_the_alias(registered, mlflow_server, tmp_path):
    import mlflow

    model = mlflow.pyfunc.load_model(registered)
    assert model.metadata.metadata["max_images"] == 4  # the registry shows the request limit
    images = model.predict(pd.DataFrame({"class_label": [7, 7, 9]}), params={"num_steps": 2, "seed": 0})
    assert images.shape == (3, 32, 32, 1) and images.dtype == np.uint8  # arrays in Python, PNGs over REST
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    out = subprocess.run([sys.executable, "-m", "pipelines.sample", "--model", registered, "--steps", "1,2",
                          "--n", "4", "--out", str(tmp_path / "grid.png")], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # 2 rows (steps) x 4, each 32x32 sample upscaled 4x (nearest) to a 128 px cell, 2 px padding
    assert Image.open(tmp_path / "grid.png").size == (4 * 130 + 2, 2 * 130 + 2)
