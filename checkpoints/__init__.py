"""Model presets (name -> where the weights come from) and conversion helpers. Never weights."""

from checkpoints.presets import PRESETS, SHAPES, Preset, resolve_preset

__all__ = ["PRESETS", "SHAPES", "Preset", "resolve_preset"]
