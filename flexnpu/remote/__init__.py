"""FlexNPU seen from other nodes: CURVE keys, publishing snapshots and decisions on TCP, and
subscribing to several nodes (`flexnpu top --nodes`)."""
