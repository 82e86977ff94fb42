"""Publishing on TCP, and subscribing to it, with ZeroMQ CURVE and nothing less.

`CurvePublisher` is a zmq PUB socket bound on tcp://HOST:PORT as a CURVE server: its key
pair is the node's (keys.read_secret, mode-checked), and a ZAP handler (pyzmq's
ThreadAuthenticator, started on the publisher's context before the bind) lets a client
complete the handshake only if its public key is in the authorized dir. The dir is read
at every handshake (keys.authorized_keys, ownership and mode checked), so `flexnpu keys
authorize` and `revoke` take effect at the next connection without a restart. A peer
without CURVE, with another server key, or with a key not authorized never gets past the
handshake and so never gets a message; CURVE also encrypts every message on the wire.

There is deliberately no way to publish on TCP without CURVE: the IPC sockets are guarded
by file modes, and a TCP port has nothing of the kind.

`CurveSubscriber` is the other side: a SUB socket with the client's key pair and the
server's public key, and a socket monitor whose events say why nothing arrives (nothing
listens there, the server refused our key, the server is not who we expected).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexnpu import paths
from flexnpu.remote import keys

log = logging.getLogger("flexnpu.remote")

ZAP_DOMAIN = b"flexnpu"
CONNECT_TIMEOUT_MS = 2000  # a TCP connect to a host that does not answer is given up after this
HANDSHAKE_MS = 5000  # a peer that starts the handshake and stalls is dropped after this


class PublishError(RuntimeError):
    """A TCP endpoint that cannot be served; the message says why and what to do."""


@dataclass(frozen=True)
class Endpoint:
    """A TCP endpoint: HOST:PORT, HOST an IPv4 address, [IPv6] address, name, or * (all)."""

    host: str
    port: int

    def zmq(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """HOST:PORT (IPv6 as [ADDR]:PORT), or ValueError in one line saying what is wrong."""
    t = text.strip()
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{text!r}: write an IPv6 endpoint as [ADDRESS]:PORT")
        port_s = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_s = t.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r}: expected HOST:PORT, e.g. 10.0.0.1:7781 or *:7781")
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 endpoint as [ADDRESS]:PORT")
        if host != "*" and not all(c.isalnum() or c in ".-_" for c in host):
            raise ValueError(f"{text!r}: {host!r} is not a host name or address")
    if not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return Endpoint(host, int(port_s))


@dataclass(frozen=True)
class PublishTarget:
    """Where and with what a server publishes on TCP."""

    endpoint: Endpoint
    secret_key: Path
    authorized: Path

    def problem(self) -> str | None:
        """Why it cannot be served (a key or dir refused), or None; checked before anything
        else starts, so a wrong option costs nothing."""
        try:
            keys.read_secret(self.secret_key)
        except keys.KeysError as e:
            return f"{e} (make one: flexnpu keys new {keys.SERVER_NAME})" if "no such" in str(e) else str(e)
        why = keys.dir_problem(self.authorized, "the authorized dir")
        if why:
            return why + " (make it with `flexnpu keys authorize NAME CLIENT.key`)"
        return None


def target(tcp: str | None, secret_key: str | Path | None = None,
           authorized: str | Path | None = None) -> PublishTarget | None:
    """The TCP target from options or configuration ("" or None: no TCP); the key and the
    authorized dir default to the keys dir's server.key_secret and authorized/. ValueError
    for an endpoint that does not parse."""
    if not tcp:
        return None
    kd = paths.keys_dir()
    return PublishTarget(parse_endpoint(tcp),
                         Path(secret_key) if secret_key else keys.secret_path(kd, keys.SERVER_NAME),
                         Path(authorized) if authorized else keys.authorized_dir(kd))


class _AuthorizedDir:
    """The ZAP credentials provider: a key may in if it is in the authorized dir now."""

    def __init__(self, d: Path) -> None:
        self.d = d
        self.refusals = 0
        self._warned: str | None = None

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            allowed = key in keys.authorized_keys(self.d)
        except keys.KeysError as e:
            if str(e) != self._warned:
                log.warning("refusing every subscriber: %s", e)
                self._warned = str(e)
            allowed = False
        if not allowed:
            self.refusals += 1
            log.info("refused a subscriber whose key %s is not in %s", key.decode(errors="replace"), self.d)
        return allowed


class CurvePublisher:
    """A PUB socket on a TCP endpoint, CURVE only (module docstring). Make, use and close it
    in one thread; `send` never blocks (a slow subscriber loses messages, as on IPC)."""

    def __init__(self, endpoint: Endpoint | str, secret_key: Path, authorized: Path, ctx: Any = None,
                 hwm: int = 100) -> None:
        import zmq
        from zmq.auth.thread import ThreadAuthenticator

        self.endpoint = endpoint if isinstance(endpoint, Endpoint) else parse_endpoint(endpoint)
        try:
            pair = keys.read_secret(Path(secret_key))
        except keys.KeysError as e:
            raise PublishError(f"cannot publish on {self.endpoint}: {e}") from None
        why = keys.dir_problem(Path(authorized), "the authorized dir")
        if why:
            raise PublishError(f"cannot publish on {self.endpoint}: {why} (make it with `flexnpu keys "
                               f"authorize NAME CLIENT.key`)")
        self.public = pair.public
        self.ctx = ctx or zmq.Context()
        self._own_ctx = ctx is None
        self.provider = _AuthorizedDir(Path(authorized))
        self.auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("flexnpu.remote.zap"))
        self.sock = None
        try:
            self.auth.start()
            self.auth.configure_curve_callback(ZAP_DOMAIN.decode(), credentials_provider=self.provider)
            s = self.sock = self.ctx.socket(zmq.PUB)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, hwm)
            s.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
            s.setsockopt(zmq.IPV6, 1 if ":" in self.endpoint.host else 0)  # zmq binds IPv4 only unless told
            s.curve_secretkey = pair.secret
            s.curve_publickey = pair.public
            s.curve_server = True
            s.zap_domain = ZAP_DOMAIN
            s.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP answer, no entry (never "allow all")
            try:
                s.bind(self.endpoint.zmq())
            except zmq.ZMQError as e:
                raise PublishError(f"cannot publish on {self.endpoint}: {e.strerror}") from None
        except BaseException:
            self.close()
            raise
        log.info("publishing on %s with CURVE (server key %s, clients from %s)", self.endpoint.zmq(),
                 self.public.decode(), authorized)

    def send(self, data: bytes) -> bool:
        import zmq

        try:
            self.sock.send(data, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None
        if self.auth is not None and self.auth.thread is not None:
            self.auth.stop()
        self.auth = None
        if self._own_ctx:
            self.ctx.term()


# ---------------------------------------------------------------- the subscriber's side

# what a link is doing, as a socket monitor sees it
LINK_CONNECTING = "connecting"  # no TCP connection yet
LINK_DOWN = "down"  # connections refused or timed out
LINK_UNAUTHORIZED = "unauthorized"  # the server refused our key
LINK_BAD_SERVER = "wrong server key"  # the handshake failed: the server is not who we expect
LINK_UP = "connected"  # handshake done


class CurveSubscriber:
    """A SUB socket to a CurvePublisher, with a monitor telling why nothing comes. Make and
    use it in one thread. `poll_events()` updates `state` and `error`."""

    def __init__(self, endpoint: Endpoint | str, client: keys.KeyPair, server_public: bytes, ctx: Any = None,
                 hwm: int = 16) -> None:
        import zmq

        self.endpoint = endpoint if isinstance(endpoint, Endpoint) else parse_endpoint(endpoint)
        self.ctx = ctx or zmq.Context.instance()
        self.state = LINK_CONNECTING
        self.error = ""
        self.since = time.monotonic()
        s = self.sock = self.ctx.socket(zmq.SUB)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVHWM, hwm)
        s.setsockopt(zmq.RECONNECT_IVL, 200)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        s.setsockopt(zmq.CONNECT_TIMEOUT, CONNECT_TIMEOUT_MS)
        s.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
        s.setsockopt(zmq.IPV6, 1 if ":" in self.endpoint.host else 0)
        s.curve_serverkey = server_public
        s.curve_publickey = client.public
        s.curve_secretkey = client.secret
        s.setsockopt(zmq.SUBSCRIBE, b"")
        self.monitor = s.get_monitor_socket()
        s.connect(self.endpoint.zmq())

    def poll_events(self) -> None:
        import zmq
        from zmq.utils.monitor import recv_monitor_message

        for _ in range(256):
            if not self.monitor.poll(0):
                return
            ev = recv_monitor_message(self.monitor)
            e, value = ev["event"], ev["value"]
            if e == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._set(LINK_UP, "")
            elif e == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._set(LINK_UNAUTHORIZED, f"{self.endpoint} refused this client's key (status {value}); "
                                             f"authorize it there: flexnpu keys authorize NAME CLIENT.key")
            elif e in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                if self.state != LINK_UNAUTHORIZED:
                    self._set(LINK_BAD_SERVER, f"the CURVE handshake with {self.endpoint} failed: its server key "
                                               f"is not the one expected (check `flexnpu keys trust`)")
            elif e == zmq.EVENT_CONNECT_RETRIED and self.state in (LINK_CONNECTING, LINK_DOWN):
                self._set(LINK_DOWN, f"nothing answers at {self.endpoint} (connection refused or timed out)")
            elif e == zmq.EVENT_DISCONNECTED and self.state == LINK_UP:
                self._set(LINK_CONNECTING, f"{self.endpoint} disconnected")

    def _set(self, state: str, error: str) -> None:
        if state != self.state:
            self.since = time.monotonic()
        self.state, self.error = state, error

    def recv_all(self, limit: int = 64) -> list[bytes]:
        """Every message waiting (at most limit), oldest first; never blocks."""
        out = []
        for _ in range(limit):
            if not self.sock.poll(0):
                break
            out.append(self.sock.recv())
        return out

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)


