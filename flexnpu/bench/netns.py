"""Nodes joined by a shaped network on one machine: a network namespace per node, joined
through a switch (a Linux bridge in a namespace of its own) by one veth pair per node, each
node's egress shaped to a link's rate (HTB) and one-way delay (netem, or a user-space delay
line where the kernel has no netem).

    with Topology(nodes=2, link=DEFAULT_LINK) as topo:
        subprocess.run(topo.argv(1, ["ping", "-c", "1", topo.addr(0)]))
        with LocalNode(netns=topo.names[0]) as a, LocalNode(netns=topo.names[1]) as b:
            ...

Everything a topology makes lives inside its own namespaces (nothing is added to the
machine's own network namespace), so removing the namespaces removes the links, the bridge
and the qdiscs with them. It is removed by `close()` (on leaving the with-block, also on an
exception or on a signal its owner turns into one: `node.stop_signals`), by its guard
(flexnpu/bench/guard.py) when the owner dies without closing it (kill -9), and, should both
fail, by the next topology, which removes leftovers whose owner is dead and says so
(`cleanup_leftovers`). A state file per topology under /run/flexnpu-netns/ names the owner
(pid and start time), so leftovers of a live owner (another run) are never touched.

Needs root (CAP_NET_ADMIN). Figures and measured limits: docs/network.md.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

NETNS_DIR = Path("/run/netns")  # where `ip netns` and pyroute2 mount named namespaces
STATE_DIR = Path("/run/flexnpu-netns")  # one <run prefix>.json per topology: its owner and names
PREFIX = "fxn-"  # every name a topology makes starts with this (unless given another prefix)
SUBNET = "10.77.0"  # node i is SUBNET.(i+1)/24 on the shared link
NODE_IF = "eth0"  # each node's interface on the link
BRIDGE_IF = "br0"  # the switch
MAX_NODES = 200
TCP_BUF_CAP = 256 << 20  # the most a node's TCP buffers are raised to for a long, fast link

# A Python delay line adds tens of microseconds of its own, so below this a delay is not
# emulated where the kernel lacks netem (the veth path's own latency is of that order).
RELAY_MIN_DELAY_US = 100.0
DELAY_BY = ("auto", "netem", "relay")  # how a Topology makes the delay: auto = netem, else the delay line


class NetnsError(RuntimeError):
    """A topology could not be made (no root, a missing kernel feature, bad input)."""


class LinkError(NetnsError):
    """A link figure out of its bounds: which field, what it must be, what it was."""

    def __init__(self, field: str, want: str, value: float) -> None:
        super().__init__(f"{field} must be {want}, got {value:g}")
        self.field, self.want, self.value = field, want, value


@dataclass(frozen=True)
class LinkSpec:
    """One link of the shared network, the same in both directions.

    rate_gbit: rate per direction (each node's egress is shaped to it);
    delay_us: one-way added delay (so a round trip adds twice this);
    mtu: the link's MTU (9000: jumbo frames, as RoCE/100 GbE clusters use)."""

    rate_gbit: float
    delay_us: float
    mtu: int = 9000

    def __post_init__(self) -> None:
        if not 0 < self.rate_gbit <= 10_000:  # NaN fails both comparisons
            raise LinkError("rate_gbit", "a number above 0 and at most 10000 (Gbit/s)", self.rate_gbit)
        if not 0 <= self.delay_us <= 10_000_000:
            raise LinkError("delay_us", "a number from 0 to 10000000 (us)", self.delay_us)
        if not 1280 <= self.mtu <= 65_000:
            raise LinkError("mtu", "from 1280 to 65000 (bytes)", self.mtu)

    @property
    def rate_bytes(self) -> int:
        return int(self.rate_gbit * 1e9 / 8)


# A RoCE v2 link of a 100 GbE NIC through one switch: 100 Gbit/s per direction (RoCE v2 on
# 100 GbE moves 90-95 Gbit/s of payload with >= 1 KB packets), and 3 us one way (perftest's
# ib_send_lat reports 0.8 us for 32 B and 2.3 us for 4 KB messages NIC to NIC, half a round
# trip; a switch hop adds under 1 us). Sources in docs/network.md.
DEFAULT_LINK = LinkSpec(rate_gbit=100.0, delay_us=3.0)


# ---------------------------------------------------------------- privileges and processes


def _cap_net_admin() -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << 12))  # CAP_NET_ADMIN = 12
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


