#!/usr/bin/env python3
"""Filesystem-aware copy benchmark (issue 11, part 3): a 1 GiB ext4 image with about 250 MiB of
real files used and 100 MiB of deleted data in its free blocks (and junk in the rest), copied
fresh by `blksync sync --fs-aware` next to `e2image -ra` (which copies only the used blocks
too), in the same run, runs interleaved:

- time of a fresh fs-aware copy against `e2image -ra SRC DST` (target: at most 1.0 x). A
  blksync sync returns when its copy is on the disk (`fsync`); e2image returns with the copy
  still in the page cache (400 MiB dirty), written later by the next `sync`. So the target is
  checked against `e2image -ra SRC DST && sync DST`, the time to a copy as durable as
  blksync's; bare e2image is printed too;
- bytes read from storage (the process's `ru_inblock`, readahead included) against the used
  bytes dumpe2fs reports (target: at most
  1.05 x);
- for reference, a plain `blksync sync` (byte-identical, deleted data and all).

Every copy is checked with `e2fsck -fn`. The page cache is dropped before each run, so both
tools read the image from the disk.

Usage: bench/fs_aware.py [--runs 5] [--dir bench/work] [--bin target/release/blksync]
Needs: root (it loop-mounts the image), e2fsprogs, python3.
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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MIB = 1 << 20


def sh(cmd):
    subprocess.run(cmd, shell=True, check=True)


def copy_tree(dest, budget, sources):
    """Copies real files from `sources` into `dest` until about `budget` bytes."""
    used = 0
    for src in sources:
        for root, _, files in os.walk(src):
            for name in files:
                path = os.path.join(root, name)
                if not os.path.isfile(path) or os.path.islink(path):
                    continue
                size = os.path.getsize(path)
                if used + size > budget:
                    return used
                target = os.path.join(dest, path.lstrip("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                try:
                    shutil.copyfile(path, target)
                except OSError:
                    continue
                used += size
    return used


def make_image(path, size, used, deleted):
    """A `size`-byte ext4 image over junk: `used` bytes of real files, plus `deleted` bytes of
    files written and then removed (their blocks free, their data still there)."""
    with open(path, "wb") as f:
        chunk = os.urandom(MIB)
        for _ in range(size // MIB):
            f.write(chunk)
    sh(f"mkfs.ext4 -q -F -E nodiscard {path}")  # by default it punches the junk out
    mnt = tempfile.mkdtemp(prefix="blksync-bench-mnt-")
    sh(f"mount -o loop {path} {mnt}")
    try:
        kept = copy_tree(mnt, used, ["/usr/share", "/usr/lib"])
        gone = os.path.join(mnt, "gone")
        os.makedirs(gone)
        with open(os.path.join(gone, "data"), "wb") as f:
            for _ in range(deleted // MIB):
                f.write(os.urandom(MIB))
        sh("sync")
        shutil.rmtree(gone)
    finally:
        sh(f"umount {mnt}")
        os.rmdir(mnt)
    return kept


def used_bytes(image):
    out = subprocess.run(["dumpe2fs", "-h", image], capture_output=True, text=True, check=True).stdout
    field = lambda name: int(re.search(rf"^{name}:\s+(\d+)", out, re.M).group(1))
    return (field("Block count") - field("Free blocks")) * field("Block size")


def drop_caches():
    sh("sync")
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def timed(cmd):
    """Runs cmd on a cold cache; returns (seconds, bytes it read from storage: `ru_inblock`,
    the kernel's readahead for it included)."""
    drop_caches()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.execvp(cmd[0], cmd)
    _, status, usage = os.wait4(pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed")
    return elapsed, usage.ru_inblock * 512


def fsck(image):
    if subprocess.run(["e2fsck", "-fn", image], capture_output=True).returncode != 0:
        sys.exit(f"bench: e2fsck -fn {image} found errors")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default=os.path.join(HERE, "work"))
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "blksync"))
    args = ap.parse_args()
    if not os.path.exists(args.bin):
        sh(f"cd {ROOT} && cargo build --release --quiet -p blksync-cli")
    os.makedirs(args.dir, exist_ok=True)
    src = os.path.join(args.dir, "fs-aware-src.img")
    kept = make_image(src, 1024 * MIB, 250 * MIB, 100 * MIB)
    used = used_bytes(src)
    print(f"image: 1 GiB ext4, {kept / MIB:.0f} MiB of files, {used / MIB:.1f} MiB used by dumpe2fs, 100 MiB deleted")

    dst = os.path.join(args.dir, "fs-aware-dst.img")
    times = {"e2image -ra": [], "e2image -ra && sync": [], "blksync --fs-aware": [], "blksync (plain)": []}
    read = {name: [] for name in times}
    for _ in range(args.runs):
        for name in times:
            if os.path.exists(dst):
                os.unlink(dst)
            if name == "e2image -ra":
                t, n = timed(["e2image", "-ra", src, dst])
            elif name == "e2image -ra && sync":
                t, n = timed(["sh", "-c", f"e2image -ra {src} {dst} && sync {dst}"])
            elif name == "blksync --fs-aware":
                t, n = timed([args.bin, "sync", "--fs-aware", "-q", src, dst])
            else:
                t, n = timed([args.bin, "sync", "-q", src, dst])
            fsck(dst)
            times[name].append(t)
            read[name].append(n)
    os.unlink(dst)
    base = statistics.median(times["e2image -ra && sync"])
    print(f"{'':22} {'median':>8} {'min':>8} {'max':>8} {'/ durable':>10} {'read from disk':>15}")
    for name, values in times.items():
        med = statistics.median(values)
        disk = statistics.median(read[name]) / MIB
        print(f"{name:22} {med:7.3f}s {min(values):7.3f}s {max(values):7.3f}s {med / base:9.2f}x {disk:11.1f} MiB")
    ratios = sorted(t / e for t, e in zip(times["blksync --fs-aware"], times["e2image -ra && sync"]))
    print(f"fs-aware / (e2image -ra && sync) per round: {', '.join(f'{r:.2f}' for r in ratios)} (target <= 1.0)")
    bare = sorted(t / e for t, e in zip(times["blksync --fs-aware"], times["e2image -ra"]))
    print(f"fs-aware / bare e2image -ra (copy not yet on disk) per round: {', '.join(f'{r:.2f}' for r in bare)}")
    r = statistics.median(read["blksync --fs-aware"])
    print(f"bytes read from storage (ru_inblock, readahead included): {r / MIB:.1f} MiB of {used / MIB:.1f} MiB used = {r / used:.3f} x (target <= 1.05)")
    os.unlink(src)


if __name__ == "__main__":
    main()
