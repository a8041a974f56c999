#!/usr/bin/env python3
"""blksync iSCSI initiator benchmark: a sequential read of a whole LUN by blksync-iscsi next to
iscsi-perf (libiscsi), the baseline, against the same tgtd and LUN in the same run.

The LUN is a file of data (no holes: every byte crosses the socket) served by tgtd through
tests/lab/iscsi on loopback. Measured, interleaved run by run so that a noisy machine hurts
both alike:

- blksync-iscsi (examples/iscsi_copy), 2 threads x 2 MiB reads in 256 KiB commands (what the
  engine's default 2 workers do: 16 commands in flight): into a new file (removed before each
  run, so the filesystem allocates it anew), into an existing file (overwritten in place, as a
  sync onto an existing image), and discarded ("-", what iscsi-perf does);
- the same with 4 threads (32 in flight), discarded;
- iscsi-perf -b 512 -m 16 (256 KiB commands, 16 in flight) and -m 32, for --seconds each:
  libiscsi reading the LUN sequentially, discarding the data;
- iscsi-perf with its defaults (4 KiB commands, 32 in flight).

iscsi-perf reports MiB/s over a fixed time, ours is the whole LUN timed; both are given in
MB/s (10^6 bytes). Printed: median, min and max of --runs after one warm-up read (which
brings the LUN's file into the page cache), and the ratio of medians to iscsi-perf -m 16.

Usage: bench/iscsi_read.py [--size 1G] [--runs 5] [--seconds 4] [--dir /tmp]
       [--bin target/release/examples/iscsi_copy]
Needs: tgt (tgtd), libiscsi-bin (iscsi-perf), python3, root; builds the example when --bin is
missing.
"""

import argparse
import os
import re
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
LAB = os.path.join(ROOT, "tests", "lab", "iscsi")


def start(directory, image):
    out = subprocess.run([LAB, "start", "--dir", directory, "--file", image],
                         check=True, capture_output=True, text=True).stdout
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return values["LAB_ISCSI_URL"].strip("'")


def stop(directory):
    subprocess.run([LAB, "stop", "--dir", directory], check=False)


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
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=4, help="iscsi-perf -t")
    ap.add_argument("--dir", default=None, help="where the LUN's file and the copy go")
    ap.add_argument("--bin", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                                                  "release", "examples", "iscsi_copy"))
    args = ap.parse_args()
    for tool in ("tgtd", "iscsi-perf"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} not found (apt-get install tgt libiscsi-bin)")
    if not os.path.exists(args.bin):
        subprocess.run(["cargo", "build", "--release", "-p", "blksync-iscsi", "--example", "iscsi_copy"],
                       check=True, cwd=ROOT)
    size = parse_size(args.size)
    directory = tempfile.mkdtemp(prefix="blksync-bench-iscsi-", dir=args.dir)
    lab = os.path.join(directory, "lab")
    try:
        image = os.path.join(directory, "lun.img")
        block = os.urandom(1 << 20)
        with open(image, "wb") as f:
            for _ in range(size >> 20):
                f.write(block)
        url = start(lab, image)
        copy = os.path.join(directory, "copy.img")

        def ours(target, threads, fresh=False):
            def run():
                if fresh and os.path.exists(target):
                    os.unlink(target)
                t = time.perf_counter()
                subprocess.run([args.bin, "read", url, target, "--threads", str(threads)], check=True)
                return size / (time.perf_counter() - t) / 1e6
            return run

        def perf(*flags):
            def run():
                out = subprocess.run(["iscsi-perf", "-t", str(args.seconds), *flags, url],
                                     check=True, capture_output=True, text=True).stdout
                found = re.findall(r"iops average \d+ \((\d+) MB/s\)", out)
                if not found:
                    sys.exit(f"bench: no rate in iscsi-perf's output: {out[-300:]}")
                return int(found[-1]) * (1 << 20) / 1e6
            return run

        cases = [
            ("blksync-iscsi, 2 threads, into a new file", 16, ours(copy + ".new", 2, fresh=True)),
            ("blksync-iscsi, 2 threads, into a file", 16, ours(copy, 2)),
            ("blksync-iscsi, 2 threads, discarded", 16, ours("-", 2)),
            ("blksync-iscsi, 4 threads, discarded", 32, ours("-", 4)),
            ("iscsi-perf -b 512 -m 16 (256 KiB)", 16, perf("-b", "512", "-m", "16")),
            ("iscsi-perf -b 512 -m 32 (256 KiB)", 32, perf("-b", "512", "-m", "32")),
            ("iscsi-perf defaults (4 KiB, -m 32)", 32, perf()),
        ]
        ours(copy, 2)()  # warm-up: the LUN's file into the page cache, the copy allocated
        # What writing a new file costs here, without iSCSI (dd from /dev/zero).
        t = time.perf_counter()
        subprocess.run(["dd", "if=/dev/zero", f"of={copy}.dd", "bs=2M", f"count={size >> 21}", "status=none"], check=True)
        dd = size / (time.perf_counter() - t) / 1e6
        os.unlink(copy + ".dd")
        rates = {name: [] for name, _, _ in cases}
        for _ in range(args.runs):
            for name, _, fn in cases:
                rates[name].append(fn())
        print(f"# blksync iSCSI read benchmark: {size >> 20} MiB LUN (tgtd, file of data, loopback), "
              f"{args.runs} interleaved runs after a warm-up; {machine()}")
        base = statistics.median(rates["iscsi-perf -b 512 -m 16 (256 KiB)"])
        print(f"{'client':<40} {'in flight':>9} {'median MB/s':>11} {'min':>6} {'max':>6} {'vs perf -m 16':>13}")
        for name, flight, _ in cases:
            r = rates[name]
            med = statistics.median(r)
            print(f"{name:<40} {flight:>9} {med:>11.0f} {min(r):>6.0f} {max(r):>6.0f} {med / base:>12.2f}x")
        print(f"(dd of a new {size >> 20} MiB file from /dev/zero on the same filesystem: {dd:.0f} MB/s)")
    finally:
        stop(lab)
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
