"""What a run prints and which cluster it picks, without starting anything: the elapsed/ETA text, the upscaled
grids, the harmless-noise filters, a line printed once under Ray Train's print patch, and the address choice."""

from __future__ import annotations

import builtins
import logging
import warnings

import numpy as np
import pytest

from fewstep.cluster import LOCAL, resolve_address
from fewstep.config import ConfigError, load_config
from fewstep.console import DropHarmless, duration, quiet_known_noise, say, timing, ui_hint
from fewstep.images import DISPLAY_CELL, grid, upscale


def test_durations_and_eta():
    assert [duration(s) for s in (0, 42.4, 60, 185, 3599, 3600, 3725, 90000)] == [
        "0s", "42s", "1m00s", "3m05s", "59m59s", "1h00m", "1h02m", "25h00m"]
    # 100 of 800 steps in 50 s after resuming at step 0 -> 700 more at 0.5 s each
    assert timing(100, 800, 0, 50.0) == "elapsed 50s, ETA 5m50s"
    assert timing(300, 800, 200, 50.0) == "elapsed 50s, ETA 4m10s"  # the pace of this attempt (resumed at 200)
    assert timing(800, 800, 0, 400.0) == "elapsed 6m40s"  # done: no ETA
    assert timing(200, 800, 200, 0.0) == "elapsed 0s"  # no step yet in this attempt


def test_grids_are_upscaled_by_nearest_neighbour():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 32, 1), dtype=np.uint8)
    big = upscale(images, 4)
    assert big.shape == (6, 128, 128, 1)
    assert (big[:, ::4, ::4] == images).all() and (big[:, 3::4, 3::4] == images).all()  # 4x4 blocks of one pixel
    g = grid(images, 3, pad=2, cell=DISPLAY_CELL)
    assert g.shape == (2 * (128 + 2) + 2, 3 * (128 + 2) + 2, 1)
    assert grid(rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8), 2, cell=DISPLAY_CELL).shape == (132, 262, 3)
    assert grid(images, 3).shape == (2 * 34 + 2, 3 * 34 + 2, 1)  # no cell: as before


def test_known_harmless_noise_is_filtered_and_the_rest_is_not():
    quiet_known_noise()
    ds = logging.getLogger("DeepSpeed")
    assert any(isinstance(f, DropHarmless) for f in ds.filters)
    record = logging.makeLogRecord({"msg": "Setting accelerator to CPU. If you have GPU or other accelerator, we "
                                    "were unable to detect it.", "levelno": logging.WARNING})
    assert not ds.filter(record)
    assert ds.filter(logging.makeLogRecord({"msg": "ZeRO-3 gathered a partition of the wrong size"}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_noise()
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning,
                      stacklevel=1)
        warnings.warn("\x1b[1;33mAn input example was not provided when logging the model.\x1b[0m", UserWarning,
                      stacklevel=1)  # MLflow's, coloured as MLflow prints it
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]


def test_a_line_appears_once_under_ray_trains_print_patch(capsys):
    """Ray Train workers patch print: it logs to the root logger and, because Ray wraps sys.stdout, echoes the
    line too (twice in `ray job submit` output). `say` writes once."""
    from ray.train.v2._internal.logging.patch_print import redirected_print

    root = logging.getLogger()
    console = logging._StderrHandler()  # what Ray Train's worker console handler does
    console.setFormatter(logging.Formatter("%(message)s"))
    old_level, old_print = root.level, builtins.print
    root.addHandler(console)
    root.setLevel(logging.INFO)
    builtins.print = redirected_print
    try:
        print("step 10/800 printed")
        say("step 10/800 said")
    finally:
        builtins.print = old_print
        root.removeHandler(console)
        root.setLevel(old_level)
    out = capsys.readouterr()
    both = out.out + out.err
    assert both.count("step 10/800 printed") == 2  # the bug `say` avoids: still there in this Ray version
    assert both.count("step 10/800 said") == 1 and "step 10/800 said" in out.out


def test_sqlite_runs_say_how_to_open_their_ui():
    assert ui_hint("sqlite:////data/mlflow.db") == (
        "MLflow UI: mlflow ui --backend-store-uri sqlite:////data/mlflow.db   (then open http://127.0.0.1:5000)")
    assert ui_hint("http://127.0.0.1:5000") is None


def test_the_cluster_is_chosen_explicitly(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) == LOCAL  # never `auto`: no silent join of a cluster someone else runs
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # as under `ray job submit`
    assert resolve_address(None) == "10.0.0.5:6379"
    assert resolve_address("local") == LOCAL and resolve_address("auto") == "auto"
    with pytest.raises(ConfigError, match="engine.ray_address"):
        load_config(None, None, ["engine.ray_address=''"])


def test_address_flag_sets_engine_ray_address(shards, capsys):
    from pipelines.train import main

    assert main(["--preset", "fashion-ict", "--address", "127.0.0.1:6379", "--dry-run",
                 "--set", f"data.shards={shards}", "--set", f"data.test_shards={shards}"]) == 0
    assert "ray_address: 127.0.0.1:6379" in capsys.readouterr().out
