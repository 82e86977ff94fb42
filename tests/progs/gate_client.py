"""A stand-in for the shim's admission, for the forwarding tests: asks device DEV's daemon
(in RDIR) to admit this process, prints one JSON line with the answer, and (with --hold S)
keeps the connection open for S seconds or until stdin closes. Run as any user.

usage: python gate_client.py RDIR DEV [--role N] [--mode N] [--hold S]
"""

import json
import os
import select
import sys
import time
from pathlib import Path

from flexnpu.forward.daemon.admission import request_admission

rdir, dev = Path(sys.argv[1]), int(sys.argv[2])
role = int(sys.argv[sys.argv.index("--role") + 1]) if "--role" in sys.argv else 0
mode = int(sys.argv[sys.argv.index("--mode") + 1]) if "--mode" in sys.argv else 0
hold = float(sys.argv[sys.argv.index("--hold") + 1]) if "--hold" in sys.argv else 0.0
try:
    answer, fds, conn = request_admission(rdir / f"gate-{dev}.sock", role, mode=mode)
except OSError as e:
    print(json.dumps({"pid": os.getpid(), "error": f"{type(e).__name__}: {e}", "errno": e.errno}), flush=True)
    sys.exit(0)
print(json.dumps({"pid": os.getpid(), **answer, "fds": len(fds)}), flush=True)
deadline = time.monotonic() + hold
while time.monotonic() < deadline:
    r, _, _ = select.select([sys.stdin], [], [], max(0.0, deadline - time.monotonic()))
    if r and not sys.stdin.readline():
        break
