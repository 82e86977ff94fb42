"""passthrough: every gate open, no budget. Uncontrolled sharing, the baseline to compare with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flexnpu.control.policies.base import Clients, PolicyOutput, all_open
from flexnpu.snapshot import NodeSnapshot

NAME = "passthrough"


@dataclass(frozen=True)
class Options:
    """No keys: [policy.passthrough] may be empty."""


def initial_state() -> None:
    return None


def decide(snapshot: NodeSnapshot | None, clients: Clients, state: Any, options: Options, now_ns: int,
           stale_after_ms: float = 1000.0, roles: Any = None) -> PolicyOutput:
    settings, reasons = all_open(clients, "passthrough: gate open, no budget")
    return PolicyOutput(settings, None, reasons)


def describe(state: Any, device: int) -> str:
    return "passthrough: every gate open"
