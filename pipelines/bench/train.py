"""`python -m pipelines.bench train [--quick]`: what the platform costs, four figures measured in one run.

1. overhead: the full pipeline (Ray Data + Ray Train + DeepSpeed ZeRO-2, 1 worker x 1 thread) vs the same loop and
   train_step on the local backend (one process, a plain torch optimizer, shards read in-process), same model,
   objective, optimizer, EMA, batch and thread count; steady-state images/s (the logged windows after the first).
   Goal >= 0.95.
2. scaling: 2 workers x 1 thread vs 1 worker x 1 thread, same micro-batch per worker. Goal >= 1.8x.
3. memory: per-rank parameter, gradient (+ DeepSpeed buffers) and optimizer bytes after one step under ZeRO
   0/1/2/3 with 2 workers, counted over the unique tensor storages each rank holds. Goal ZeRO-3 <= ZeRO-0/2+10%.
4. startup: seconds from `ray job submit` to the first optimizer step on a warm local cluster. Goal < 30 s.

`--quick` shrinks every part to check that the benchmark runs (numbers meaningless). Run it on an idle box.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fewstep.config import TrainConfig, load_config, to_yaml
from pipelines.presets import preset_path

REPO = Path(__file__).resolve().parents[2]
QUICK_NET = {"network.channels": [8, 16], "network.attention": [False, False], "network.attention_head_dim": 8}


def bench_config(args, shards: Path, tmp: Path, workers: int = 1, **sets) -> TrainConfig:
    """The fashion-ict preset (its network, objective, optimizer), `args.batch` images per worker per step."""
    base = {
        "data.shards": str(shards),
        "data.test_shards": None,
        "optim.batch_size": args.batch * workers,
        "optim.total_steps": args.steps,
        "engine.num_workers": workers,
        "engine.threads_per_worker": 1,
        "engine.checkpoint_every": 10**6,  # only the final checkpoint
        "engine.log_every": args.log_every,
        "engine.storage_path": str(tmp / "runs"),
        "eval.every": 10**6,
        "eval.grid_size": 2,
        "tracking.uri": f"sqlite:///{tmp / 'mlflow.db'}",
        "tracking.experiment": "bench-train",
        "tracking.registered_model": None,
        **(QUICK_NET if args.quick else {}),
        **sets,
    }
    return load_config(preset_path("fashion-ict"), None, [f"{k}={json.dumps(v)}" for k, v in base.items()])


def bare_loop_images_per_s(cfg: TrainConfig, steps: int, name: str = "bench-local") -> float:
    """The same loop and train_step without the platform: engine.backend=local (one process, a torch optimizer,
    the shards read in-process), steady-state images/s as the pipeline's figure is measured."""
    engine = cfg.engine.model_copy(update={"backend": "local", "num_workers": 1})
    uri = cfg.tracking.uri.replace("mlflow.db", f"{name}.db")
    local = cfg.model_copy(update={"engine": engine, "optim": cfg.optim.model_copy(update={"total_steps": steps}),
                                   "tracking": cfg.tracking.model_copy(update={"uri": uri})})
    return pipeline_images_per_s(local, name)


def _bare_in_process(cfg_json: str, steps: int, start, out) -> None:
    start.wait()
    out.put(bare_loop_images_per_s(TrainConfig.model_validate_json(cfg_json), steps, f"bench-local-{os.getpid()}"))


def two_bare_loops_images_per_s(cfg: TrainConfig, steps: int) -> float:
    """Two bare loops in two processes at once (images/s summed): what 2 x 1 thread can do on this box."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_bare_in_process, args=(cfg.model_dump_json(), steps, start, out)) for _ in range(2)]
    for proc in procs:
        proc.start()
    start.set()
    total = out.get() + out.get()
    for proc in procs:
        proc.join()
    return total


def pipeline_images_per_s(cfg: TrainConfig, run_name: str) -> float:
    """Steady-state images/s of a real run: the median of rank 0's logged windows after the first."""
    from mlflow.tracking import MlflowClient

    from fewstep.engine import train

    s = train(cfg, run_name=run_name, output_dir=Path(cfg.engine.storage_path).parent / "out")
    history = sorted(MlflowClient(cfg.tracking.uri).get_metric_history(s.run_id, "images_per_s"), key=lambda m: m.step)
    return statistics.median(m.value for m in history[1:] or history)


