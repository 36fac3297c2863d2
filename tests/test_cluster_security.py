"""Who can reach the clusters fewstep starts: every TCP socket a Ray process listens on is on 127.0.0.1, and a client
without the token is refused; for the library's private cluster (the session cluster, started the same way) and
for `infra/local/up.sh` (a second stack of its own: other ports, its own Ray temp dir, stopped by down.sh)."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import REPO, free_port

pytestmark = pytest.mark.integration


def cluster_processes(*markers: str, extra: tuple[int, ...] = ()) -> set[psutil.Process]:
    """The processes whose command line names one of `markers` (a Ray session or temp dir, the GCS address), their
    descendants and `extra`."""
    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    roots = [p for p in psutil.process_iter(["cmdline"])
             if p.pid not in me and any(m in " ".join(p.info["cmdline"] or []) for m in markers)]
    roots += [psutil.Process(pid) for pid in extra]
    out = set(roots)
    for p in roots:
        with_children = p.children(recursive=True) if p.is_running() else []
        out.update(with_children)
    return out


def loopback(ip: str) -> bool:
    a = ipaddress.ip_address(ip.split("%")[0])
    return a.is_loopback or bool(getattr(a, "ipv4_mapped", None) and a.ipv4_mapped.is_loopback)


def listening(procs: set[psutil.Process]) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of `procs`."""
    out = []
    for p in procs:
        try:
            out += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections("tcp")
                    if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            continue
    return out


def assert_loopback_only(sockets: list[tuple[str, str, int]], must_include: set[str]) -> None:
    names = {name for name, _, _ in sockets}
    assert must_include <= names, f"expected listeners of {must_include}, found {sorted(names)}"
    outside = [s for s in sockets if not loopback(s[1])]
    assert not outside, f"listening outside 127.0.0.1: {outside}"


def refused_without_token(gcs_address: str) -> subprocess.CompletedProcess:
    # a client of a cluster on 127.0.0.1 runs in Ray's single-machine mode too (as fewstep.cluster.connect_ray does)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-cluster-token",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return subprocess.run([sys.executable, "-c", f"import ray; ray.init(address={gcs_address!r})"], env=env,
                          capture_output=True, text=True, timeout=180)


JOIN = """
import fewstep, ray
from fewstep.cluster import ClusterError, connect_ray
real, fewstep.__version__ = fewstep.__version__, "9.9.9"
try:
    connect_ray("{address}")
except ClusterError as e:
    print("REFUSED", e, flush=True)
assert not ray.is_initialized()
fewstep.__version__ = real
connect_ray("{address}")
"""


def test_the_private_cluster_listens_on_loopback_only_and_wants_the_token(ray_cluster):
    import ray

    @ray.remote
    class Probe:  # an actor and a task: core workers with their gRPC servers
        def ping(self) -> int:
            return os.getpid()

    probe = Probe.remote()
    assert ray.get(probe.ping.remote()) > 0 and ray.get(ray.remote(lambda: 1).remote()) == 1
    node = ray._private.worker._global_node
    procs = cluster_processes(node.get_session_dir_path(), extra=(os.getpid(),))
    assert_loopback_only(listening(procs), {"gcs_server", "raylet"})
    assert node.node_ip_address == "127.0.0.1"

    out = refused_without_token(node.gcs_address)
    assert out.returncode != 0 and "Authentication token is missing or incorrect" in out.stderr, out.stderr[-2000:]


def test_up_sh_listens_on_loopback_only_wants_the_token_and_down_sh_stops_it(tmp_path):
    temp_dir = Path(tempfile.mkdtemp(prefix="fs-up-", dir="/tmp"))  # short: Ray's socket paths live under it
    ports = {k: str(free_port()) for k in ("RAY_PORT", "RAY_DASHBOARD_PORT", "RAY_CLIENT_PORT", "MLFLOW_PORT")}
    env = {**os.environ, **ports, "FEWSTEP_STATE": str(tmp_path / "state"), "RAY_TEMP_DIR": str(temp_dir),
           "FEWSTEP_BIN": os.path.dirname(sys.executable), "RAY_AGENT_PORT": "0", "RAY_NUM_CPUS": "1"}
    env.pop("RAY_ADDRESS", None)
    marks = (str(temp_dir), f"--address=127.0.0.1:{ports['RAY_PORT']} ")  # the Ray client server names only the GCS
    try:
        up = subprocess.run(["bash", str(REPO / "infra/local/up.sh")], env=env, capture_output=True, text=True,
                            timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "head started" in up.stdout and "server started" in up.stdout, up.stdout  # not the lead's stack
        mlflow_pid = int((tmp_path / "state/mlflow.pid").read_text())
        procs = cluster_processes(*marks, extra=(mlflow_pid,))
        sockets = listening(procs)
        assert_loopback_only(sockets, {"gcs_server", "raylet", "ray::DashboardAgent"})
        assert {int(ports[k]) for k in ("RAY_PORT", "RAY_DASHBOARD_PORT", "MLFLOW_PORT")} <= {s[2] for s in sockets}

        dashboard = f"http://127.0.0.1:{ports['RAY_DASHBOARD_PORT']}/api/jobs/"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(dashboard, timeout=30)
        assert e.value.code in (401, 403)  # the job server wants the token
        token = (Path.home() / ".ray" / "auth_token").read_text().strip()
        req = urllib.request.Request(dashboard, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200

        out = refused_without_token(f"127.0.0.1:{ports['RAY_PORT']}")
        assert out.returncode != 0 and "Authentication token is missing or incorrect" in out.stderr, out.stderr[-2000:]

        # fewstep joins it from a plain shell, refuses it while the driver's fewstep differs from the nodes'
        out = subprocess.run([sys.executable, "-c", JOIN.format(address=f"127.0.0.1:{ports['RAY_PORT']}")], env=env,
                             capture_output=True, text=True, timeout=300, cwd=REPO)
        assert out.returncode == 0, out.stderr[-3000:]
        from fewstep import __version__

        assert (f"REFUSED the Ray cluster at 127.0.0.1:{ports['RAY_PORT']} runs another fewstep than this driver "
                f"(fewstep 9.9.9): node 127.0.0.1 runs fewstep {__version__}") in out.stdout, out.stdout
        assert (f"Ray cluster: joined 127.0.0.1:{ports['RAY_PORT']}: 1 node, 1 CPUs, 0 GPUs; fewstep {__version__} "
                "on every node") in out.stdout, out.stdout
    finally:
        down = subprocess.run(["bash", str(REPO / "infra/local/down.sh")], env=env, capture_output=True, text=True,
                              timeout=120)
        left = [p for p in cluster_processes(*marks) if p.is_running()]
        for p in left:  # leave nothing behind even when down.sh failed (this test's processes only)
            p.kill()
    assert "ray: stopped" in down.stdout and "mlflow: stopped" in down.stdout, down.stdout + down.stderr
    assert not left, f"down.sh left {[(p.pid, p.name()) for p in left]}"
