"""The denoiser network F: diffusers' UNet2DModel, sized by config from a tiny CPU net to ADM scale."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn


class NetworkConfig(BaseModel):
    """UNet shape. Defaults are a small CPU net; the paper presets override them."""

    model_config = ConfigDict(extra="forbid")
    image_size: int = Field(32, ge=8, description="Input height = width (after padding).")
    in_channels: int = Field(1, ge=1, description="Image channels (1 for Fashion-MNIST, 3 for RGB).")
    channels: list[int] = Field(
        default_factory=lambda: [32, 64, 64], description="Output channels per resolution level."
    )
    attention: list[bool] = Field(
        default_factory=lambda: [False, False, True], description="Self-attention at each level."
    )
    layers_per_block: int = Field(1, ge=1, description="Residual blocks per level.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout in residual blocks (iCT: 0.3 CIFAR-10).")
    num_classes: int = Field(0, ge=0, description="Class-conditional when > 0 (learned class embedding).")
    norm_groups: int = Field(8, ge=1, description="GroupNorm groups; must divide every channel count.")
    attention_head_dim: int = Field(32, ge=1, description="Channels per attention head.")
    mid_attention: bool = Field(True, description="Self-attention in the bottleneck block.")
    # ADM [Dhariwal & Nichol 2021, guided-diffusion `use_scale_shift_norm`, `resblock_updown`], the net of the
    # ImageNet-64 presets; off = diffusers' UNet2DModel defaults (additive time embedding, conv resampling).
    scale_shift_norm: bool = Field(False, description="ADM: the time/class embedding scales and shifts GroupNorm.")
    resblock_updown: bool = Field(False, description="ADM: down/up-sample with residual blocks, not convolutions.")
    noise_embedding_scale: float = Field(
        1000.0, gt=0, description="c_noise is multiplied by this before the sinusoidal embedding [CM code]."
    )
    # ADM's `zero_module` [Dhariwal & Nichol 2021], EDM's `init_zero` [Karras et al. 2022], NCSN++'s init_scale 0:
    # the last conv of every residual block, every attention output projection and the output conv start at zero,
    # so each block starts as the identity and F as 0 (f = c_skip x). diffusers' UNet2DModel does not do this.
    zero_init: bool = Field(False, description="Zero-initialise residual-branch outputs and the output conv (ADM).")

    @model_validator(mode="after")
    def _check(self) -> NetworkConfig:
        if len(self.attention) != len(self.channels):
            raise ValueError(
                f"network.attention has {len(self.attention)} entries but network.channels has "
                f"{len(self.channels)}: give one flag per level"
            )
        bad = [c for c in self.channels if c % self.norm_groups]
        if bad:
            raise ValueError(f"network.norm_groups={self.norm_groups} does not divide network.channels {bad}")
        attn = [c for c, a in zip(self.channels, self.attention, strict=True) if a]
        attn += [self.channels[-1]] if self.mid_attention else []
        if any(c % self.attention_head_dim for c in attn):
            raise ValueError(
                f"network.attention_head_dim={self.attention_head_dim} must divide the channels of every "
                f"attention level {attn}"
            )
        if self.image_size % 2 ** (len(self.channels) - 1):
            raise ValueError(
                f"network.image_size={self.image_size} is not divisible by 2^(levels-1) for "
                f"{len(self.channels)} levels"
            )
        return self


def shared_unet_args(cfg: NetworkConfig, down: tuple[str, ...], up: tuple[str, ...]) -> dict:
    """The constructor arguments diffusers' UNet2DModel and UNet2DConditionModel take alike from the config."""
    return dict(
        sample_size=cfg.image_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        block_out_channels=tuple(cfg.channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        dropout=cfg.dropout,
        norm_num_groups=cfg.norm_groups,
    )


def zero_init_residuals(unet: nn.Module) -> None:
    """Zero the output layer of every residual branch (ResnetBlock2D.conv2, Attention.to_out[0]) and the UNet's
    conv_out: the initialisation of the papers' networks (NetworkConfig.zero_init)."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    layers = [m.conv2 for m in unet.modules() if isinstance(m, ResnetBlock2D)]
    layers += [m.to_out[0] for m in unet.modules() if isinstance(m, Attention)]
    layers.append(unet.conv_out)
    for layer in layers:
        nn.init.zeros_(layer.weight)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


class UNet(nn.Module):
    """F(x, c_noise, class_labels) -> same shape as x."""

    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        self.cfg = cfg
        plain_down, plain_up = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if cfg.resblock_updown else (
            "DownBlock2D", "UpBlock2D")
        down = tuple("AttnDownBlock2D" if a else plain_down for a in cfg.attention)
        up = tuple("AttnUpBlock2D" if a else plain_up for a in reversed(cfg.attention))
        resample = "resnet" if cfg.resblock_updown else "conv"  # the attention blocks' own resampling
        from diffusers import UNet2DModel  # imported when a net is built: config readers (every job driver) skip it

        self.unet = UNet2DModel(
            **shared_unet_args(cfg, down, up),
            attention_head_dim=cfg.attention_head_dim,
            num_class_embeds=cfg.num_classes or None,
            add_attention=cfg.mid_attention,
            resnet_time_scale_shift="scale_shift" if cfg.scale_shift_norm else "default",
            downsample_type=resample,
            upsample_type=resample,
        )
        if cfg.zero_init:
            zero_init_residuals(self.unet)

    def forward(
        self, x: torch.Tensor, noise_cond: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.cfg.num_classes and class_labels is None:
            raise ValueError("this network is class-conditional (network.num_classes > 0): pass class_labels")
        t = noise_cond * self.cfg.noise_embedding_scale  # (B,)
        labels = class_labels if self.cfg.num_classes else None
        return self.unet(x, t, class_labels=labels).sample


class TextUNet(nn.Module):
    """F(x, c_noise, cond) for text-to-image: diffusers' UNet2DConditionModel with cross-attention on the text
    encoder's token states at the `network.attention` levels and in the bottleneck, and the pooled text embedding
    projected and added to the time embedding (class_embed_type="projection"). cond: fewstep.text.Cond."""

    def __init__(self, cfg: NetworkConfig, text_dim: int):
        super().__init__()
        self.cfg = cfg
        down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention)
        up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention))
        from diffusers import UNet2DConditionModel

        self.unet = UNet2DConditionModel(
            **shared_unet_args(cfg, down, up),
            mid_block_type="UNetMidBlock2DCrossAttn" if cfg.mid_attention else None,
            # UNet2DConditionModel reads attention_head_dim as the number of heads (diffusers' naming): give heads
            attention_head_dim=tuple(max(1, c // cfg.attention_head_dim) for c in cfg.channels),
            cross_attention_dim=text_dim,
            class_embed_type="projection",
            projection_class_embeddings_input_dim=text_dim,
        )
        if cfg.zero_init:
            zero_init_residuals(self.unet)

    def forward(self, x: torch.Tensor, noise_cond: torch.Tensor, cond: dict[str, torch.Tensor] | None = None
                ) -> torch.Tensor:
        if not isinstance(cond, dict):
            raise ValueError("this network is text-conditioned (text.enabled): pass the text encoder's conditioning")
        dtype = x.dtype  # bf16/fp16 under mixed precision: the frozen encoder's fp32 outputs follow
        t = noise_cond * self.cfg.noise_embedding_scale  # (B,)
        return self.unet(
            x, t, encoder_hidden_states=cond["states"].to(x.device, dtype),
            encoder_attention_mask=cond["mask"].to(x.device), class_labels=cond["pooled"].to(x.device, dtype),
        ).sample


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
