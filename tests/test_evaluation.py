"""Evaluation you can trust: per-index noise whatever the split, FID over seeds on 2 Ray actors equal to one
process, reference statistics identified by their images' sha256, comparisons refused across references,
and what `record` writes to a real MLflow registry."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil

import numpy as np
import pytest
import torch

from fewstep.config import build_config
from fewstep.fid import Moments, stats
from fewstep.fid_pool import block_seed, sample_blocks
from fewstep.fid_table import FIDRow, FIDTable, IncomparableFID, ModelInfo, check_comparable, compare
from fewstep.generator import Generator
from fewstep.objectives import build_model

TINY = {"network": {"channels": [8, 16], "attention": [False, False], "attention_head_dim": 8, "norm_groups": 4}}


def tiny_generator(seed: int = 0) -> Generator:
    """A class-conditional iCT UNet at random initialisation: sampling it costs milliseconds."""
    cfg = build_config(TINY, source="tiny test config")
    torch.manual_seed(seed)
    return Generator(build_model(cfg).eval(), cfg)


def test_noise_of_a_sample_depends_on_its_index_not_on_the_split():
    gen = tiny_generator()
    whole = sample_blocks(gen, 2, seed=5, n=5, blocks=range(3), seed_block=2)  # blocks of 2, the last of 1
    parts = [sample_blocks(gen, 2, seed=5, n=5, blocks=range(b, b + 1), seed_block=2) for b in (0, 2)]
    assert whole.shape == (5, 32, 32, 1)
    assert np.array_equal(whole[:2], parts[0]) and np.array_equal(whole[4:], parts[1])
    assert not np.array_equal(whole[:2], sample_blocks(gen, 2, seed=6, n=5, blocks=range(1), seed_block=2))
    assert len({block_seed(s, b) for s in range(3) for b in range(100)}) == 300


def test_moments_equal_stats_of_the_concatenated_features():
    x = np.random.default_rng(0).standard_normal((101, 24)) * 3 + 1
    m = Moments(24)
    for i in range(0, 101, 17):
        m.add(x[i : i + 17])
    mu, sigma = stats(x)
    np.testing.assert_allclose(m.stats()[0], mu, atol=1e-12)
    np.testing.assert_allclose(m.stats()[1], sigma, atol=1e-12)
    with pytest.raises(ValueError, match="dimension 24"):
        m.add(np.zeros((3, 5)))


def table(sha: str, n: int = 100, fids=((1, [50.0, 52.0, 51.0]), (2, [40.0, 41.0, 42.0]))) -> FIDTable:
    ref = {"sha256": sha, "n": 200, "size": 32, "source": "data/test"}
    return FIDTable([FIDRow("m", k, list(v)) for k, v in fids], n, [0, 1, 2], ref,
                    models={"m": ModelInfo("m")})


def test_fid_rows_and_comparison_refuse_other_references(tmp_path, capsys):
    from pipelines.evaluate import main

    t = table("a" * 64)
    r = t.by_model("m")[1]
    assert (r.mean, r.min, r.summary()) == (51.0, 50.0, "51.00 ± 1.00")
    long = "models:/fewstep-fashion-ict-classic@champion"  # printed whole, the columns aligned after it
    lines = FIDTable([FIDRow(long, 1, [3.0]), FIDRow("m", 2, [4.0])], 100, [0], t.reference).format().splitlines()
    assert lines[2].startswith(long + " ") and lines[2].index("3.00") == lines[3].index("4.00")
    a, b, c = t.save(tmp_path / "a.json"), table("b" * 64).save(tmp_path / "b.json"), tmp_path / "c.json"
    table("a" * 64, fids=((1, [45.0, 47.0, 46.0]),)).save(c)
    assert FIDTable.load(a).to_dict() == t.to_dict()
    with pytest.raises(IncomparableFID, match=f"sha256 {'a' * 64}.*sha256 {'b' * 64}"):
        check_comparable(FIDTable.load(a), FIDTable.load(b))
    with pytest.raises(IncomparableFID, match="100 samples per step count, B 50"):
        check_comparable(t, table("a" * 64, n=50))
    assert main(["--compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert "a" * 64 in err and "b" * 64 in err
    assert main(["--compare", str(a), str(c)]) == 0
    assert "-5.00" in capsys.readouterr().out  # 46 - 51 at 1 step; 2 steps only in A: no row
    assert "-5.00" in compare(t, FIDTable.load(c))
    (tmp_path / "bad.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="bad.json is not a fewstep FID table"):
        FIDTable.load(tmp_path / "bad.json")


@pytest.mark.integration
def test_two_ray_actors_give_the_fid_of_one_process(ray_cluster, shards, tmp_path):
    """Reference statistics and samples on 2 CPU actors, then samples in this process: the same FIDs. Both sides run
    torch on one thread: CPU kernels round differently across thread counts, which can move a pixel by one level."""
    from fewstep.data.shards import iter_samples
    from fewstep.evaluation import evaluate_generators, pad_to, reference_of
    from fewstep.fid_pool import FeaturePool

    first = sorted(shards.glob("*.tar"))[:1]
    (tmp_path / "a").mkdir()
    shutil.copy(first[0], tmp_path / "a")
    gen = tiny_generator()
    model_dir = gen.save(tmp_path / "model")
    kw = dict(steps=[1], n=4, reference=str(tmp_path / "a"), n_ref=4, seeds=2, seed_block=2, progress=False)
    spread = evaluate_generators({"tiny": model_dir}, num_workers=2, **kw)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = evaluate_generators([gen], num_workers=0, **kw)  # the reference statistics cached by the actors
    finally:
        torch.set_num_threads(threads)

    images = pad_to(np.stack([s["image"] for s in itertools.islice(iter_samples(first, require_cls=False), 4)]), 32)
    sha = hashlib.sha256(images.tobytes()).hexdigest()
    assert spread.reference == here.reference == {"sha256": sha, "n": 4, "size": 32, "source": str(tmp_path / "a")}
    assert json.loads((tmp_path / "a" / "fid_stats_4_32px.json").read_text())["sha256"] == sha
    (a,), (b,) = spread.rows, here.rows
    assert (a.model, b.model) == ("tiny", "generator0") and len(a.fid) == 2 and a.fid[0] != a.fid[1]
    np.testing.assert_allclose(a.fid, b.fid, rtol=0, atol=1e-3)
    assert spread.models["tiny"].uri == str(model_dir)

    # statistics cached without a .json (older caches) get one from the images alone; too few images: refused
    (tmp_path / "a" / "fid_stats_4_32px.json").unlink()
    with FeaturePool([], num_workers=0, progress=False) as pool:
        assert reference_of(str(tmp_path / "a"), 4, 32, pool).sha256 == sha
        with pytest.raises(ValueError, match=f"{tmp_path / 'a'} holds 64 images, fewer than the 65"):
            reference_of(str(tmp_path / "a"), 65, 32, pool.local.features)


@pytest.mark.integration
def test_record_writes_mean_std_protocol_and_plot(mlflow_server):
    from mlflow.tracking import MlflowClient

    from fewstep.evaluation import record

    client = MlflowClient(mlflow_server)
    exp = client.create_experiment("eval-record")
    run = client.create_run(exp)
    client.create_registered_model("eval-record")
    mv = client.create_model_version("eval-record", f"{run.info.artifact_uri}/model", run.info.run_id)
    t = table("c" * 64)
    t.models["m"] = ModelInfo("m", "models:/eval-record/1", "eval-record", mv.version, run.info.run_id)
    record(t, "m")
    tags = client.get_model_version("eval-record", mv.version).tags
    assert tags["fid_steps_1"] == "51.00 ± 1.00" and tags["fid_steps_2"] == "41.00 ± 1.00"
    assert tags["fid_reference_sha256"] == "c" * 64 and tags["fid_n"] == "100" and tags["fid_seeds"] == "0,1,2"
    assert "vs 200 images of data/test" in tags["fid_protocol"]
    got = client.get_run(run.info.run_id).data
    assert got.metrics["fid_steps_2"] == 41.0 and got.metrics["fid_std_steps_2"] == 1.0
    assert got.metrics["fid_min_steps_1"] == 50.0 and got.tags["fid_reference_sha256"] == "c" * 64
    files = {f.path for f in client.list_artifacts(run.info.run_id, "evaluation")}
    assert files == {"evaluation/fid.json", "evaluation/fid_vs_steps.png"}
