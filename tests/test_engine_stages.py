"""ZeRO stages and offload modes through the same engine code, for real (local Ray, 2 DeepSpeed workers, MLflow
server): a few steps each, one of them a NaN loss the guard must skip on both ranks; the registered student is
the consolidation of the final checkpoint, and it must equal the parameters the workers gathered (ema.decay = 0
makes the EMA export a copy of the gathered student). Two jobs, each carrying every option valid with it:

- zero0 fp32 + activation checkpointing: plain fp32 at stage 0 has no optimizer partitions, so the export takes
  the module state itself (the stage-0 branch of `consolidated_state_dict`); offloading needs stage >= 1.
- zero3 bf16 + parameter and optimizer offload: DeepSpeed's zero_to_fp32 merges the ranks' partitioned fp32
  masters; the partitioned parameters are bf16, and the export is still a plain fp32 model that loads without
  DeepSpeed.

ZeRO-2 (zero_to_fp32 over stage 1/2 partitions) is the spine run in test_train_integration.py; ZeRO-1 shares
that stage-1/2 optimizer and is not run separately, nor is optimizer offload at stage 1/2 (offload runs at
stage 3 here). Activation checkpointing's gradients are checked against plain backward in test_engine_config.py.
"""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from test_train_integration import tiny_config

from fewstep.engine import train
from fewstep.generator import STUDENT_WEIGHTS, WEIGHTS, Generator
from fewstep.objectives import build_model

pytestmark = pytest.mark.integration

CASES = {
    "zero0-activation-checkpointing": {"engine.zero_stage": 0, "engine.activation_checkpointing": True},
    "zero3-bf16-offload-params-and-optimizer": {
        "engine.zero_stage": 3, "engine.precision": "bf16", "engine.offload_params": True,
        "engine.offload_optimizer": True,
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_zero_stage_trains_skips_nan_and_consolidates_to_the_gathered_weights(
    case, ray_cluster, mlflow_server, shards, tmp_path
):
    cfg = tiny_config(
        shards, mlflow_server, tmp_path / "runs",
        **{
            **CASES[case],
            "optim.total_steps": 3,
            "engine.checkpoint_every": 3,
            "eval.every": 3,
            "eval.steps": [1],
            "ema.decay": 0.0,
            "engine.debug": {"nan_batches": [2]},
            "tracking.registered_model": None,
        },
    )
    s = train(cfg, run_name=f"it-{case}", output_dir=tmp_path / "out")
    assert s.steps == 3
    client = MlflowClient(mlflow_server)
    assert sorted(m.step for m in client.get_metric_history(s.run_id, "loss")) == [1, 2, 3]
    assert client.get_metric_history(s.run_id, "skipped_steps")[-1].value == 1

    model_dir = tmp_path / "out" / f"it-{case}" / "model"
    student, gathered = load_file(str(model_dir / STUDENT_WEIGHTS)), load_file(str(model_dir / WEIGHTS))
    assert student.keys() == gathered.keys()
    bf16 = cfg.engine.precision == "bf16"
    for k in student:
        assert student[k].dtype == torch.float32 and gathered[k].dtype == torch.float32, k
        # bf16: the parameters the workers gather are exactly zero_to_fp32's fp32 masters rounded to bf16
        assert torch.equal(student[k].bfloat16().float() if bf16 else student[k], gathered[k]), k
    if bf16:  # and the registered student keeps the fp32 masters' precision, not bf16's
        assert any(not torch.equal(student[k], gathered[k]) for k in student)
    # and it trained: the consolidated weights are not the initial ones (the workers seed the same way)
    torch.manual_seed(cfg.seed)
    initial = build_model(cfg).state_dict()
    assert any(not torch.equal(initial[k], student[k]) for k in student)
    gen = Generator.from_dir(model_dir, weights=STUDENT_WEIGHTS)  # loads without DeepSpeed
    assert gen.generate(2, num_steps=1, labels=[0, 1]).shape == (2, 32, 32, 1)
