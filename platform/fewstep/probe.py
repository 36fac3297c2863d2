"""Is the MLflow server there? A probe that answers in seconds, so that a command fails fast with a clear message
instead of letting MLflow's client retry for minutes. Stdlib only: commands call it before importing MLflow."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

from fewstep.cli import UserError

TIMEOUT_S = 5.0


def check_reachable(uri: str, fix: str = "run `make up` or set tracking.uri", timeout: float = TIMEOUT_S) -> None:
    """An http(s) tracking server must answer within `timeout` seconds; other URIs (sqlite, file, databricks) are
    not probed. UserError names the URI and `fix` otherwise."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered (a proxy in front may refuse /health)
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(f"MLflow at {uri} is not reachable ({reason}): {fix}") from None


def check_model_server(ref: str, tracking_uri: str | None = None) -> None:
    """A registry or run URI (`models:/`, `runs:/`) needs its tracking server: probed as `check_reachable`."""
    if ref.startswith(("models:/", "runs:/")):
        check_reachable(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", ""),
                        fix="start it (`make up`), or point --tracking-uri / MLFLOW_TRACKING_URI at it")