def require_root() -> None:
    """NetnsError (one line) unless this process may make network namespaces."""
    if not _cap_net_admin() or os.geteuid() != 0:
        raise NetnsError("network namespaces need root (CAP_NET_ADMIN); run as root, e.g. with sudo")


def _start_time(pid: int) -> int | None:
    from flexnpu.bench.guard import start_time

    return start_time(pid)


def _owner_alive(pid: int, start: int | None) -> bool:
    now = _start_time(pid)
    return now is not None and (start is None or now == start)


def netns_argv(name: str, argv: Sequence[str]) -> list[str]:
    """argv run inside the named network namespace; nsenter execs it (the pid stays)."""
    nsenter = shutil.which("nsenter") or "/usr/bin/nsenter"
    return [nsenter, f"--net={NETNS_DIR / name}", "--", *map(str, argv)]


def netns_address(name: str) -> str:
    """The first IPv4 address of a named namespace's interfaces other than lo."""

    if not (NETNS_DIR / name).exists():
        raise NetnsError(f"no network namespace {name} (ip netns lists those there are)")
    with _rtnl(name) as ns:
        lo = ns.link_lookup(ifname="lo")
        for a in ns.get_addr(family=socket.AF_INET):
            if a["index"] not in lo:
                return a.get_attr("IFA_ADDRESS")
    raise NetnsError(f"network namespace {name} has no IPv4 address but on lo")


# ---------------------------------------------------------------- leftovers


def _state_files(prefix: str) -> list[Path]:
    try:
        return sorted(p for p in STATE_DIR.glob("*.json") if p.name.startswith(prefix))
    except OSError:
        return []


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _namespaces(prefix: str) -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))
    except OSError:
        return []


_AUTO_NAME = re.compile(rf"^{re.escape(PREFIX)}(\d+)-[0-9a-f]{{6}}-(n\d+|sw)$")


def _pid_in_name(name: str) -> int | None:
    """The owner pid in a name of an automatic prefix ("fxn-<pid>-<hex>-n0"), None for others."""
    m = _AUTO_NAME.match(name)
    return int(m.group(1)) if m else None


def _remove_netns(name: str) -> bool:
    """Removes a named namespace; True if this call removed it. The namespace itself lives on
    while a process still runs in it, so the switch's links are deleted first (below)."""
    from pyroute2 import netns

    path = NETNS_DIR / name
    if not path.exists():
        return False
    try:
        netns.remove(name)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
        return False
    return True


def _rtnl(name: str) -> Any:
    """An rtnetlink socket in a named namespace that exists (never made on the way: pyroute2's
    default O_CREAT would make a removed one anew), subscribed to no multicast group, so that
    no stream of events can crowd out the replies it waits for."""
    from pyroute2 import NetNS

    return NetNS(name, flags=0, groups=0)


def _delete_links(name: str) -> None:
    """Deletes every link but lo in a namespace: a veth's peer goes with it, so a node's link is
    gone even while some process keeps that node's namespace alive."""
    if not (NETNS_DIR / name).exists():
        return
    try:
        with _rtnl(name) as ns:
            for link in ns.get_links():
                if link.get_attr("IFLA_IFNAME") != "lo":
                    try:
                        ns.link("del", index=link["index"])
                    except Exception:  # a veth already gone with its peer
                        pass
    except Exception:
        pass


