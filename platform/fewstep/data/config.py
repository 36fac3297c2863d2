"""Data configuration, owned by the data plane."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class DataConfig(BaseModel):
    """Where training images come from and how they are shaped before they reach a worker."""

    model_config = ConfigDict(extra="forbid")
    shards: str = Field(
        "data/fashion-mnist/train",
        description="Training WebDataset shards: a directory of .tar files, a glob, or a brace pattern.",
    )
    test_shards: str | None = Field(
        "data/fashion-mnist/test", description="Held-out shards (FID reference statistics)."
    )
    image_size: int = Field(32, ge=8, description="Images are centre-padded (never cropped) to this size.")
    channels: int = Field(1, ge=1, description="Image channels after decoding (1 = grayscale, 3 = RGB).")
    num_classes: int = Field(10, ge=0, description="Number of classes in `.cls`; 0 = ignore labels.")
    shuffle_seed: int = Field(0, description="Seed of the per-epoch shard order and the local shuffle buffer.")
    shuffle_buffer: int = Field(2048, ge=0, description="Rows in each worker's local shuffle buffer; 0 = off.")
