"""The controller's policies, by name. Each is a module of pure functions (see base.py)."""

from __future__ import annotations

from types import ModuleType

from flexnpu.control.policies import flexpd, passthrough, static_split

POLICIES: dict[str, ModuleType] = {m.NAME: m for m in (passthrough, static_split, flexpd)}
