"""Named presets: YAML files beside this module (outside the library)."""

from __future__ import annotations

from pathlib import Path

PRESET_DIR = Path(__file__).parent


def available() -> list[str]:
    """Preset names; files starting with `_` are shared bases (`base: _fashion.yaml`), not presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.name.startswith("_"))


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if name.startswith("_") or not path.is_file():
        raise SystemExit(f"unknown preset {name!r}; available: {', '.join(available())}")
    return path