def remove_namespaces(names: Sequence[str]) -> list[str]:
    """Deletes the links in each namespace, then the namespaces; returns those removed."""
    for n in names:
        _delete_links(n)
    return [n for n in names if _remove_netns(n)]


def _kill(pid: int, start: int | None) -> None:
    from flexnpu.bench.guard import stop_all

    if start is not None:
        stop_all([(pid, start)], timeout=2.0)


def _remove_run(state: dict[str, Any], names: Sequence[str]) -> list[str]:
    relay = state.get("relay") or {}
    if relay.get("pid"):
        _kill(int(relay["pid"]), relay.get("start"))
    return remove_namespaces(names)


def cleanup_leftovers(prefix: str = PREFIX) -> list[str]:
    """Removes the namespaces (with their links, bridge and qdiscs) and delay lines that
    topologies with names starting with prefix left behind when their owner died; returns the
    namespaces it removed. Those of a live owner (another run) are left alone."""
    require_root()
    removed: list[str] = []
    claimed: set[str] = set()
    for path in _state_files(prefix):
        state = _read_state(path)
        if state is None:  # being written by its owner right now, or garbage
            if time.time() - _mtime(path) > 10:
                path.unlink(missing_ok=True)
            continue
        names = list(state.get("names", []))
        claimed.update(names)
        owner = state.get("owner") or {}
        if _owner_alive(int(owner.get("pid", 0) or 0), owner.get("start")):
            continue
        removed += _remove_run(state, names)
        path.unlink(missing_ok=True)
    for name in _namespaces(prefix):
        # One no state names: removed only if its name is an automatic one whose owner pid is
        # dead (every topology writes its state before its first namespace, so this is a run
        # whose state file went missing); any other name may be someone else's.
        pid = _pid_in_name(name)
        if name in claimed or pid is None or _owner_alive(pid, None):
            continue
        _delete_links(name)
        if _remove_netns(name):
            removed.append(name)
    return removed


def list_topologies(prefix: str = PREFIX) -> list[dict[str, Any]]:
    """The topologies on this machine whose names start with prefix: their state (owner,
    names, link, delay) and whether the owner is alive; namespaces no state names come as
    records with owner None."""
    out: list[dict[str, Any]] = []
    claimed: set[str] = set()
    for path in _state_files(prefix):
        state = _read_state(path)
        if state is None:
            continue
        owner = state.get("owner") or {}
        names = [n for n in state.get("names", []) if (NETNS_DIR / n).exists()]
        claimed.update(state.get("names", []))
        out.append({"prefix": path.name[:-len(".json")], "owner": owner.get("pid"),
                    "alive": _owner_alive(int(owner.get("pid", 0) or 0), owner.get("start")),
                    "names": names, "link": state.get("link"), "delay": state.get("delay")})
    strays = [n for n in _namespaces(prefix) if n not in claimed]
    if strays:
        out.append({"prefix": None, "owner": None, "alive": False, "names": strays, "link": None, "delay": None})
    return out


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


# ---------------------------------------------------------------- shaping


def shape(ns: Any, index: int, link: LinkSpec, netem: bool) -> bool:
    """Shapes an interface's egress: an HTB class at the link's rate (64-bit rates, so above
    34 Gbit/s too), under it netem with the one-way delay if netem is asked for; returns
    whether netem is there (False: this kernel has no sch_netem, as many minimal VM kernels).

    The bucket holds 2 ms of the rate (at least 4 maximal GSO packets) so a TCP flow can fill
    the rate on a timer-driven kernel; netem's queue holds twice the bandwidth-delay product."""
    from pyroute2.netlink.exceptions import NetlinkError

    rate = link.rate_bytes
    burst = max(4 * 65536, int(rate * 0.002))
    ns.tc("add", "htb", index=index, handle=0x00010000, default=1)
    ns.tc("add-class", "htb", index=index, handle=0x00010001, parent=0x00010000, rate=rate, ceil=rate,
          burst=burst, cburst=burst, quantum=200_000, mtu=link.mtu + 64)
    if not netem:
        return False
    bdp_pkts = int(rate * (link.delay_us * 1e-6) / 1500) * 2
    try:
        ns.tc("add", "netem", index=index, handle=0x000A0000, parent=0x00010001, delay=int(link.delay_us),
              limit=max(10_000, bdp_pkts))
    except NetlinkError as e:
        if e.code not in (errno.ENOENT, errno.EOPNOTSUPP):  # ENOENT: "unknown qdisc kind"
            raise
        return False
    return True


