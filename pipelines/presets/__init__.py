"""Named presets: YAML files beside this module (outside the library)."""

from __future__ import annotations

import difflib
from pathlib import Path

from fewstep.config import ConfigError

PRESET_DIR = Path(__file__).parent


def available() -> list[str]:
    """Preset names; files starting with `_` are shared bases (`base: _fashion.yaml`), not presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.name.startswith("_"))


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if name.startswith("_") or not path.is_file():
        close = difflib.get_close_matches(name, available(), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"unknown preset {name!r}; {hint}available: {', '.join(available())}")
    return path
