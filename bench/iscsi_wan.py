#!/usr/bin/env python3
"""iSCSI over a 40 ms RTT link (issue 12): an unchanged 256 MiB `blksync compare FILE LUN`, where
the initiator reads the whole LUN across the link, on a link with a bandwidth limit and 20 ms
of one-way delay, against the same command on the same bandwidth limit without delay, in the
same run. Target: at most 1.3 x. The claim it checks: with many commands in flight, throughput
does not depend on the round-trip time.

Two network namespaces from bench/lab/netns-lab: tgtd (tests/lab/iscsi) in NAME-b at
127.77.0.2, blksync in NAME-a. The baseline link is a veth pair with tbf; the delayed one is
the TUN delay line (wan-delay.py) with the same tbf. Runs alternate between the two links'
set-ups only once each (a link takes a second to bring up), so each set-up's runs are together.

Usage: bench/iscsi_wan.py [--size 256M] [--rate 200mbit] [--delay-ms 20] [--runs 3]
       [--bin target/release/blksync] [--dir /tmp]
Needs: tgt, iproute2, python3, root.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NETNS = os.path.join(HERE, "lab", "netns-lab")
ISCSI = os.path.join(ROOT, "tests", "lab", "iscsi")
NAME = "blkiscsi"


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def parse_size(text):
    m = re.fullmatch(r"(\d+)([KMG]?)", text)
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]


def measure(args, delay, lun_file, data):
    """Brings the link up (with `delay` ms one way), serves `lun_file` from NAME-b, runs the
    compare --runs times from NAME-a; returns the times."""
    up = ["bash", NETNS, "up", "--name", NAME, "--rate", args.rate]
    if delay:
        up += ["--delay-ms", str(delay)]
    run(up)
    lab = tempfile.mkdtemp(prefix="blksync-iscsi-wan-")
    try:
        out = run(["ip", "netns", "exec", f"{NAME}-b", ISCSI, "start", "--dir", lab, "--addr", "127.77.0.2",
                   "--file", lun_file]).stdout
        url = re.search(r"^LAB_ISCSI_URL='?([^'\n]+)'?$", out, re.M).group(1)
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            done = subprocess.run(["ip", "netns", "exec", f"{NAME}-a", args.bin, "compare", "-q", data, url])
            times.append(time.perf_counter() - start)
            if done.returncode != 0:
                sys.exit(f"bench: compare failed or found differences ({done.returncode})")
        return times
    finally:
        subprocess.run(["ip", "netns", "exec", f"{NAME}-b", ISCSI, "stop", "--dir", lab], capture_output=True)
        subprocess.run(["bash", NETNS, "down", "--name", NAME], capture_output=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--rate", default="200mbit")
    ap.add_argument("--delay-ms", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "blksync"))
    args = ap.parse_args()
    if not os.path.exists(args.bin):
        run(["cargo", "build", "--release", "--quiet", "-p", "blksync-cli"], cwd=ROOT)
    size = parse_size(args.size)
    work = tempfile.mkdtemp(prefix="blksync-iscsi-wan-", dir=args.dir)
    data, lun = os.path.join(work, "data.img"), os.path.join(work, "lun.img")
    with open(data, "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
    run(["cp", data, lun])
    try:
        base = measure(args, 0, lun, data)
        slow = measure(args, args.delay_ms, lun, data)
    finally:
        for p in (data, lun):
            os.unlink(p)
        os.rmdir(work)
    b, s = statistics.median(base), statistics.median(slow)
    print(f"unchanged {args.size} compare FILE iscsi://, {args.rate} link, runs of {args.runs}")
    print(f"  no delay        median {b:6.2f} s  ({', '.join(f'{t:.2f}' for t in base)})")
    print(f"  RTT {2 * args.delay_ms} ms       median {s:6.2f} s  ({', '.join(f'{t:.2f}' for t in slow)})")
    print(f"  ratio {s / b:.2f} x (target <= 1.3)")


if __name__ == "__main__":
    main()