def _tensors(obj, depth: int = 0):
    """Tensors reachable from a DeepSpeed optimizer's attributes (lists, dicts, nested objects)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple, set)) and depth < 4:
        for o in obj:
            yield from _tensors(o, depth + 1)
    elif isinstance(obj, dict) and depth < 4:
        for o in obj.values():
            yield from _tensors(o, depth + 1)
    elif depth < 2 and type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(obj, "__dict__"):
        for o in vars(obj).values():
            yield from _tensors(o, depth + 1)


def _bytes_loop(loop_config: dict) -> None:
    """Ray Train worker: one ZeRO step on random data; writes this rank's bytes by category."""
    import deepspeed
    import ray.train

    from fewstep.distributed import deepspeed_config
    from fewstep.objectives import build_model, build_objective
    from fewstep.optim import build_optimizer

    cfg = TrainConfig.model_validate(loop_config["config"])
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(cfg)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=build_optimizer(model.parameters(), cfg.optim), config=deepspeed_config(cfg, world)
    )
    micro, c, s = engine.train_micro_batch_size_per_gpu(), cfg.data.channels, cfg.data.image_size
    x, y = torch.rand(micro, c, s, s) * 2 - 1, torch.randint(0, cfg.data.num_classes, (micro,))
    seen: set[int] = set()

    def nbytes(tensors) -> int:
        total = 0
        for t in tensors:
            st = t.untyped_storage()
            if st.nbytes() and st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
        return total

    loss, _ = build_objective(cfg).loss(engine, x, y, 0)
    engine.backward(loss)
    held_after_backward = list(_tensors(engine.optimizer)) + [p.grad for p in model.parameters() if p.grad is not None]
    engine.step()
    inner = engine.optimizer
    while not isinstance(inner, torch.optim.Optimizer):
        inner = inner.optimizer
    out = {"params": nbytes(getattr(p, "ds_tensor", p) for p in engine.module.parameters())}
    masters = [p for g in inner.param_groups for p in g["params"]]
    out["optimizer"] = nbytes(masters + [t for st in inner.state.values() for t in st.values() if torch.is_tensor(t)])
    out["grads_and_buffers"] = nbytes(held_after_backward + list(_tensors(engine.optimizer)))
    Path(loop_config["out"], f"rank{rank}.json").write_text(json.dumps(out))


