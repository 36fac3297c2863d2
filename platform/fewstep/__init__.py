"""fewstep: distributed training of few-step image generators (consistency models) on Ray."""

__version__ = "0.1.0"
