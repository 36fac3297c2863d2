"""The one error path of every command line: a problem the user can fix (a bad argument or config value, missing
shards, an unknown registered model, an unreachable server) prints one line `error: ...` that names it and says how
to fix it, and exits 2, without a traceback; `--debug` prints the traceback too. Anything else is a bug and keeps
its traceback.

Usage: decorate a CLI's `main(argv) -> int` with `@command` and build its parser with `ArgumentParser` (which adds
`--debug` and turns argparse's usage errors into the same one line). Stdlib only: the job driver imports this.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import traceback
from collections.abc import Callable

USER_ERROR = 2  # the exit status of every user error (argparse's own convention)
INTERRUPTED = 130


class UserError(Exception):
    """A problem the user can fix; the message names what is wrong and how to fix it."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with `--debug` and usage errors raised as UserError (one `error:` line, exit 2)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="on an error, also print the full traceback")

    def error(self, message: str):  # argparse calls this for every usage error
        raise UserError(f"{message} (see {self.prog} --help)")


def add_address(p: argparse.ArgumentParser) -> None:
    """`--address`: which Ray cluster a run (or sweep) uses; `address_override` turns it into its config override."""
    p.add_argument("--address", help="Ray cluster: local (a private one), auto (`ray start` on this machine), "
                   "HOST:PORT; default: $RAY_ADDRESS, else local (engine.ray_address)")


def address_override(args: argparse.Namespace) -> list[str]:
    """[] or ["engine.ray_address=..."], appended after the user's --set (the flag wins)."""
    return [f"engine.ray_address={json.dumps(args.address)}"] if args.address else []


def step_list(text: str) -> list[int]:
    """`--steps 1,2` -> [1, 2] (an argparse type)."""
    try:
        steps = [int(s) for s in text.split(",")]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of step counts >= 1, e.g. 1,2")
    return steps


def _mlflow_message(e: BaseException) -> str | None:
    """An MLflow error a user caused (an unknown model or alias, a refused parameter), else None."""
    exceptions = sys.modules.get("mlflow.exceptions")  # loaded if MLflow raised it: no import here
    if exceptions is None or not isinstance(e, exceptions.MlflowException):
        return None
    code = e.error_code
    if code == "RESOURCE_DOES_NOT_EXIST":
        uri = sys.modules["mlflow"].get_tracking_uri()
        return (f"{e.message} (in the MLflow registry at {uri}): check the model name and alias in the MLflow UI "
                "(Models), or point --tracking-uri / MLFLOW_TRACKING_URI at the server that holds it")
    if code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED"):
        return e.message
    return None


def user_message(e: BaseException) -> str | None:
    """The one-line message of a user error; None for anything else (a bug: it keeps its traceback)."""
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, FileNotFoundError):  # shards, config files, model directories: the message names the path
        return f"{e.strerror}: {e.filename}" if e.filename else str(e)
    if isinstance(e, ConnectionError) or type(e).__name__ == "ConnectionError":  # requests' is not a builtin one
        return f"cannot connect: {e}"
    return _mlflow_message(e)


def command(main: Callable[[list[str]], int | None]) -> Callable[[list[str] | None], int]:
    """Decorate a CLI's `main(argv)`: user errors become one `error:` line on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        argv = sys.argv[1:] if argv is None else list(argv)
        debug = "--debug" in argv or bool(os.environ.get("FEWSTEP_DEBUG"))
        try:
            return main(argv) or 0
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return INTERRUPTED
        except Exception as e:
            message = user_message(e)
            if message is None:
                raise
            if debug:
                traceback.print_exc()
            first, *rest = message.strip().splitlines() or [type(e).__name__]
            print("\n".join([f"error: {first}", *rest]), file=sys.stderr)
            return USER_ERROR

    return wrapper
