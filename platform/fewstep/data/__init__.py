"""The data plane: sources -> WebDataset shards -> Ray Data -> training workers."""

from fewstep.data.config import DataConfig

__all__ = ["DataConfig"]
