"""The ImageNet-64 presets through the real pipeline: each preset's config at reduced width (same ADM block types,
depth and attention levels; channels scaled down) keeps the preset's architecture and objective, and one of them,
imagenet64-mcd, trains two steps with 2 DeepSpeed workers under the session Ray cluster, logging to the real
MLflow server, on ImageNet-format shards written here (`.jpg` + `.cls`, 1000 classes, 64x64 RGB). It distils a
reduced-width imagenet64-diffusion teacher exported to a directory, and its registered student serves 64x64 RGB
images. The engine, tracking and registry are the same for every objective: the iCT spine and the diffusion ->
multistep CD runs in test_train_integration.py train the other objectives end to end at 32x32."""

from __future__ import annotations

import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from fewstep.config import TrainConfig, load_config
from fewstep.engine import train
from fewstep.generator import Generator
from fewstep.networks import UNet
from fewstep.objectives import build_model
from pipelines.presets import preset_path

pytestmark = pytest.mark.integration

# Width only: 4 levels, 3 residual blocks each, attention at 32/16/8 and in the middle, ADM resampling kept.
REDUCED = {"network.channels": [8, 16, 24, 32], "network.attention_head_dim": 8, "network.norm_groups": 4}
SAMPLES, PER_SHARD, CLASSES = 32, 2, 1000  # small shards: each rank finishes some in 2 steps


@pytest.fixture(scope="module")
def imagenet_shards(tmp_path_factory):
    """ImageNet-format WebDataset shards as public ImageNet shard sets hold them: KEY.jpg + KEY.cls (ascii)."""
    out = tmp_path_factory.mktemp("imagenet64") / "train"
    out.mkdir()
    rng = np.random.default_rng(0)
    for s in range(SAMPLES // PER_SHARD):
        with tarfile.open(out / f"imagenet-train-{s:06d}.tar", "w") as tar:
            for i in range(s * PER_SHARD, (s + 1) * PER_SHARD):
                jpg = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpg, "JPEG", quality=90)
                label = str(int(rng.integers(0, CLASSES)) if i else CLASSES - 1).encode()  # class 999 occurs
                for name, data in ((f"{i:06d}.cls", label), (f"{i:06d}.jpg", jpg.getvalue())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return out


def reduced(name: str, shards, uri: str, storage, **sets) -> TrainConfig:
    base = {
        **REDUCED,
        "data.shards": str(shards),
        "data.test_shards": None,
        "data.image_ext": ["jpg"],  # ImageNet shards hold JPEGs: accept nothing else
        "data.shuffle_buffer": 0,  # shard order only: a finished shard's count is reported within 2 steps
        "optim.batch_size": 4,
        "optim.total_steps": 2,
        "engine.num_workers": 2,
        "engine.cpus_per_worker": 1,
        "engine.threads_per_worker": 1,
        "engine.use_gpu": False,
        "engine.precision": "fp32",
        "engine.checkpoint_every": 2,
        "engine.log_every": 1,
        "engine.storage_path": str(storage),
        "eval.every": 2,
        "eval.grid_size": 1,
        "eval.fid_every": 0,
        "tracking.uri": uri,
        "tracking.experiment": "it-imagenet64",
        "tracking.registered_model": None,
        **sets,
    }
    return load_config(preset_path(name), None, [f"{k}={json.dumps(v)}" for k, v in base.items()])


def block_types(cfg: TrainConfig) -> list[str]:
    with torch.device("meta"):  # the full-size net without allocating its 296M parameters
        unet = UNet(cfg.network).unet
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    return [f"{type(b).__name__}x{len(b.resnets)}" for b in blocks]


def test_imagenet64_presets_at_reduced_width_and_mcd_trains_two_steps(
    ray_cluster, mlflow_server, imagenet_shards, tmp_path
):
    client = MlflowClient(mlflow_server)
    # the teacher imagenet64-mcd distils: imagenet64-diffusion at the same reduced width, exported like a model
    teacher_cfg = reduced("imagenet64-diffusion", imagenet_shards, mlflow_server, tmp_path / "runs")
    torch.manual_seed(0)
    teacher_dir = Generator(build_model(teacher_cfg), teacher_cfg).save(tmp_path / "teacher")
    sets = {
        "imagenet64-ict": {},
        "imagenet64-mct": {},
        "imagenet64-mcd": {"objective.teacher": str(teacher_dir), "tracking.registered_model": "it-imagenet64-mcd"},
    }
    configs = {}
    for name in sets:
        full = load_config(preset_path(name), None, ["objective.teacher=x"] if name.endswith("mcd") else [])
        cfg = configs[name] = reduced(name, imagenet_shards, mlflow_server, tmp_path / "runs", **sets[name])
        # same architecture as the preset, only narrower: ADM blocks, depth and attention levels unchanged
        assert block_types(cfg) == block_types(full), name
        assert (cfg.network.scale_shift_norm, cfg.network.resblock_updown) == (True, True)
        mine, paper = (c.objective.model_dump(exclude={"teacher"}) for c in (cfg, full))
        assert mine == paper, name  # the objective exactly as the preset has it
        assert (cfg.data.num_classes, cfg.data.image_size, cfg.data.channels) == (CLASSES, 64, 3)

    cfg = configs["imagenet64-mcd"]
    s = train(cfg, run_name="it-imagenet64-mcd", output_dir=tmp_path / "out")
    assert s.steps == 2
    run = client.get_run(s.run_id)
    assert run.data.params["objective.name"] == "multistep_cd"
    assert run.data.params["network.channels"] == str(REDUCED["network.channels"])
    loss = client.get_metric_history(s.run_id, "loss")
    assert sorted(m.step for m in loss) == [1, 2] and all(math.isfinite(m.value) for m in loss)
    # finished shards' JPEG samples were decoded (counts come per finished shard) and none was refused
    read = client.get_metric_history(s.run_id, "data_samples_read")
    assert read and read[-1].value >= PER_SHARD
    assert client.get_metric_history(s.run_id, "data_skipped")[-1].value == 0
    assert Image.open(s.samples_png).size[0] >= 64
    assert run.data.tags["fewstep.teacher"] == str(teacher_dir)
    # the registered student serves 64x64 RGB images for ImageNet class labels in its S = 4 steps
    mv = client.get_model_version_by_alias("it-imagenet64-mcd", "champion")
    assert mv.run_id == s.run_id
    gen = Generator.from_dir(client.download_artifacts(mv.run_id, "model/artifacts/model", str(tmp_path / "m")))
    images = gen.generate(2, num_steps=cfg.objective.student_steps, labels=np.array([0, CLASSES - 1]))
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
