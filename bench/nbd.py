#!/usr/bin/env python3
"""blksync NBD client benchmark: reading a whole export with blksync-nbd next to nbdcopy (libnbd),
the baseline, against the same nbdkit server in the same run.

The export is nbdkit's `pattern` plugin (data everywhere, no holes: every byte crosses the
socket), on a unix socket (tests/lab/nbd), once behind the delay filter (each READ waits
--delay on the server, as a slow disk or a long link would make it) and once without it (what
the client itself costs). The server runs 64 threads per connection, so the number of requests
in flight is the client's choice:

- blksync-nbd, 2 threads x 2 MiB reads in 256 KiB requests: what the engine's default 2 workers
  do (16 requests in flight); and with 8 threads (64 in flight);
- nbdcopy --connections=1 --requests=16: libnbd with the same 16 requests in flight;
- nbdcopy with its defaults (4 connections x 64 requests of 256 KiB).

Usage: bench/nbd.py [--size 512M] [--delay 10ms] [--runs 3] [--bin target/release/examples/nbd-read]
Needs: nbdkit, libnbd-bin (nbdcopy), python3; builds the example when --bin is missing.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from bench import parse_size  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LAB = os.path.join(ROOT, "tests", "lab", "nbd")


def start(directory, nbdkit_args):
    out = subprocess.run([LAB, "start", "--dir", directory, "--nbdkit", nbdkit_args],
                         check=True, capture_output=True, text=True).stdout
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return values["LAB_NBD_URI"].strip("'")


def stop(directory):
    subprocess.run([LAB, "stop", "--dir", directory], check=False)


def timed(cmd):
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def median(fn, runs):
    fn()  # warm-up: the first run after a server starts pays for its threads and page faults
    return statistics.median(fn() for _ in range(runs))


def machine():
    model = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores, {model}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="512M")
    ap.add_argument("--delay", default="10ms", help="nbdkit delay filter rdelay= (per READ)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "examples", "nbd-read"))
    args = ap.parse_args()
    for tool in ("nbdkit", "nbdcopy"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} not found (apt-get install nbdkit libnbd-bin)")
    if not os.path.exists(args.bin):
        subprocess.run(["cargo", "build", "--release", "-p", "blksync-nbd", "--example", "nbd-read"],
                       check=True, cwd=ROOT)
    size = parse_size(args.size)
    mb = size / 1e6

    def ours(uri, threads):
        def run():
            t = time.perf_counter()
            out = subprocess.run([args.bin, uri, "--threads", str(threads)], check=True,
                                 capture_output=True, text=True).stdout
            seconds = time.perf_counter() - t
            assert json.loads(out)["bytes"] == size, out
            return seconds
        return run

    def nbdcopy(uri, *flags):
        return lambda: timed(["nbdcopy", *flags, uri, "null:"])

    print(f"# blksync NBD read benchmark: {size >> 20} MiB export (nbdkit pattern, unix socket, "
          f"-t 64), median of {args.runs} after a warm-up; {machine()}")
    print(f"{'server':<18} {'client':<44} {'in flight':>9} {'seconds':>8} {'MB/s':>7}")
    for label, filters in ((f"rdelay={args.delay}", f"--filter=delay pattern size={size} rdelay={args.delay}"),
                           ("no delay", f"pattern size={size}")):
        directory = tempfile.mkdtemp(prefix="blksync-bench-nbd-")
        try:
            uri = start(os.path.join(directory, "lab"), f"-t 64 {filters}")
            for client, flight, fn in (
                ("blksync-nbd, 2 threads (the engine's default)", 16, ours(uri, 2)),
                ("blksync-nbd, 8 threads", 64, ours(uri, 8)),
                ("nbdcopy --connections=1 --requests=16", 16, nbdcopy(uri, "--connections=1", "--requests=16")),
                ("nbdcopy (4 connections x 64 requests)", 256, nbdcopy(uri)),
            ):
                seconds = median(fn, args.runs)
                print(f"{label:<18} {client:<44} {flight:>9} {seconds:>8.3f} {mb / seconds:>7.0f}", flush=True)
        finally:
            stop(os.path.join(directory, "lab"))
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
