"""The registered model, logged to MLflow as a model *from code* (no pickled Python objects).

MLflow executes this file when it loads the model; weights come from the `model` artifact directory
(safetensors + config.yaml), and `fewstep` itself travels in the model's `code/` directory.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from fewstep.generator import Generator


class FewstepModel(PythonModel):
    """Input: a DataFrame with one row per image (`class_label` for class-conditional models).
    Params: `num_steps` (sampler steps), `seed`, `sampler` (ddim | addim for multistep/diffusion models, ict for
    iCT models; default: the objective's). Output: uint8 images (N, H, W, C). A step count or sampler the
    objective cannot honour raises ValueError naming the param and what is allowed."""

    def load_context(self, context) -> None:
        self.generator = Generator.from_dir(context.artifacts["model"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        params = params or {}
        num_steps, seed = int(params.get("num_steps", 1)), int(params.get("seed", 0))
        sampler = params.get("sampler") or None
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        labels = None
        if self.generator.conditional:
            if "class_label" not in model_input.columns:
                raise ValueError("this model is class-conditional: the input needs a `class_label` column")
            labels = model_input["class_label"].to_numpy(dtype=np.int64)
        return self.generator.generate(
            len(model_input), num_steps=num_steps, seed=seed, labels=labels, sampler=sampler
        )


mlflow.models.set_model(FewstepModel())
