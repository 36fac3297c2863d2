"""`python -m pipelines.bench data`: is the data plane ever the bottleneck?

Prints, in one run on the same shards:
  1. decoded images/s of plain `webdataset` in this one process (decode PNG, pad, scale: the same work);
  2. decoded images/s of fewstep's Ray Data path (one rank's TrainStream: read tasks, decode, map_batches,
     local shuffle, exact-size batches), after a warm-up epoch;
  3. the fraction of step time a short demo training (the fashion-ict preset, 2 workers) waits for data,
     from the `data_wait_frac` metric its rank 0 logs.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def plain_webdataset(shards: list[str], n: int, size: int) -> float:
    import webdataset as wds
    from PIL import Image

    def decode(sample):
        im = np.asarray(Image.open(io.BytesIO(sample["png"])), np.uint8)
        out = np.zeros((1, size, size), np.float32) - 1
        h, w = im.shape[:2]
        out[0, (size - h) // 2 : (size - h) // 2 + h, (size - w) // 2 : (size - w) // 2 + w] = im / 127.5 - 1
        return out, int(sample["cls"])

    ds = wds.WebDataset(shards, shardshuffle=False, empty_check=False).map(decode)
    t = time.perf_counter()
    count = sum(1 for _ in itertools.islice(ds.repeat(), n))
    return count / (time.perf_counter() - t)


def ray_stream(shards_spec: str, n: int, batch: int) -> float:
    from fewstep.data import DataConfig
    from fewstep.data.stream import TrainStream

    it = iter(TrainStream(DataConfig(shards=shards_spec), rank=0, world=1, batch_size=batch))
    for _ in range(max(1, n // batch // 4)):  # warm-up: worker processes started, first blocks in flight
        next(it)
    t = time.perf_counter()
    count = sum(len(next(it)[1]["label"]) for _ in range(n // batch))
    return count / (time.perf_counter() - t)


def demo_wait(shards: str, steps: int, out: Path) -> tuple[float, float]:
    """Train the fashion-ict preset for `steps` steps; (mean data_wait_frac, mean images/s) after step 10."""
    from mlflow.tracking import MlflowClient

    from fewstep.config import load_config
    from fewstep.engine import train
    from pipelines.presets import preset_path

    sets = {"data.shards": shards, "data.test_shards": None, "optim.total_steps": steps,
            "engine.checkpoint_every": steps, "eval.every": steps, "engine.storage_path": str(out / "runs"),
            "tracking.uri": f"sqlite:///{out / 'mlflow.db'}", "tracking.registered_model": None,
            "tracking.experiment": "bench-data", "engine.log_every": 10}
    cfg = load_config(preset_path("fashion-ict"), None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])
    s = train(cfg, run_name="bench-data", output_dir=out / "outputs")
    client = MlflowClient(cfg.tracking.uri)
    wait = [m.value for m in client.get_metric_history(s.run_id, "data_wait_frac") if m.step > 10]
    ips = [m.value for m in client.get_metric_history(s.run_id, "images_per_s") if m.step > 10]
    return float(np.mean(wait)), float(np.mean(ips))


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m pipelines.bench data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default="data/fashion-mnist/train", help="training shards (default: the demo's)")
    p.add_argument("--images", type=int, default=20000, help="images per throughput measurement")
    p.add_argument("--batch", type=int, default=16, help="micro-batch of one rank (fashion-ict: 16)")
    p.add_argument("--steps", type=int, default=100, help="demo training steps (0 = skip part 3)")
    args = p.parse_args(argv)

    import os

    import ray

    from fewstep.cluster import start_local
    from fewstep.data.storage import resolve_shards

    shards = resolve_shards(args.shards)
    wds_ips = plain_webdataset(shards, args.images, 32)
    print(f"plain webdataset, 1 process:        {wds_ips:8.0f} decoded img/s", flush=True)
    # A fresh local cluster of this benchmark's own (never another user's), 4 logical CPUs like the tests;
    # workers import fewstep from the same PYTHONPATH as this process.
    env = {k: os.environ[k] for k in ("PYTHONPATH", "TORCH_EXTENSIONS_DIR") if k in os.environ}
    start_local(num_cpus=4, object_store_memory=1024**3, runtime_env={"env_vars": env}, log_to_driver=False)
    ray_ips = ray_stream(args.shards, args.images, args.batch)
    print(f"Ray Data TrainStream, 1 rank:       {ray_ips:8.0f} decoded img/s  (ratio {ray_ips / wds_ips:.2f})",
          flush=True)
    if args.steps:
        with tempfile.TemporaryDirectory() as d:
            wait, ips = demo_wait(args.shards, args.steps, Path(d))
        print(f"demo training ({args.steps} steps, 2 workers): {ips:.0f} img/s consumed, data wait "
              f"{100 * wait:.2f}% of step time (goal < 2%); the stream supplies "
              f"{ray_ips / max(ips / 2, 1e-9):.0f}x what one rank consumes")
    ray.shutdown()
