"""Node and driver failures on a simulated multi-node Ray cluster of this module's own (`ray.cluster_utils.
Cluster`): a head that trains nothing (0 CPUs: driver, Train controller) and two worker nodes on this box.
Steps are slowed down (test-only `engine.debug.step_sleep_s`) so the test can act mid-run."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from conftest import REPO, free_port, start_local_ray, worker_env
from mlflow.tracking import MlflowClient
from test_train_integration import tiny_config

from fewstep.config import to_yaml
from fewstep.engine import train
from fewstep.tracking import RUN_NAME_TAG

pytestmark = pytest.mark.integration

SLOW = {
    "engine.checkpoint_every": 5,
    "engine.max_failures": 2,
    "engine.debug": {"step_sleep_s": 0.5},  # 20 steps take >= 10 s
    "eval.every": 100,
    "tracking.registered_model": None,
}


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    restart_session_cluster = ray.is_initialized()
    ray.shutdown()
    old_env = {k: os.environ.get(k) for k in worker_env()}
    os.environ.update(worker_env())  # node processes (and the workers they spawn) inherit it
    # the head's dashboard (the state API below) on a port of its own: `make up` may hold 8265
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 200 * 1024**2,
                                                     "dashboard_port": free_port()})
    # 3 CPUs a node: both training workers fit on either node (1 CPU each), plus a Ray Data budget
    nodes = [c.add_node(num_cpus=3, object_store_memory=200 * 1024**2) for _ in range(2)]
    ray.init(address=c.address, runtime_env={"env_vars": worker_env()}, log_to_driver=True)
    yield c, nodes
    ray.shutdown()
    c.shutdown()
    for k, v in old_env.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    if restart_session_cluster:
        start_local_ray()


def wait_for_step(uri: str, run_name: str, step: int, timeout: float = 300) -> str:
    """Poll MLflow until the run named `run_name` has logged `loss` at `step`; return its run id."""
    client = MlflowClient(uri)
    deadline = time.time() + timeout
    while time.time() < deadline:
        exp = client.get_experiment_by_name("it")
        runs = client.search_runs([exp.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{run_name}'") if exp else []
        if runs and any(m.step >= step for m in client.get_metric_history(runs[0].info.run_id, "loss")):
            return runs[0].info.run_id
        time.sleep(0.2)
    raise TimeoutError(f"run {run_name} did not reach step {step} in {timeout} s")


def training_worker_nodes(address: str) -> set[str]:
    """Node ids hosting live Ray Train workers (state API of this cluster: other Ray instances run here)."""
    from ray.util.state import list_actors

    alive = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    actors = list_actors(address=address, filters=alive)
    return {a.node_id for a in actors}


def assert_each_step_once_and_resumed(uri: str, run_name: str, run_id: str) -> None:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("it").experiment_id
    runs = client.search_runs([exp], f"tags.`{RUN_NAME_TAG}` = '{run_name}'")
    assert [r.info.run_id for r in runs] == [run_id]  # one MLflow run
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(1, 21))
    resumed = [m.value for m in client.get_metric_history(run_id, "resumed_from_step")]
    assert resumed and all(v in (5.0, 10.0, 15.0) for v in resumed)  # from a checkpoint, not from scratch


def test_losing_the_node_that_hosts_a_worker_is_survived(cluster, mlflow_server, shards, tmp_path):
    c, nodes = cluster
    cfg = tiny_config(shards, mlflow_server, tmp_path / "runs", **SLOW)
    out: dict = {}

    def run() -> None:
        try:
            out["summary"] = train(cfg, run_name="it-node", output_dir=tmp_path / "out")
        except BaseException as e:  # handed to the test thread
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    wait_for_step(mlflow_server, "it-node", 9)  # past the step-5 checkpoint and one 2 s controller poll
    hosts = training_worker_nodes(c.address)
    victim = next(n for n in nodes if n.node_id in hosts)
    c.remove_node(victim)
    t.join(timeout=300)
    assert not t.is_alive(), "training did not finish after the node was removed"
    assert "error" not in out, out.get("error")
    s = out["summary"]
    assert s.steps == 20
    assert_each_step_once_and_resumed(mlflow_server, "it-node", s.run_id)


def test_killed_driver_rerun_with_the_same_run_name_resumes(cluster, mlflow_server, shards, tmp_path):
    c, _ = cluster
    config = tmp_path / "run.yaml"
    config.write_text(to_yaml(tiny_config(shards, mlflow_server, tmp_path / "runs", **SLOW)))
    env = {**os.environ, **worker_env(), "RAY_ADDRESS": c.address, "MLFLOW_TRACKING_URI": mlflow_server}
    cmd = [sys.executable, "-m", "pipelines.train", "--config", str(config), "--run-name", "it-driver",
           "--output-dir", str(tmp_path / "out")]
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_step(mlflow_server, "it-driver", 9)
    finally:
        first.kill()  # SIGKILL: no cleanup in the driver; Ray tears down the job's controller and workers
    first.wait()
    deadline = time.time() + 60
    while training_worker_nodes(c.address) and time.time() < deadline:  # the dead job's workers release their CPUs
        time.sleep(0.5)
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Trained 20 steps" in second.stdout
    run_id = wait_for_step(mlflow_server, "it-driver", 20, timeout=5)
    assert_each_step_once_and_resumed(mlflow_server, "it-driver", run_id)
