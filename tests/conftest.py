"""Shared fixtures: a real local Ray cluster and a real MLflow tracking server (no mocks)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Stable DeepSpeed op cache across tests and runs (its first JIT build takes ~50 s).
# MLflow 3's telemetry thread rewrites os.environ while requests iterates it (KeyError races); no network here.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "fewstep-torch-extensions"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session. 4 logical CPUs on a 2-core box: 2 training workers
    reserve 1 each and Ray Data keeps a budget (STACK.md: otherwise the read task waits forever)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    env = {
        "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), str(REPO)]),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"],
    }
    ray.init(
        address="local",  # always a fresh cluster of the test's own, even if `make up` runs one
        num_cpus=4,
        object_store_memory=512 * 1024**2,
        include_dashboard=False,
        runtime_env={"env_vars": env},
        log_to_driver=True,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a sqlite backend (the registry needs a database)."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT,
        # MLflow 3.17's server also starts a job runner (7 huey consumer processes, ~50 threads) by default;
        # fewstep submits no server-side jobs, and on a 2-core box they only steal CPU from the tests.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                log = (root / "server.log").read_text()[-2000:]
                raise RuntimeError(f"mlflow server did not start: {log}") from None
            time.sleep(0.5)
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old
    proc.terminate()
    proc.wait(timeout=30)
