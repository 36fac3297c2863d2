"""Text-to-image: the frozen MiniLM encoder (offline), caption dropout, classifier-free guidance, the text UNet,
and for real (local Ray, DeepSpeed ZeRO-2, an MLflow server, tar shards with varied captions): a text diffusion
teacher trained and registered -> multistep CD of it with guidance -> the registered model served with prompts."""

from __future__ import annotations

import itertools
import json
import os

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException

from fewstep.config import ConfigError, load_config
from fewstep.data.shards import write_shards
from fewstep.data.sources import fashion_mnist
from fewstep.generator import Generator
from fewstep.objectives import build_model
from fewstep.text import Guided, TextConfig, TextEncoder, drop_captions
from pipelines.presets import preset_path

TINY = ["network.channels=[8, 16]", "network.attention=[false, true]", "network.attention_head_dim=8",
        "network.num_classes=0", "data.num_classes=0", "text.enabled=true", "text.max_length=12",
        "objective.name=diffusion"]


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(TextConfig(enabled=True, max_length=12))


def test_minilm_loads_offline_frozen_and_caches_per_caption(encoder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # loading never needs the network (it ships in the package)
    cond = encoder(["a photo of a sneaker", "a dark bag"])
    assert cond["states"].shape == (2, 12, 384) and cond["pooled"].shape == (2, 384)
    assert cond["mask"].dtype == torch.bool and cond["mask"][0].sum() < 12  # padded, mask marks real tokens
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    # cached: the same caption gives the identical tensor, whatever batch it comes in
    again = encoder(["x", "a dark bag", "a photo of a sneaker"])
    assert torch.equal(again["states"][2], cond["states"][0]) and torch.equal(again["pooled"][1], cond["pooled"][1])
    assert "a dark bag" in encoder.cache and len(encoder.cache) == 3
    assert not torch.allclose(cond["pooled"][0], cond["pooled"][1])  # different captions, different encodings
    with pytest.raises(ValueError, match="text.dim=128"):
        TextEncoder(TextConfig(enabled=True, dim=128))
    with pytest.raises(FileNotFoundError, match="text.encoder='/nonexistent'"):
        TextEncoder(TextConfig(enabled=True, encoder="/nonexistent"))


def test_caption_dropout_rate():
    g = torch.Generator().manual_seed(0)
    out = drop_captions(["a bag"] * 20000, 0.1, g)
    frac = sum(c == "" for c in out) / len(out)
    assert 0.09 < frac < 0.11 and set(out) == {"", "a bag"}
    assert drop_captions(["a", "b"], 0.0) == ["a", "b"]


def test_text_unet_shapes_and_guidance_endpoints(encoder):
    cfg = load_config(None, None, TINY)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    z, t = torch.randn(3, 1, 32, 32), torch.tensor([0.2, 0.5, 0.9])
    cond = encoder(["a photo of a bag", "a dress", "coat, dark"])
    with torch.no_grad():
        x_c, x_u = model(z, t, cond), model(z, t, encoder.null(3))
        assert x_c.shape == (3, 1, 32, 32) and not torch.allclose(x_c, x_u)  # the caption reaches the output
        # x_w = x_u + w (x_c - x_u): w = 1 is the conditional prediction, w = 0 the unconditional one
        torch.testing.assert_close(Guided(model, encoder, 0.999999)(z, t, cond), x_c, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(Guided(model, encoder, 0.0)(z, t, cond), x_u, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(Guided(model, encoder, 3.0)(z, t, cond), x_u + 3 * (x_c - x_u), atol=1e-4,
                                   rtol=1e-4)
        # with the guided prediction comes the conditional one (aDDIM's x_var is computed from it)
        guided, conditional = Guided(model, encoder, 3.0).with_conditional(z, t, cond)
        torch.testing.assert_close(conditional, x_c, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(guided, conditional)
    with pytest.raises(ValueError, match="text-conditioned"):
        model(z, t, None)
    with pytest.raises(ConfigError, match="text.enabled needs network.num_classes=0"):
        load_config(None, None, [*TINY, "network.num_classes=10", "data.num_classes=10"])


def test_t2i_mcd_preset_is_the_papers_text_to_image_setting():
    cfg = load_config(preset_path("t2i-mcd"))
    o = cfg.objective
    assert cfg.text.enabled and o.name == "multistep_cd" and o.teacher.startswith("models:/")
    assert (o.n_start, o.n_end, cfg.optim.total_steps, o.huber_c, o.guidance) == (256, 256, 30_000, 1.0, 1.5)
    s8 = load_config(preset_path("fashion-t2i-mcd"), None, ["objective.student_steps=8"])
    assert s8.objective.student_steps == 8 and s8.text.eval_prompts[7] == "a photo of a sneaker"


@pytest.fixture(scope="module")
def caption_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("t2i") / "train"
    write_shards(itertools.islice(fashion_mnist("test", captions="varied"), 128), out, samples_per_shard=64)
    return out


@pytest.mark.integration
def test_t2i_teacher_then_guided_multistep_cd_then_served_with_prompts(ray_cluster, mlflow_server, caption_shards,
                                                                        tmp_path):
    from fewstep.engine import train

    base = {"data.shards": str(caption_shards), "data.test_shards": None, "network.channels": [8, 16],
            "network.attention": [False, True], "network.attention_head_dim": 8, "optim.batch_size": 8,
            "optim.warmup_steps": 1, "engine.checkpoint_every": 4, "engine.log_every": 1,
            "engine.storage_path": str(tmp_path / "runs"), "eval.every": 4, "eval.grid_size": 2,
            "tracking.uri": mlflow_server, "tracking.experiment": "it-t2i"}

    def cfg(preset, **sets):
        tree = {**base, **sets}
        return load_config(preset_path(preset), None, [f"{k}={json.dumps(v)}" for k, v in tree.items()])

    teacher = train(cfg("fashion-t2i-diffusion", **{"optim.total_steps": 4, "eval.steps": [2],
                                                    "tracking.registered_model": "it-t2i-diffusion"}),
                    run_name="it-t2i-diffusion", output_dir=tmp_path / "out")
    assert teacher.steps == 4 and teacher.samples_png.is_file()
    student = train(cfg("fashion-t2i-mcd", **{"optim.total_steps": 4, "objective.n_start": 8, "objective.n_end": 8,
                                              "objective.teacher": "models:/it-t2i-diffusion@champion",
                                              "tracking.registered_model": "it-t2i-mcd"}),
                    run_name="it-t2i-mcd", output_dir=tmp_path / "out")
    assert student.steps == 4
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    prompts = pd.DataFrame({"prompt": ["a photo of a sneaker", "a small dark bag", ""]})
    served = mlflow.pyfunc.load_model("models:/it-t2i-mcd@champion")
    images = served.predict(prompts, params={"num_steps": 4, "seed": 1})
    assert images.shape == (3, 32, 32, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, served.predict(prompts, params={"num_steps": 4, "seed": 1}))
    with pytest.raises(MlflowException, match="`prompt` column is empty"):
        served.predict(pd.DataFrame({"prompt": pd.Series([], dtype=str)}), params={"num_steps": 4})
    with pytest.raises(MlflowException, match="num_steps=0 is out of range"):
        served.predict(prompts, params={"num_steps": 0})
    with pytest.raises(MlflowException, match="prompt"):
        served.predict(pd.DataFrame({"class_label": [1]}), params={"num_steps": 4})
    # the teacher: any step count, guidance as a sampling param (w = 0 and w = 3 differ)
    t = mlflow.pyfunc.load_model("models:/it-t2i-diffusion@champion")
    a = t.predict(prompts, params={"num_steps": 3, "guidance": 0.0})
    b = t.predict(prompts, params={"num_steps": 3, "guidance": 3.0})
    assert a.shape == (3, 32, 32, 1) and not np.array_equal(a, b)
    gen = Generator.from_dir(student.samples_png.parent / "model")
    refused = "guidance=2.0 applies to text-to-image models whose objective samples with guidance; this is a "
    with pytest.raises(ValueError, match=refused + "text-to-image multistep_cd model"):
        gen.generate(1, num_steps=4, labels=["a bag"], guidance=2.0)
