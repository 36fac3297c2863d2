"""What a run prints, in one place: progress lines (`say`), their elapsed time and ETA, how to open a local MLflow
store, and the known harmless warnings kept out of the default output (`quiet_known_noise`, installed when
`fewstep` is imported, so in Ray workers too).

`say` writes through its own logger straight to stdout. A plain `print` in a Ray Train worker appears twice in
`ray job submit` output: Train's print patch logs it to the worker's root logger *and* echoes it, because Ray
workers wrap sys.stdout."""

from __future__ import annotations

import logging
import sys
import warnings

CONSOLE = "fewstep.console"

# Logger name -> message prefixes that say nothing a user can act on.
HARMLESS_LOGS: dict[str, tuple[str, ...]] = {
    # every DeepSpeed import on a machine without GPUs; CPU training is what the config asked for
    "DeepSpeed": ("Setting accelerator to CPU",),
}
# (category, message regex): warnings raised inside libraries, not by fewstep's calls
HARMLESS_WARNINGS: list[tuple[type[Warning], str]] = [
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),  # DeepSpeed ZeRO's gathers
    # MLflow, when a model is logged with a signature but no input example (fewstep logs the signature on purpose)
    (UserWarning, r"(\x1b\[[0-9;]*m)?An input example was not provided"),
]


class _Stdout(logging.StreamHandler):
    """sys.stdout as it is when the line is written (Ray workers and pytest replace it)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):  # noqa: D102
        return sys.stdout


def console() -> logging.Logger:
    logger = logging.getLogger(CONSOLE)
    if not logger.handlers:
        logger.addHandler(_Stdout())
        logger.setLevel(logging.INFO)
        logger.propagate = False  # not again through the root logger (Ray Train configures one in workers)
    return logger


def say(message: str) -> None:
    """One line on stdout, once, on the driver and in Ray workers alike."""
    console().info(message)


class DropHarmless(logging.Filter):
    """Drops records whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_known_noise() -> None:
    """Install the filters of HARMLESS_LOGS and HARMLESS_WARNINGS (idempotent; before the libraries log)."""
    for name, prefixes in HARMLESS_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropHarmless) for f in logger.filters):
            logger.addFilter(DropHarmless(prefixes))
    for category, message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def duration(seconds: float) -> str:
    """42s, 3m05s, 1h02m."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def timing(step: int, total: int, first_step: int, elapsed: float) -> str:
    """'elapsed 3m05s, ETA 12m40s': the ETA extrapolates this attempt's pace (steps since `first_step`)."""
    done = step - first_step
    if done <= 0 or step >= total:
        return f"elapsed {duration(elapsed)}"
    return f"elapsed {duration(elapsed)}, ETA {duration(elapsed / done * (total - step))}"


def ui_hint(uri: str) -> str | None:
    """How to browse a file-backed MLflow store (a tracking server shows its own UI)."""
    if uri.startswith("sqlite:"):
        return f"MLflow UI: mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)"
    return None
