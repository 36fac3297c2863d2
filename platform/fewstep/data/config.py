"""Data configuration, owned by the data plane."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class DataConfig(BaseModel):
    """Where training images come from, how bad samples are handled, and how images are shaped and
    augmented before they reach a worker."""

    model_config = ConfigDict(extra="forbid")
    shards: str = Field(
        "data/fashion-mnist/train",
        description="Training WebDataset shards: a directory of .tar files, a glob, a brace pattern "
        "(dir/train-{000000..000099}.tar), or the same under s3:// or gs:// (credentials from the environment).",
    )
    test_shards: str | None = Field(
        "data/fashion-mnist/test", description="Held-out shards (FID reference statistics)."
    )
    image_size: int = Field(32, ge=8, description="Images are centre-padded (never cropped) to this size.")
    channels: int = Field(1, ge=1, description="Image channels after decoding (1 = grayscale, 3 = RGB).")
    num_classes: int = Field(10, ge=0, description="Number of classes in the label member; 0 = ignore labels.")
    # Member names: existing shards are read as they are, with their suffixes mapped here (not rewritten).
    image_ext: list[str] = Field(
        ["png", "jpg", "jpeg", "webp"], min_length=1, description="Suffixes of the image member (exactly one)."
    )
    label_ext: str = Field("cls", description="Suffix of the class-index member (ascii int), e.g. cls.")
    caption_ext: str = Field("txt", description="Suffix of the caption member (utf-8 text).")
    require_caption: bool = Field(False, description="A sample without a caption is bad data.")
    convert_mode: bool = Field(
        False, description="Convert every image to `channels` (L or RGB), e.g. ImageNet's grayscale and CMYK "
        "JPEGs; off: an image with other channels is bad data (wrong_mode).",
    )
    resize: Literal["none", "box"] = Field(
        "none", description="none: images must fit image_size (padded); box: area-resize every image to "
        "image_size x image_size, as downsampled ImageNet does.",
    )
    # Bad data: see README "Bad data" and samples.REASONS.
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="fail: the first bad sample stops training with an error naming shard and key; "
        "skip: drop it, count it by reason (MLflow data_skipped_*), fail past max_skip_fraction.",
    )
    max_skip_fraction: float = Field(
        0.01, ge=0.0, le=1.0, description="With on_error=skip: fail once skipped / read samples exceeds this "
        "(checked per rank after every shard).",
    )
    # Order and augmentation (applied in Ray Data, not in the training step).
    shuffle_seed: int = Field(0, description="Seed of the per-epoch shard order and the local shuffle buffer.")
    shuffle_buffer: int = Field(2048, ge=0, description="Rows in each worker's local shuffle buffer; 0 = off.")
    read_tasks: int | None = Field(
        2, ge=1, description="Shard read tasks in flight per training rank (None: Ray Data decides). Each needs a "
        "worker process; 2 keep a CPU rank fed (decoding runs ~30x faster than a CPU step) without the cold start "
        "of one process per shard. Raise it for GPU training."
    )
    hflip: bool = Field(False, description="Random horizontal flips (p = 0.5, seeded per sample and epoch).")

    @field_validator("shards", mode="before")
    @classmethod
    def _given(cls, v):
        if v is None or (isinstance(v, str) and not v.strip()):
            raise ValueError("no training shards given: set data.shards to a directory of .tar shards, a glob or a "
                             "brace pattern (python -m pipelines.prepare_data writes them)")
        return v
