"""Model references: one parser for registry URIs, resolved against a real MLflow registry (sqlite backend)."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from fewstep import modelref
from fewstep.config import ConfigError
from fewstep.teacher import pin


@pytest.mark.parametrize("uri, name, alias, version", [
    ("models:/m@champion", "m", "champion", None),
    ("models:/fewstep-fashion-ict/12", "fewstep-fashion-ict", None, "12"),
    ("models:/m/latest", "m", None, "latest"),
])
def test_registry_uris_parse_to_name_and_one_of_alias_or_version(uri, name, alias, version):
    r = modelref.parse(uri)
    assert (r.name, r.alias, r.version) == (name, alias, version)
    assert str(r) == uri
    assert r.pinned == (version not in (None, "latest"))


@pytest.mark.parametrize("uri", ["models:/", "models:/m", "models:/m/v1", "models:/m@", "models:/m/1/extra", "runs:/x"])
def test_malformed_registry_uris_are_refused_naming_the_uri(uri):
    with pytest.raises(modelref.ModelRefError, match="expected models:/NAME@ALIAS"):
        modelref.parse(uri)


@pytest.fixture()
def registry(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("m")
    for _ in range(3):
        client.create_model_version("m", source=str(tmp_path))
    client.set_registered_model_alias("m", "champion", "2")
    return uri


def test_pin_resolves_aliases_and_latest_to_the_version_they_point_at_now(registry, tmp_path):
    assert modelref.pin("models:/m@champion", registry) == "models:/m/2"
    assert modelref.pin("models:/m/latest", registry) == "models:/m/3"
    assert modelref.pin("models:/m/1", registry) == "models:/m/1"
    assert modelref.version_of("models:/m@champion", registry) == ("m", "2")
    assert modelref.version_of(str(tmp_path), registry) is None
    assert modelref.pin(".", registry) == str(tmp_path.cwd().resolve())


def test_unknown_models_and_aliases_name_the_reference_and_the_config_field(registry):
    with pytest.raises(modelref.ModelRefError, match=r"'models:/m@nope': not found in the registry"):
        modelref.pin("models:/m@nope", registry)
    with pytest.raises(modelref.ModelRefError, match=r"'models:/other/latest'"):
        modelref.pin("models:/other/latest", registry)
    with pytest.raises(ConfigError, match=r"^objective.init_from='models:/other@champion': not found"):
        pin("models:/other@champion", registry, field="objective.init_from")
