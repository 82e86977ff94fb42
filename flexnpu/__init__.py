"""FlexNPU: transparent sharing of AI accelerators between LLM serving processes.

Observe every process's device work with uprobes, gate when it is dispatched, and
interleave prefill and decode instances that share a device.
"""

__version__ = "0.1.0"
SCHEMA = 1  # every JSON message and --json output carries {"schema": SCHEMA}
