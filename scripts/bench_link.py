#!/usr/bin/env python3
"""Measures the shaped link of flexnpu.bench.netns topologies: for the default link and for
a few rates, one TCP stream's throughput (sender and receiver each a process in its own node
namespace) and the TCP round trip (64-byte ping-pong), printed beside what was configured.

    sudo python3 scripts/bench_link.py [--json] [--rates 1,10,25,100] [--seconds 2] [--reps 3]
    sudo python3 scripts/bench_link.py --delays 0,100,1000   # delay sweep at the default rate

Each case makes its own two-node topology and removes it at the end (also on Ctrl-C).
Throughput is what the receiver counted from its first byte to the end of the stream;
medians over --reps. What a veth path reaches is bounded by the machine's CPUs (one stream is
one core's worth of copying), so at high rates the measured figure is the machine's limit,
not the shaper's: the "limited by" column says which. Results: docs/network.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

try:
    from flexnpu import SCHEMA
    from flexnpu.bench import netprobe
    from flexnpu.bench.netns import DEFAULT_LINK, LinkSpec, NetnsError, Topology
    from flexnpu.bench.node import machine
except ImportError:
    sys.exit("bench_link: flexnpu is not installed; run `pip install .` in the repository first")


def measure(link: LinkSpec, seconds: float, reps: int, pings: int) -> dict:
    gbit, rtts = [], []
    with Topology(nodes=2, link=link) as topo:
        delay = topo.delay
        netprobe.throughput(topo, 0, 1, seconds=0.3)  # warm up (ARP, slow start, page cache)
        for _ in range(reps):
            gbit.append(netprobe.throughput(topo, 0, 1, seconds=seconds)["gbit"])
            rtts.append(netprobe.rtt(topo, 0, 1, count=pings)["median_us"])
    got = statistics.median(gbit)
    return {"rate_gbit": link.rate_gbit, "delay_us": link.delay_us, "delay_by": delay,
            "measured_gbit": round(got, 3), "measured_runs_gbit": gbit,
            "rtt_median_us": round(statistics.median(rtts), 1), "rtt_configured_us": 2 * link.delay_us,
            "limited_by": "shaper" if got >= 0.9 * link.rate_gbit else "machine"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="1,10,25,100", help="Gbit/s, comma list (each with the default delay)")
    ap.add_argument("--delays", default="", help="one-way delays (us), comma list, at the default rate")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each stream")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pings", type=int, default=200, help="round trips per RTT measurement")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    o = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_link: network namespaces need root (CAP_NET_ADMIN); run it with sudo")
    try:
        links = [DEFAULT_LINK] + [LinkSpec(float(r), DEFAULT_LINK.delay_us) for r in o.rates.split(",") if r]
        links += [LinkSpec(DEFAULT_LINK.rate_gbit, float(d)) for d in o.delays.split(",") if d]
    except (ValueError, NetnsError) as e:
        sys.exit(f"bench_link: {e}")
    results = []
    try:
        for link in links:
            results.append(measure(link, o.seconds, o.reps, o.pings))
            if not o.json:
                r = results[-1]
                if len(results) == 1:
                    print(f"{'rate Gbit/s':>11} {'measured':>9} {'delay us':>8} {'by':>6} "
                          f"{'RTT conf us':>11} {'RTT meas us':>11}  limited by")
                print(f"{r['rate_gbit']:>11g} {r['measured_gbit']:>9.3f} {r['delay_us']:>8g} {r['delay_by']:>6} "
                      f"{r['rtt_configured_us']:>11g} {r['rtt_median_us']:>11.1f}  {r['limited_by']}", flush=True)
    except KeyboardInterrupt:
        sys.exit("bench_link: interrupted; its topologies are removed")
    except (NetnsError, RuntimeError) as e:
        sys.exit(f"bench_link: {e}")
    if o.json:
        print(json.dumps({"schema": SCHEMA, "machine": machine(), "default_link": DEFAULT_LINK.__dict__,
                          "seconds": o.seconds, "reps": o.reps, "results": results}))
    else:
        m = machine()
        print(f"machine: {m['cpus']} CPUs ({m['cpu']}), kernel {m['kernel']}, load {m['load1']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
