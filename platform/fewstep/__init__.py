"""fewstep: distributed training of few-step image generators (consistency models) on Ray."""

__version__ = "0.1.0"

from fewstep.console import quiet_known_noise  # noqa: E402

quiet_known_noise()  # before DeepSpeed or Ray log anything, on the driver and in every worker
