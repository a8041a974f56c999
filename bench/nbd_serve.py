#!/usr/bin/env python3
"""blksync NBD server benchmark: nbdcopy reading a raw file through `blksync serve` next to
nbdcopy reading the same file through `qemu-nbd -r`, the baseline, in the same run; then a
backup point through `blksync serve` next to qemu-nbd serving the point restored.

Both servers serve the same raw file (data everywhere: every byte crosses the socket) on a unix
socket; the file is read once first so that both read it from the page cache. nbdcopy runs with
its defaults (4 connections x 64 requests of 256 KiB) and with --connections=1 --requests=16
(one connection, as blksync's own client uses), writing to null:.

Usage: bench/nbd_serve.py [--size 1G] [--runs 3] [--blksync target/release/blksync]
Needs: qemu-nbd (qemu-utils), nbdcopy (libnbd-bin), python3; builds blksync when it is missing.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from bench import parse_size  # noqa: E402
from nbd import machine, median, timed  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def wait_for_socket(path, proc):
    # The servers print nothing we can wait on (qemu-nbd) or print "ready" (ours); for qemu-nbd
    # poll for the socket file, bounded, failing if the process died.
    for _ in range(2000):
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            sys.exit(f"bench: server exited with {proc.returncode}")
        time.sleep(0.005)
    sys.exit("bench: the server never listened")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--blksync", default=os.path.join(ROOT, "target", "release", "blksync"))
    args = ap.parse_args()
    for tool in ("qemu-nbd", "nbdcopy"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} not found (apt-get install qemu-utils libnbd-bin)")
    if not os.path.exists(args.blksync):
        subprocess.run(["cargo", "build", "--release", "-p", "blksync-cli"], check=True, cwd=ROOT)
    size = parse_size(args.size)
    mb = size / 1e6
    directory = tempfile.mkdtemp(prefix="blksync-bench-serve-")
    try:
        image = os.path.join(directory, "disk.img")
        block = bytes(range(256)) * 4096  # 1 MiB of a pattern: no zeros for anyone to skip
        with open(image, "wb") as f:
            for _ in range(size // len(block)):
                f.write(block)
        with open(image, "rb") as f:
            while f.read(1 << 24):
                pass
        ours_sock = os.path.join(directory, "ours.sock")
        qemu_sock = os.path.join(directory, "qemu.sock")
        ours = subprocess.Popen([args.blksync, "serve", "-q", "--socket", ours_sock, image], stdout=subprocess.PIPE,
                                text=True)
        ours.stdout.readline()  # the address, once it listens
        qemu = subprocess.Popen(["qemu-nbd", "-r", "-t", "-e", "8", "-f", "raw", "-k", qemu_sock, image])
        wait_for_socket(qemu_sock, qemu)
        try:
            print(f"# blksync NBD server benchmark: nbdcopy of a {size >> 20} MiB raw file (page cache, "
                  f"unix socket) to null:, median of {args.runs} after a warm-up; {machine()}")
            print(f"{'server':<30} {'client':<40} {'seconds':>8} {'MB/s':>7}")
            for client, flags in (("nbdcopy (4 connections x 64)", []),
                                  ("nbdcopy --connections=1 --requests=16", ["--connections=1", "--requests=16"])):
                for label, sock in (("blksync serve FILE", ours_sock), ("qemu-nbd -r (baseline)", qemu_sock)):
                    uri = f"nbd+unix:///?socket={sock}"
                    seconds = median(lambda: timed(["nbdcopy", *flags, uri, "null:"]), args.runs)
                    print(f"{label:<30} {client:<40} {seconds:>8.3f} {mb / seconds:>7.0f}", flush=True)
        finally:
            ours.send_signal(2)
            ours.wait(timeout=60)
            qemu.terminate()
            qemu.wait(timeout=60)
        point(args, directory, image, size)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def point(args, directory, image, size):
    """Issue 10's target: a backup point read through `blksync serve` (through its chain, base
    and increment) next to `qemu-nbd -r` serving the same point restored to a raw file."""
    bs = args.blksync
    chain = os.path.join(directory, "chain")
    subprocess.run([bs, "backup", "-q", image, chain], check=True)
    with open(image, "r+b") as f:  # about 5 % of the blocks change: one 4 KiB block in 20
        for offset in range(0, size, 80 * 1024):
            f.seek(offset)
            f.write(os.urandom(4096))
    subprocess.run([bs, "backup", "-q", image, chain], check=True)
    restored = os.path.join(directory, "restored.img")
    subprocess.run([bs, "restore", "-q", chain, restored], check=True)
    for path in [restored, image] + [os.path.join(chain, n) for n in os.listdir(chain)]:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    ours_sock = os.path.join(directory, "point.sock")
    qemu_sock = os.path.join(directory, "restored.sock")
    servers = {
        "blksync serve CHAIN": ([bs, "serve", "-q", "--socket", ours_sock, chain], ours_sock),
        "qemu-nbd -r RESTORED": (["qemu-nbd", "-r", "-t", "-e", "8", "-f", "raw", "-k", qemu_sock, restored], qemu_sock),
    }

    def first_read(label):
        # A new server for every run: `serve` checks each block of the base against the chain's
        # content hashes on its first read, once per process, so a server that stays up would
        # time that only once. The server's start (loading the chain) is not timed.
        argv, sock = servers[label]
        if os.path.exists(sock):
            os.unlink(sock)
        server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        try:
            if argv[0] == bs:
                server.stdout.readline()  # the address, once it listens
            else:
                wait_for_socket(sock, server)
            return timed(["nbdcopy", f"nbd+unix:///?socket={sock}", "null:"])
        finally:
            server.send_signal(2 if argv[0] == bs else 15)
            server.wait(timeout=60)

    mb = size / 1e6
    print()
    print(f"# a backup point (base + one increment, 5 % of blocks changed) through `blksync serve`, "
          f"next to qemu-nbd -r serving the point restored to a raw file; a new server each run")
    results = {}
    for label in servers:
        first_read(label)  # warm-up: page faults of a first nbdcopy
        runs = sorted(first_read(label) for _ in range(args.runs))
        seconds = statistics.median(runs)
        results[label] = seconds
        spread = " ".join(f"{r:.3f}" for r in runs)
        print(f"{label:<30} {'nbdcopy (defaults)':<40} {seconds:>8.3f} {mb / seconds:>7.0f}   runs: {spread}",
              flush=True)
    ratio = results["blksync serve CHAIN"] / results["qemu-nbd -r RESTORED"]
    print(f"ratio {ratio:.2f} (target <= 1.5)")

if __name__ == "__main__":
    main()
