"""The forwarding daemon of one physical device (`flexnpu daemon --device N`): the control plane.

- server.py: start-up (creating or adopting the gate table), the heartbeat, shutdown;
- admission.py: the admission socket gate-<dev>.sock and the registry of live clients;
- gate.py: the gate table gate-<dev>.ctl, the client pages, the priority summary thread
  (all through libflexnpu_gate.so, native/gate_lib.c);
- settings.py: owners, the controller's lease, the defaults, the drift record;
- control.py: the control sockets (daemon-<dev>.sock read, daemon-<dev>.admin.sock admin);
- protocol.py: the control API's wire format and its request handler;
- access.py: who may do what (docs/security.md);
- executor.py: exec-<dev>.sock, and the device's executor (native/executor/), started,
  restarted after a crash and stopped with the daemon.

Clients of the control API use flexnpu/forward/api.py, never these modules.
"""
