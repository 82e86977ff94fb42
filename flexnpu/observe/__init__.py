"""Observe: what every process does on every device, seen from outside the process.

bcc loads uprobes on the runtime library (probes/, generated per symbol from the runtime
profile by probegen); bpf reads the kernel maps; snapshot turns reads into per-interval
snapshots with rates and phases (phase.PhaseClassifier); attach and node are the
`flexnpu attach` and `flexnpu observe` commands. Without BPF, shimsource reads the
shim's own counters from the gate segments instead.
"""
