"""The registered model, logged to MLflow as a model *from code* (no pickled Python objects).

MLflow executes this file when it loads the model; weights come from the `model` artifact directory
(safetensors + config.yaml), and `fewstep` itself travels in the model's `code/` directory.
"""

from __future__ import annotations

import base64
import io
import os

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from fewstep.generator import Generator
from fewstep.images import to_pil

MAX_STEPS = 1000  # a request cannot buy unbounded compute
MAX_PROMPT_CHARS = 1000


class FewstepModel(PythonModel):
    """Input: a DataFrame with one row per image (`class_label` for class-conditional models).
    Params: `num_steps` (sampler steps), `seed`, `sampler` (ddim | addim for multistep/diffusion models, ict for
    iCT models; default: the objective's), `output`: `array` = uint8 images (N, H, W, C), `png` = a list of N
    base64 PNG strings; default png under `mlflow models serve` (MLflow marks its serving process), else array.
    Text-to-image models: a `prompt` column (one image per prompt) and, for diffusion models, the param
    `guidance` (classifier-free guidance w).
    A request asks for at most `serving.max_images` images (the model's config; default 256).
    A bad request (more images, a class label that is not an integer, an unknown class, a step count or sampler the
    objective cannot honour, a prompt to a class-conditional model, an oversized, empty or missing prompt) raises
    MlflowException(INVALID_PARAMETER_VALUE) naming the input and what is allowed: HTTP 400 with that message when
    served."""

    def load_context(self, context) -> None:
        self.generator = Generator.from_dir(context.artifacts["model"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray | list[str]:
        try:
            return self._predict(model_input, params or {})
        except ValueError as e:  # the generator's own checks: a client error, not a server failure
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None

    def _predict(self, model_input: pd.DataFrame, params: dict) -> np.ndarray | list[str]:
        num_steps, seed = int(params.get("num_steps", 1)), int(params.get("seed", 0))
        if not 1 <= num_steps <= MAX_STEPS:
            raise ValueError(f"num_steps={num_steps} is out of range: give 1..{MAX_STEPS} sampling steps")
        sampler = params.get("sampler") or None
        output = params.get("output") or ("png" if os.environ.get("_MLFLOW_IS_IN_SERVING_ENVIRONMENT") else "array")
        if output not in ("array", "png"):
            raise ValueError(f"output={output!r}: choose array (uint8 images) or png (base64 PNG strings)")
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        limit = self.generator.cfg.serving.max_images
        if len(model_input) > limit:
            raise ValueError(f"the request asks for {len(model_input)} images; at most serving.max_images={limit} "
                             "are allowed per request")
        if "prompt" in model_input.columns and model_input["prompt"].notna().any():
            longest = int(model_input["prompt"].astype(str).str.len().max())
            if longest > MAX_PROMPT_CHARS:
                raise ValueError(f"prompt is {longest} characters long; at most {MAX_PROMPT_CHARS} are accepted")
            if not self.generator.text:
                raise ValueError("this model is conditioned on class labels, not text: send `class_label`, "
                                 "not `prompt`")
        if self.generator.text:
            images = self._generate_text(model_input, params, num_steps, seed, sampler)
        else:
            labels = None
            if self.generator.conditional:
                if "class_label" not in model_input.columns:
                    raise ValueError("this model is class-conditional: the input needs a `class_label` column")
                labels = integer_labels(model_input["class_label"])
            images = self.generator.generate(
                len(model_input), num_steps=num_steps, seed=seed, labels=labels, sampler=sampler
            )
        return images if output == "array" else [png_base64(x) for x in images]

    def _generate_text(self, frame: pd.DataFrame, params: dict, num_steps: int, seed: int, sampler) -> np.ndarray:
        if "prompt" not in frame.columns:
            raise ValueError(f"this text-to-image model needs a `prompt` column; got columns {list(frame.columns)}")
        prompts = frame["prompt"].tolist()
        if not prompts:
            raise ValueError("the `prompt` column is empty: give at least one prompt")
        if any(not isinstance(p, str) for p in prompts):
            raise ValueError("every `prompt` must be a string")
        guidance = params.get("guidance")
        guidance = None if guidance is None or not self.generator.capabilities.guidance else float(guidance)
        return self.generator.generate(len(prompts), num_steps=num_steps, seed=seed, labels=prompts,
                                       sampler=sampler, guidance=guidance)


def integer_labels(column: pd.Series) -> np.ndarray:
    """The class labels as int64; a value that is not an integer (3.7, "x", a missing one) is refused, not
    truncated."""
    for value in column.tolist():
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        ok = ok or (isinstance(value, (float, np.floating)) and float(value).is_integer())
        if not ok:
            raise ValueError(f"class_label {value!r} is not an integer: give integer class labels")
    return column.to_numpy(dtype=np.int64)


def png_base64(image: np.ndarray) -> str:
    """(H, W, C) uint8 -> base64 of a PNG file (grey for C = 1)."""
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


mlflow.models.set_model(FewstepModel())
