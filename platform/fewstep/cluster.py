"""Which Ray cluster a run uses, and who can reach it.

`engine.ray_address` (`--address`) picks the cluster: `local` starts a private one on this machine, `auto` joins the
cluster `ray start` runs here, `HOST:PORT` / `ray://HOST:PORT` join that one; unset, a run joins `$RAY_ADDRESS`
(as under `ray job submit`) and otherwise starts a private cluster: it never joins another cluster silently.

A private cluster has token auth on and every Ray process listens on 127.0.0.1 only. A joined cluster must run
the driver's fewstep on every node: one zero-CPU task per node reads `fewstep.__version__` there.
"""

from __future__ import annotations

import contextlib
import logging
import os

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import fewstep
from fewstep.config import ConfigError
from fewstep.console import say

log = logging.getLogger("fewstep")
LOCAL = "local"
# Ray's single-machine mode (its default on macOS/Windows): the node's IP is 127.0.0.1, and Ray's gRPC servers
# listen on all interfaces unless the node's IP is 127.0.0.1. On Linux, `--node-ip-address 127.0.0.1` /
# `_node_ip_address` alone is replaced by the machine's address.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
VERSION_TIMEOUT_S = 120.0


class ClusterError(ConfigError):
    """The chosen Ray cluster cannot run this driver's fewstep (the message names the nodes and versions)."""


def resolve_address(configured: str | None) -> str:
    """engine.ray_address, else $RAY_ADDRESS, else `local` (a private cluster)."""
    return configured or os.environ.get("RAY_ADDRESS") or LOCAL


@contextlib.contextmanager
def _single_machine():
    """Ray's single-machine mode while a local cluster starts (its processes inherit the environment)."""
    from ray._private import ray_constants

    old_env, old_flag = os.environ.get(SINGLE_MACHINE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False  # read when ray.init resolves the node's IP
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_flag
        if old_env is None:
            os.environ.pop(SINGLE_MACHINE_ENV, None)
        else:
            os.environ[SINGLE_MACHINE_ENV] = old_env


def enable_token_auth() -> None:
    """RAY_AUTH_MODE=token for this process and the processes it starts. Ray reads its config once at import, so it
    is re-read here (as ray.init does when it turns token auth on by default); ray.init generates the token
    (~/.ray/auth_token) if there is none."""
    from ray._raylet import Config

    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")


def start_local(**init_kwargs):
    """A private Ray cluster on this machine: token auth on, every Ray process bound to 127.0.0.1.
    `init_kwargs` go to ray.init (num_cpus, object_store_memory, runtime_env, ...)."""
    enable_token_auth()
    init_kwargs.setdefault("include_dashboard", False)
    if init_kwargs["include_dashboard"]:
        init_kwargs.setdefault("dashboard_host", "127.0.0.1")
    with _single_machine():
        return ray.init(address=LOCAL, _node_ip_address="127.0.0.1", **init_kwargs)


@ray.remote(num_cpus=0, max_retries=0)
def _node_version() -> str:
    import fewstep as installed  # the fewstep a training worker on that node imports (same runtime env)

    return installed.__version__


def check_versions(timeout_s: float = VERSION_TIMEOUT_S) -> None:
    """Raise ClusterError if a live node runs another fewstep version than this driver, or none."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    refs = {
        _node_version.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote():
        n for n in nodes
    }
    done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    bad = []
    for ref in done:
        where = refs[ref]["NodeManagerAddress"]
        try:
            version = ray.get(ref)
        except Exception as e:  # noqa: BLE001  a node without fewstep: named in the error below
            bad.append(f"node {where} cannot import fewstep ({type(e).__name__})")
            continue
        if version != fewstep.__version__:
            bad.append(f"node {where} runs fewstep {version}")
    if pending:
        log.warning("no fewstep version from node(s) %s within %.0f s", ", ".join(
            refs[r]["NodeManagerAddress"] for r in pending), timeout_s)
    if bad:
        raise ClusterError(
            f"the Ray cluster at {cluster_address()} runs another fewstep than this driver (fewstep "
            f"{fewstep.__version__}): {'; '.join(bad)}. Install fewstep {fewstep.__version__} on every node (or "
            "the image), or train on a private local cluster with --address local (engine.ray_address=local)"
        )


def on_loopback(address: str) -> bool:
    """HOST:PORT or ray://HOST:PORT with HOST 127.0.0.1 / localhost."""
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def cluster_address() -> str:
    return ray.get_runtime_context().gcs_address


def describe(how: str) -> str:
    """One line: which cluster, how many nodes, CPUs and GPUs."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    res = ray.cluster_resources()
    return (f"Ray cluster: {how} {cluster_address()}: {len(nodes)} node{'s' * (len(nodes) != 1)}, "
            f"{res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs")


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the cluster `resolve_address(address)` names (nothing if Ray is up already), and print it. A private
    cluster declares more logical CPUs than the workers reserve, so Ray Data keeps a budget."""
    if ray.is_initialized():
        return
    address = resolve_address(address)
    if address == LOCAL:
        cpus = num_cpus or max(4, 2 * (os.cpu_count() or 1))
        start_local(num_cpus=cpus, object_store_memory=1024**3, log_to_driver=True)
        say(describe("private (token auth, 127.0.0.1 only), started at") + f"; fewstep {fewstep.__version__}")
        return
    # a cluster on 127.0.0.1 (infra/local/up.sh) listens there only: reach it from 127.0.0.1 too
    with _single_machine() if on_loopback(address) else contextlib.nullcontext():
        ray.init(address=address, log_to_driver=True)
    try:
        check_versions()
    except ClusterError:
        ray.shutdown()
        raise
    say(describe("joined") + f"; fewstep {fewstep.__version__} on every node")
