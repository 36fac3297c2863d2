"""References to a model: the one place registry URIs are parsed and resolved.

A model is named by a registry URI, `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `models:/NAME/latest`,
or by a local directory holding `weights.safetensors` + `config.yaml` (an export, a Ray Train checkpoint's
`model/`, or a downloaded MLflow model's `artifacts/model/`). `pin` turns an alias (or `latest`) into the version
it points at now, so a run that starts from a model keeps using that version even if the alias moves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fewstep.cli import UserError

_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+|latest))")


class ModelRefError(UserError, ValueError):
    """A model reference that cannot be parsed or resolved; the message names the reference."""


@dataclass(frozen=True)
class RegistryRef:
    """A parsed `models:/` URI: a name and exactly one of alias or version (a number or `latest`)."""

    name: str
    alias: str | None = None
    version: str | None = None

    @property
    def pinned(self) -> bool:
        return self.version is not None and self.version != "latest"

    def __str__(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def is_registry_uri(ref: str) -> bool:
    return ref.startswith("models:/")


def parse(ref: str) -> RegistryRef:
    """`models:/NAME@ALIAS`, `models:/NAME/VERSION` or `models:/NAME/latest` -> RegistryRef."""
    m = _URI.fullmatch(ref)
    if not m:
        raise ModelRefError(f"{ref!r}: expected models:/NAME@ALIAS, models:/NAME/VERSION or models:/NAME/latest")
    return RegistryRef(m["name"], m["alias"], m["version"])


def client(tracking_uri: str | None = None) -> MlflowClient:
    return MlflowClient(tracking_uri, registry_uri=tracking_uri) if tracking_uri else MlflowClient()


def pin(ref: str, tracking_uri: str | None = None) -> str:
    """A registry URI -> `models:/NAME/VERSION` (the version its alias or `latest` points at now); a directory ->
    its absolute path (Ray workers do not run in the driver's working directory)."""
    if not is_registry_uri(ref):
        return str(Path(ref).expanduser().resolve())
    r = parse(ref)
    if r.pinned:
        return str(r)
    c = client(tracking_uri)
    where = f"the registry at {tracking_uri}" if tracking_uri else "the registry"
    try:
        if r.alias:
            version = c.get_model_version_by_alias(r.name, r.alias).version
        else:
            versions = c.search_model_versions(f"name = '{r.name}'")
            if not versions:
                raise ModelRefError(f"{ref!r}: the registered model {r.name!r} has no versions in {where}")
            version = max(int(v.version) for v in versions)
    except MlflowException as e:
        raise ModelRefError(f"{ref!r}: not found in {where}: {e.message}") from None
    return f"models:/{r.name}/{version}"


def version_of(ref: str, tracking_uri: str | None = None) -> tuple[str, str] | None:
    """A registry URI -> (name, version) it resolves to now; anything else (a directory, runs:/) -> None."""
    if not is_registry_uri(ref):
        return None
    r = parse(pin(ref, tracking_uri))
    return r.name, str(r.version)
