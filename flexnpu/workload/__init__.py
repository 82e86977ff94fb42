"""A reference LLM serving workload for the emulated (or a real) Ascend device.

Layers, each usable alone:

- `model`: model configs and the kernels one engine step launches, with their cost (pure);
- `trace`: request traces, generated (Poisson / gamma arrivals, ShareGPT-like lengths) or
  loaded from Azure LLM inference CSV files;
- `metrics`: TTFT, TPOT, ITL, throughput and goodput as vLLM's serving benchmark defines them (pure);
- `acl` and `instance`: the serving instances, plain AscendCL programs driven over pipes;
- `driver`: replays a trace through a prefill and a decode instance and returns metrics,
  checked against the emulator's own accounting.
"""
