"""Shards on object storage through pyarrow filesystems, against a real S3-compatible server (moto in server
mode) on 127.0.0.1: the same code path as AWS (credentials and endpoint from the environment)."""

from __future__ import annotations

import itertools
import os
import socket

import boto3
import numpy as np
import pytest
from moto.server import ThreadedMotoServer

from fewstep.data import DataConfig
from fewstep.data.reader import build_dataset
from fewstep.data.shards import iter_samples, write_shards
from fewstep.data.sources import fashion_mnist
from fewstep.data.storage import resolve_shards

BUCKET = "fewstep-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory, s3_env):
    port = int(s3_env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    old = {k: os.environ.get(k) for k in s3_env}
    os.environ.update(s3_env)
    local = tmp_path_factory.mktemp("s3src")
    write_shards(itertools.islice(fashion_mnist("test"), 40), local, prefix="fm", samples_per_shard=16)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    for p in sorted(local.iterdir()):
        client.upload_file(str(p), BUCKET, f"fm/{p.name}")
    yield local
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_resolve_and_read_from_s3(s3):
    full = [f"s3://{BUCKET}/fm/fm-{i:06d}.tar" for i in range(3)]
    assert resolve_shards(f"s3://{BUCKET}/fm") == full
    assert resolve_shards(f"s3://{BUCKET}/fm/fm-*.tar") == full
    assert resolve_shards(f"s3://{BUCKET}/fm/fm-{{000000..000001}}.tar") == full[:2]
    with pytest.raises(FileNotFoundError, match="fm-000003.tar' is not a .tar object"):
        resolve_shards(f"s3://{BUCKET}/fm/fm-{{000002..000003}}.tar")
    remote = [(s["key"], s["cls"], s["image"].tobytes()) for s in iter_samples(f"s3://{BUCKET}/fm")]
    local = [(s["key"], s["cls"], s["image"].tobytes()) for s in iter_samples(str(s3))]
    assert remote == local and len(remote) == 40


def test_unreachable_bucket_errors_name_the_uri(s3, monkeypatch):
    with pytest.raises(OSError, match=r"s3://no-such-bucket/x.*bucket s3://no-such-bucket does not exist"):
        resolve_shards("s3://no-such-bucket/x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(OSError, match=r"shard spec 's3://fewstep-test/fm': cannot list s3://fewstep-test/fm"):
        resolve_shards(f"s3://{BUCKET}/fm")


@pytest.mark.integration
def test_ray_data_reads_s3_shards(ray_cluster, s3):
    rows = build_dataset(DataConfig(shards=f"s3://{BUCKET}/fm", test_shards=None), "train").take_all()
    local = build_dataset(DataConfig(shards=str(s3), test_shards=None), "train").take_all()

    def digest(rs):
        return sorted((r["image"].tobytes(), int(r["label"])) for r in rs)

    assert len(rows) == 40 and digest(rows) == digest(local)
    assert rows[0]["image"].dtype == np.float32