def zero_bytes(cfg: TrainConfig, tmp: Path, precision: str) -> dict[int, list[dict[str, int]]]:
    """Per-rank bytes after one step under ZeRO 0-3. The bench network's tensors are all smaller than DeepSpeed's
    ZeRO-3 persistence threshold (1e5 elements: such parameters stay whole on every rank), so it is set to 0."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    result = {}
    for stage in range(4):
        out = tmp / f"zero{stage}-{precision}"
        out.mkdir()
        engine = cfg.engine.model_copy(update={"zero_stage": stage, "precision": precision, "zero3_persist_below": 0})
        c = cfg.model_copy(update={"engine": engine})
        TorchTrainer(
            _bytes_loop,
            train_loop_config={"config": c.model_dump(mode="json"), "out": str(out)},
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
            run_config=ray.train.RunConfig(name=f"bytes-zero{stage}-{precision}", storage_path=str(tmp / "runs")),
        ).fit()
        result[stage] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return result


def submit_to_first_step(cfg: TrainConfig, dashboard: str, tmp: Path, runs: int = 2) -> list[float]:
    """`ray job submit` of the real entry point; the clock stops at its first `step 1/` log line."""
    config = tmp / "job.yaml"
    job = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"total_steps": 3}),
                                 "engine": cfg.engine.model_copy(update={"log_every": 1})})  # rank 0 prints "step 1/3"
    config.write_text(to_yaml(job))
    env_vars = {"PYTHONPATH": f"{REPO / 'platform'}{os.pathsep}{REPO}", "MLFLOW_DISABLE_TELEMETRY": "true"}
    seconds = []
    for i in range(runs):
        cmd = [
            str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", dashboard,
            "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--",
            sys.executable, "-m", "pipelines.train", "--config", str(config), "--run-name", f"bench-submit-{i}",
            "--output-dir", str(tmp / "out"),
        ]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        first, lines = None, []
        for line in proc.stdout:
            lines.append(line)
            if first is None and "step 1/" in line:
                first = time.perf_counter() - t0
        if proc.wait() != 0 or first is None:
            tail = "".join(lines[-30:])
            raise RuntimeError(f"job submission {i} failed (exit {proc.returncode}); its last lines:\n{tail}")
        seconds.append(first)
    return seconds


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m pipelines.bench train", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny net and few steps: checks that it runs")
    p.add_argument("--shards", help="training shards (default data/fashion-mnist/train; --quick writes 256)")
    p.add_argument("--batch", type=int, default=32, help="images per worker per step")
    p.add_argument("--steps", type=int, default=120, help="optimizer steps of each timed run")
    p.add_argument("--log-every", type=int, default=20, help="window of the pipeline's images/s")
    p.add_argument("--parts", default="speed,memory,startup", help="comma-separated subset of speed,memory,startup")
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    if args.quick:
        args.batch, args.steps, args.log_every = 8, 12, 4
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    tmp = Path(tempfile.mkdtemp(prefix="fsb-"))  # short: Ray's socket paths live under it
    shards = Path(args.shards or REPO / "data/fashion-mnist/train")
    if args.quick and not args.shards:
        from fewstep.data.shards import write_shards
        from fewstep.data.sources import fashion_mnist

        shards = tmp / "shards"
        write_shards(itertools.islice(fashion_mnist("test"), 256), shards, samples_per_shard=64)
    elif not shards.is_dir():
        raise SystemExit(f"no shards at {shards}: run `make data` or pass --shards DIR")
    one = bench_config(args, shards, tmp, workers=1)
    print(f"model: fashion-ict network, batch {args.batch}/worker, {args.steps} steps, 1 thread per process")

    if "speed" in parts:
        bare = bare_loop_images_per_s(one, args.steps)
        print(f"local backend: {bare:.1f} img/s")
        bare2 = two_bare_loops_images_per_s(one, args.steps)
        print(f"2 local-backend runs in 2 processes at once: {bare2:.1f} img/s in all ({bare2 / bare:.2f}x of one: the "
              "ceiling of this box for 2 x 1 thread)", flush=True)
    import ray

    from fewstep.cluster import start_local

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dash_port = sock.getsockname()[1]
    env_vars = {"PYTHONPATH": f"{REPO / 'platform'}{os.pathsep}{REPO}", "MLFLOW_DISABLE_TELEMETRY": "true"}
    start_local(  # token auth, 127.0.0.1 only
        num_cpus=4, object_store_memory=512 * 1024**2, include_dashboard=True,
        dashboard_host="127.0.0.1", dashboard_port=dash_port, runtime_env={"env_vars": env_vars},
        _temp_dir=str(tmp / "ray"), log_to_driver=False,
    )
    try:
        if "speed" in parts:
            speed(args, one, shards, tmp, bare, bare2)
        if "memory" in parts:
            for precision in ("fp32", "bf16"):
                print_memory(zero_bytes(bench_config(args, shards, tmp, workers=2), tmp, precision), precision)
        if "startup" in parts:
            startup = submit_to_first_step(one, f"http://127.0.0.1:{dash_port}", tmp)
            print(f"4. ray job submit -> first optimizer step: {startup[-1]:.1f} s warm (first submission "
                  f"{startup[0]:.1f} s); goal < 30 s")
    finally:
        ray.shutdown()


def speed(args, one: TrainConfig, shards: Path, tmp: Path, bare: float, bare2: float) -> None:
    one_worker = pipeline_images_per_s(one, "bench-1w")
    print(f"pipeline, 1 worker: {one_worker:.1f} img/s")
    two = bench_config(args, shards, tmp, workers=2)
    two_workers = pipeline_images_per_s(two, "bench-2w")
    print(f"pipeline, 2 workers: {two_workers:.1f} img/s")
    print("\n== figures (one run) ==")
    print(f"1. pipeline / local backend (1 worker x 1 thread): {one_worker / bare:.3f}  (goal >= 0.95; "
          f"{one_worker:.1f} vs {bare:.1f} img/s)")
    print(f"2. 2 workers / 1 worker (1 thread each): {two_workers / one_worker:.2f}x  (goal >= 1.8x; "
          f"{two_workers:.1f} vs {one_worker:.1f} img/s; 2 bare processes reach {bare2 / bare:.2f}x)", flush=True)


def print_memory(memory: dict[int, list[dict[str, int]]], precision: str) -> None:
    print(f"3. per-rank bytes with 2 workers, {precision} (max over ranks): params / grads+buffers / optimizer = total")
    total0 = max(sum(r.values()) for r in memory[0])
    for stage, ranks in memory.items():
        worst = max(ranks, key=lambda r: sum(r.values()))
        total = sum(worst.values())
        print(f"   ZeRO-{stage}: {worst['params']:>12,} / {worst['grads_and_buffers']:>12,} / "
              f"{worst['optimizer']:>12,} = {total:>12,}  ({total / total0:.2f} of ZeRO-0)")
    print("   goal: ZeRO-3 <= 0.55 of ZeRO-0", flush=True)
