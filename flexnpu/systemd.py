"""A tiny sd_notify: tells systemd about readiness when run as a Type=notify service, and
does nothing anywhere else."""

from __future__ import annotations

import os
import socket


def notify(*fields: str) -> bool:
    """Sends fields ("READY=1", "STATUS=...") to $NOTIFY_SOCKET. False if not under systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall("\n".join(fields).encode())
        return True
    except OSError:
        return False
