"""The forwarding layer: the LD_PRELOAD shim (native/shim.c), the per-device forwarding
daemon and its control API, and `flexnpu run`."""
