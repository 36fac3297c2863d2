"""Shared fixtures: a real local Ray cluster and a real MLflow tracking server (no mocks)."""

from __future__ import annotations

import itertools
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


# The S3-compatible test server (moto, tests/test_data_storage.py) listens here. Ray tasks resolve the endpoint
# and the (fake) credentials from their environment exactly as on AWS, so the session cluster carries them.
S3_PORT = free_port()
S3_ENV = {
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
    "AWS_ACCESS_KEY_ID": "fewstep-test",
    "AWS_SECRET_ACCESS_KEY": "fewstep-test",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="session")
def s3_env() -> dict[str, str]:
    """The S3 test server's endpoint and credentials (a fixture: importing conftest again would pick a new port)."""
    return dict(S3_ENV)


def worker_env() -> dict[str, str]:
    """What Ray workers need to import this checkout's fewstep (and not an installed copy)."""
    return {
        "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), str(REPO)]),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"],
        **S3_ENV,
    }


def start_local_ray() -> None:
    """A fresh local cluster of the test's own, even if `make up` runs one, as the library starts one (token auth,
    127.0.0.1 only). 4 logical CPUs on a 2-core box: 2 training workers reserve 1 each and Ray Data keeps a budget
    (STACK.md: otherwise the read task waits forever)."""
    from fewstep.cluster import start_local

    start_local(
        num_cpus=4,
        object_store_memory=512 * 1024**2,
        include_dashboard=False,
        runtime_env={"env_vars": worker_env()},
        log_to_driver=True,
    )


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (modules with clusters of their own restart it)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    start_local_ray()
    yield ray
    ray.shutdown()


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    """Poll `url` until it answers; a process that exits or a timeout raises with the tail of its log."""
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{what} did not start: {log.read_text()[-3000:]}") from None
            time.sleep(0.5)


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
        # MLflow 3's job runner adds ~7 polling huey consumers (~0.4 of a core on this box); fewstep needs none
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{uri}/health", proc, root / "server.log", timeout=90, what="mlflow server")
    except RuntimeError:
        proc.kill()
        raise
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """256 Fashion-MNIST test images as 4 real tar shards of 64."""
    from fewstep.data.shards import write_shards
    from fewstep.data.sources import fashion_mnist

    out = tmp_path_factory.mktemp("shards")
    write_shards(itertools.islice(fashion_mnist("test"), 256), out / "train", samples_per_shard=64)
    return out / "train"
