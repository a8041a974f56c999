#!/usr/bin/env python3
"""`blksync clone` benchmark (issue 11, part 4): what a first clone and a rerun cost, next to
the floors measured in the same run.

The source is a 2 GiB GPT disk: a 1 MiB BIOS boot partition, a 1.5 GiB ext4 root with about
250 MiB of real files and 100 MiB of deleted data over junk, and a swap in the rest (510 MiB).

- **Grown** onto a 4 GiB disk (`--grow 2`, the root, everywhere): the first clone's time and bytes written, against `e2image -ra`
  of the root (which copies only its used blocks: the floor for reading them) and a plain
  `blksync sync` of the whole disk onto the same file (byte-identical, no resize);
- then 20 MiB of files are written into the source root and 10 MiB deleted, and the **rerun**
  writes: its bytes against the 4 KiB blocks of the source root that changed (the oracle:
  both versions of the partition compared block by block);
- a rerun with **nothing changed**;
- **shrunk** onto a 1.25 GiB disk: the first clone and an unchanged rerun (docs/CLONE.md says a
  rerun after a shrink costs a first run's reading and resizing; this measures it).

Every destination is checked with `e2fsck -fn` and `sgdisk -v`.

Usage: bench/clone.py [--dir bench/work] [--bin target/release/blksync]
Needs: root (it loop-mounts the source root), e2fsprogs, gdisk, util-linux, python3.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fs_aware import MIB, ROOT, HERE, drop_caches, make_image, sh, used_bytes  # noqa: E402

BLOCK = 4096


def run_json(cmd):
    """Runs a blksync command with --json on a cold cache: (seconds, its JSON)."""
    drop_caches()
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed: {out.stderr}")
    return elapsed, json.loads(out.stdout)


def timed(cmd):
    drop_caches()
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def partition(disk, n):
    """(start, length) in bytes of partition n, by sfdisk."""
    table = json.loads(subprocess.run(["sfdisk", "-J", disk], capture_output=True, text=True, check=True).stdout)
    for p in table["partitiontable"]["partitions"]:
        if p["node"].endswith(str(n)):
            return p["start"] * 512, p["size"] * 512
    sys.exit(f"bench: no partition {n} in {disk}")


def check(disk, blksync, work):
    if subprocess.run(["sgdisk", "-v", disk], capture_output=True, text=True).stdout.find("No problems found") < 0:
        sys.exit(f"bench: sgdisk -v {disk} found problems")
    root = os.path.join(work, "clone-check.fs")
    sh(f"rm -f {root} && {blksync} sync -q '{disk}#2' {root}")
    if subprocess.run(["e2fsck", "-fn", root], capture_output=True).returncode != 0:
        sys.exit(f"bench: e2fsck -fn of {disk}#2 found errors")
    os.remove(root)


def changed_blocks(a, b, length):
    """4 KiB blocks that differ between two files of `length` bytes."""
    n = 0
    with open(a, "rb") as x, open(b, "rb") as y:
        for _ in range(0, length, 64 * MIB):
            p, q = x.read(64 * MIB), y.read(64 * MIB)
            n += sum(1 for i in range(0, len(p), BLOCK) if p[i : i + BLOCK] != q[i : i + BLOCK])
    return n * BLOCK


def change_root(disk, start, length):
    """Writes 20 MiB of new files into the root at `start` and deletes 10 MiB, mounted through
    an offset loop device."""
    mnt = tempfile.mkdtemp(prefix="blksync-bench-mnt-")
    dev = subprocess.run(
        ["losetup", "--find", "--show", "--offset", str(start), "--sizelimit", str(length), disk],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        sh(f"mount {dev} {mnt}")
        try:
            victims = sorted(os.path.join(r, f) for r, _, fs in os.walk(os.path.join(mnt, "usr")) for f in fs)
            gone = 0
            for v in victims:
                if gone >= 10 * MIB:
                    break
                gone += os.path.getsize(v)
                os.remove(v)
            os.makedirs(os.path.join(mnt, "new"), exist_ok=True)
            for i in range(20):
                with open(os.path.join(mnt, "new", f"f{i}"), "wb") as f:
                    f.write(os.urandom(MIB))
            sh("sync")
        finally:
            sh(f"umount {mnt}")
    finally:
        sh(f"losetup -d {dev}")
        os.rmdir(mnt)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=os.path.join(HERE, "work"))
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "blksync"))
    args = ap.parse_args()
    if not os.path.exists(args.bin):
        sh(f"cd {ROOT} && cargo build --release --quiet -p blksync-cli")
    b = args.bin
    w = args.dir
    os.makedirs(w, exist_ok=True)
    src = os.path.join(w, "clone-src.img")
    rootfs = os.path.join(w, "clone-root.fs")
    kept = make_image(rootfs, 1536 * MIB, 250 * MIB, 100 * MIB)
    used = used_bytes(rootfs)
    sh(f"rm -f {src} && truncate -s 2G {src}")
    sh(f"sgdisk -o -n 1:2048:+1M -t 1:ef02 -n 2:0:+1536M -c 2:root -n 3:0:0 -t 3:8200 {src} >/dev/null")
    sh(f"{b} sync -q {rootfs} '{src}#2'")
    swap = os.path.join(w, "clone-swap.fs")
    _, len3 = partition(src, 3)
    sh(f"rm -f {swap} && truncate -s {len3} {swap} && mkswap -q -L sw {swap} && {b} sync -q {swap} '{src}#3'")
    os.remove(swap)
    start2, len2 = partition(src, 2)
    print(
        f"source: 2 GiB GPT disk; root 1.5 GiB ext4, {kept / MIB:.0f} MiB of files, "
        f"{used / MIB:.1f} MiB used by dumpe2fs, 100 MiB deleted; {len3 / MIB:.0f} MiB swap"
    )

    big = os.path.join(w, "clone-big.img")
    sh(f"rm -f {big} && truncate -s 4G {big}")
    t_e2image = timed(["e2image", "-ra", rootfs, os.path.join(w, "clone-e2image.fs")])
    os.remove(os.path.join(w, "clone-e2image.fs"))
    plain = os.path.join(w, "clone-plain.img")
    sh(f"rm -f {plain} && truncate -s 4G {plain}")
    t_plain = timed([b, "sync", "-q", src, plain])
    os.remove(plain)
    t_first, first = run_json([b, "clone", "--json", "--progress=none", "--grow", "2", "--temp-dir", w, src, big])
    check(big, b, w)

    before = os.path.join(w, "clone-root-before.fs")
    sh(f"rm -f {before} && {b} sync -q '{src}#2' {before}")
    change_root(src, start2, len2)
    after = os.path.join(w, "clone-root-after.fs")
    sh(f"rm -f {after} && {b} sync -q '{src}#2' {after}")
    changed = changed_blocks(before, after, len2)
    os.remove(before)
    os.remove(after)
    t_rerun, rerun = run_json([b, "clone", "--json", "--progress=none", "--grow", "2", "--temp-dir", w, src, big])
    check(big, b, w)
    t_same, same = run_json([b, "clone", "--json", "--progress=none", "--grow", "2", "--temp-dir", w, src, big])

    small = os.path.join(w, "clone-small.img")
    sh(f"rm -f {small} && truncate -s 1280M {small}")
    t_shrink, shrink = run_json([b, "clone", "--json", "--progress=none", "--grow", "2", "--temp-dir", w, src, small])
    check(small, b, w)
    t_shrink2, shrink2 = run_json([b, "clone", "--json", "--progress=none", "--grow", "2", "--temp-dir", w, src, small])

    print(f"{'':44} {'time':>8} {'written':>12}")
    rows = [
        ("e2image -ra of the root (floor: used blocks)", t_e2image, used),
        ("blksync sync of the whole disk (no resize)", t_plain, None),
        ("clone onto 4 GiB, first", t_first, first["bytes_written"]),
        ("clone onto 4 GiB, rerun after the change", t_rerun, rerun["bytes_written"]),
        ("clone onto 4 GiB, rerun unchanged", t_same, same["bytes_written"]),
        ("clone onto 1.25 GiB (shrink), first", t_shrink, shrink["bytes_written"]),
        ("clone onto 1.25 GiB (shrink), rerun unchanged", t_shrink2, shrink2["bytes_written"]),
    ]
    for name, t, n in rows:
        print(f"{name:44} {t:7.2f}s {'' if n is None else f'{n / MIB:9.1f} MiB':>12}")
    print(
        f"rerun after the change: wrote {rerun['bytes_written'] / MIB:.1f} MiB for {changed / MIB:.1f} MiB of "
        f"changed blocks in the source root = {rerun['bytes_written'] / changed:.2f} x"
    )
    for f in (big, small, rootfs, src):
        os.remove(f)


if __name__ == "__main__":
    main()