# ---------------------------------------------------------------- the topology


class Topology:
    """n nodes, each a network namespace with one interface on a shared switched link.

    names: each node's namespace (f"{prefix}n{i}"); switch: the switch's (f"{prefix}sw");
    delay: how the delay is made: "netem", "relay" (a user-space delay line, where the
    kernel has no netem; flexnpu/bench/netdelay.py) or "none" (no delay asked, or one below
    RELAY_MIN_DELAY_US without netem: the path's own latency is already of that order);
    cleaned: the leftovers of dead runs this one removed before starting;
    delay_by: "auto" (netem where the kernel has it, else the delay line from
    RELAY_MIN_DELAY_US up), "netem" (an error without it) or "relay" (the delay line always)."""

    def __init__(self, nodes: int = 2, link: LinkSpec = DEFAULT_LINK, prefix: str | None = None,
                 quiet: bool = False, delay_by: str = "auto") -> None:
        require_root()
        if delay_by not in DELAY_BY:
            raise NetnsError(f"delay_by takes {', '.join(DELAY_BY)}, got {delay_by!r}")
        self.delay_by = delay_by
        if not 1 <= nodes <= MAX_NODES:
            raise NetnsError(f"nodes must be between 1 and {MAX_NODES}, got {nodes}")
        if prefix is not None and (not prefix or "/" in prefix or len(prefix) > 64):
            raise NetnsError(f"prefix must be a short name without '/', got {prefix!r}")
        self.link = link
        self.nodes = nodes
        base = PREFIX if prefix is None else prefix
        self.prefix = prefix or f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}-"
        self.names = [f"{self.prefix}n{i}" for i in range(nodes)]
        self.switch = f"{self.prefix}sw"
        self.delay = "none"
        self._state_path = STATE_DIR / f"{self.prefix}.json"
        self._guard: subprocess.Popen | None = None
        self._relay: subprocess.Popen | None = None
        self._made: list[str] = []
        self._wrote_state = False  # a prefix in use by a live owner: its state file is not ours
        self._closed = False
        self._pid = os.getpid()
        self.cleaned = cleanup_leftovers(base)
        if self.cleaned and not quiet:
            print(f"flexnpu: removed network namespaces left by a dead run: {' '.join(self.cleaned)}",
                  file=sys.stderr)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- building
    def _write_state(self) -> None:
        state = {"owner": {"pid": os.getpid(), "start": _start_time(os.getpid())},
                 "names": [*self.names, self.switch], "link": asdict(self.link), "delay": self.delay}
        if self._relay is not None:
            state["relay"] = {"pid": self._relay.pid, "start": _start_time(self._relay.pid)}
        STATE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self._state_path)
        self._wrote_state = True

    def _build(self) -> None:
        from pyroute2 import netns

        for name in [*self.names, self.switch]:
            if (NETNS_DIR / name).exists():
                raise NetnsError(f"network namespace {name} exists already (prefix {self.prefix!r} is in use)")
        self._write_state()  # before the first namespace: a crash from here on leaves a named owner
        self._start_guard()
        for name in [self.switch, *self.names]:
            netns.create(name)
            self._made.append(name)
            self._tell_guard(f"netns {name}")
        # One netlink socket open at a time: pyroute2 forks to enter a namespace, and a socket
        # left open meanwhile (subscribed to nothing, groups=0) is never shared with a child.
        with _rtnl(self.switch) as sw:
            self._up(sw, "lo")
            sw.link("add", ifname=BRIDGE_IF, kind="bridge", br_stp_state=0, br_forward_delay=0)
            sw.link("set", index=sw.link_lookup(ifname=BRIDGE_IF)[0], mtu=self.link.mtu, state="up")
            for i, name in enumerate(self.names):
                # the peer is made straight in the node's namespace, by descriptor (not by name)
                nsfd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    sw.link("add", ifname=f"p{i}", kind="veth", peer={"ifname": NODE_IF, "net_ns_fd": nsfd})
                finally:
                    os.close(nsfd)
        use_netem = None
        for i, name in enumerate(self.names):
            with _rtnl(name) as ns:
                self._up(ns, "lo")
                idx = ns.link_lookup(ifname=NODE_IF)[0]
                ns.link("set", index=idx, mtu=self.link.mtu)
                ns.addr("add", index=idx, address=self.addr(i), prefixlen=24)
                ns.link("set", index=idx, state="up")
                want = self.link.delay_us > 0 and use_netem is not False and self.delay_by != "relay"
                got = shape(ns, idx, self.link, want)
                if use_netem is None:  # the first node tells whether this kernel has netem
                    use_netem = got
                    self.delay = self._delay_kind(got)
        self._tune_tcp()
        with _rtnl(self.switch) as sw:
            br = sw.link_lookup(ifname=BRIDGE_IF)[0]
            for i in range(self.nodes):
                pidx = sw.link_lookup(ifname=f"p{i}")[0]
                sw.link("set", index=pidx, mtu=self.link.mtu)
                if self.delay == "relay":
                    self._relay_port(sw, i)
                else:
                    sw.link("set", index=pidx, master=br, state="up")
        if self.delay == "relay":
            self._start_relay()
        self._write_state()

    def _tune_tcp(self) -> None:
        """Raises each node's TCP buffer maxima (per namespace) to twice the link's
        bandwidth-delay product where the defaults (4 MB to send) would cap one flow below the
        rate: at 10 Gbit/s and a 4 ms round trip, 4 MB allows 8 Gbit/s."""
        bdp = self.link.rate_bytes * 2 * self.link.delay_us * 1e-6
        most = int(min(TCP_BUF_CAP, 2 * bdp))
        if most <= 4 << 20:
            return
        script = (f"echo '4096 131072 {most}' > /proc/sys/net/ipv4/tcp_rmem && "
                  f"echo '4096 16384 {most}' > /proc/sys/net/ipv4/tcp_wmem")
        for name in self.names:
            r = subprocess.run(netns_argv(name, ["sh", "-c", script]), capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                raise NetnsError(f"cannot set TCP buffers in {name}: {r.stderr.strip()}")

    def _delay_kind(self, netem: bool) -> str:
        if netem:
            return "netem"
        if self.delay_by == "netem" and self.link.delay_us > 0:
            raise NetnsError("this kernel has no sch_netem (delay_by='netem'); use delay_by='auto' or 'relay'")
        if self.link.delay_us > 0 and (self.delay_by == "relay" or self.link.delay_us >= RELAY_MIN_DELAY_US):
            return "relay"
        return "none"

    @staticmethod
    def _up(ns: Any, ifname: str) -> None:
        ns.link("set", index=ns.link_lookup(ifname=ifname)[0], state="up")

    def _relay_port(self, sw: Any, i: int) -> None:
        """Without netem, node i's veth end p{i} is not on the bridge: a second veth pair d{i}
        <-> q{i} is (q{i} on the bridge), and the delay line carries frames from p{i} to d{i}
        after the delay and from d{i} to p{i} at once."""
        br = sw.link_lookup(ifname=BRIDGE_IF)[0]
        sw.link("add", ifname=f"d{i}", kind="veth", peer={"ifname": f"q{i}"})
        for name in (f"p{i}", f"d{i}", f"q{i}"):
            sw.link("set", index=sw.link_lookup(ifname=name)[0], mtu=self.link.mtu)
        sw.link("set", index=sw.link_lookup(ifname=f"q{i}")[0], master=br, state="up")
        self._up(sw, f"d{i}")
        self._up(sw, f"p{i}")

    def _start_relay(self) -> None:
        ports = ",".join(f"p{i}:d{i}" for i in range(self.nodes))
        argv = netns_argv(self.switch, [sys.executable, "-m", "flexnpu.bench.netdelay", "--ports", ports,
                                        "--delay-us", f"{self.link.delay_us:g}"])
        self._relay = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       env=_package_env(), start_new_session=True)
        start = _start_time(self._relay.pid)
        if start is not None:
            self._tell_guard(f"pid {self._relay.pid} {start}")
        line = self._relay.stdout.readline()  # "ready" once its sockets are bound
        if line.strip() != b"ready":
            raise NetnsError(f"the delay line did not start (exit {self._relay.wait(5)})")

    def _start_guard(self) -> None:
        self._guard = subprocess.Popen([sys.executable, "-m", "flexnpu.bench.guard"], env=_package_env(),
                                       stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, start_new_session=True)
        self._tell_guard(f"file {self._state_path}")

    def _tell_guard(self, line: str) -> None:
        if self._guard is None or self._guard.stdin is None:
            return
        try:
            self._guard.stdin.write(line.encode() + b"\n")
            self._guard.stdin.flush()
        except OSError:
            pass

    # -- use
    def addr(self, i: int) -> str:
        """Node i's IPv4 address on the link."""
        self._check(i)
        return f"{SUBNET}.{i + 1}"

    def argv(self, i: int, argv: Sequence[str]) -> list[str]:
        """argv run inside node i's namespace, as the same pid (nsenter execs it)."""
        self._check(i)
        return netns_argv(self.names[i], argv)

    def link_bytes(self, i: int) -> dict[str, int]:
        """Node i's interface counters on the link, from the kernel."""
        self._check(i)
        with _rtnl(self.names[i]) as ns:
            link = ns.get_links(ns.link_lookup(ifname=NODE_IF)[0])[0]
        stats = link.get_attr("IFLA_STATS64") or link.get_attr("IFLA_STATS")
        return {k: int(stats[k]) for k in ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets")}

    @property
    def guard_pid(self) -> int | None:
        """The pid of this topology's guard (removes it if the owner dies without closing it)."""
        return self._guard.pid if self._guard is not None else None

    @property
    def relay_pid(self) -> int | None:
        """The pid of the user-space delay line, when this topology has one."""
        return self._relay.pid if self._relay is not None else None

    def describe(self) -> dict[str, Any]:
        return {"names": self.names, "switch": self.switch, "addrs": [self.addr(i) for i in range(self.nodes)],
                "link": asdict(self.link), "delay": self.delay}

    def _check(self, i: int) -> None:
        if not 0 <= i < self.nodes:
            raise NetnsError(f"node index {i} out of range (0..{self.nodes - 1})")

    # -- teardown
    def close(self) -> None:
        """Removes everything this topology made (delay line, links, namespaces, state); can be
        called again."""
        if self._closed or os.getpid() != self._pid:
            return  # a forked child (pyroute2 forks to enter namespaces) owns none of it
        self._closed = True
        if self._relay is not None:
            from flexnpu.bench.node import stop_process

            stop_process(self._relay, 2.0)
            for f in (self._relay.stdin, self._relay.stdout):
                if f is not None:
                    f.close()
        remove_namespaces(self._made)
        if self._wrote_state:
            self._state_path.unlink(missing_ok=True)
        from flexnpu.bench.guard import dismiss

        g, self._guard = self._guard, None
        dismiss(g)

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _package_env() -> dict[str, str]:
    """This process's environment, with this very flexnpu package importable by a child."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
