#!/usr/bin/env python3
"""Compressed image benchmark (issue 10, part 3): a 1 GiB ext4 image filled with real files
(/usr/share, then /usr/lib up to about 70 %), synced into a compressed image next to zstd of the
whole raw image, in the same run.

- size of the image against `zstd -1` (and `-3`) of the whole raw image;
- a fresh `sync --compress=1` against `zstd -1 -T0 < raw > out` (and the default level 3);
- an update after a package-sized change (files of about 5 % of the blocks added, some
  removed): bytes the sync wrote to storage (`ru_oublock` of the process) against the
  compressed size of the chunks that changed.

Usage: bench/compressed.py [--runs 3] [--dir bench/work] [--bin target/release/blksync] [--ssh [--ssh-runs 1]]
(root: it loop-mounts the image). The binary is --bin, else $BLKSYNC_BIN, else target/release/blksync
(built when missing).
With --ssh, also diskrsync's anchor: a 1 %-changed update of a 4 GiB image over ssh, --ssh-runs times.
Needs: e2fsprogs, zstd, python3; builds blksync when it is missing.
"""

import argparse
import glob
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CHUNK = 1 << 20


def sh(cmd):
    subprocess.run(cmd, shell=True, check=True)


def run_io(cmd):
    """Runs cmd; returns (seconds, bytes it wrote to storage)."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.execvp("sh", ["sh", "-c", cmd])
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench: {cmd} failed")
    return time.perf_counter() - start, usage.ru_oublock * 512


def median(fn, runs):
    values = [fn() for _ in range(runs)]
    return statistics.median(v[0] for v in values), values[-1]


def allocated(path):
    return os.stat(path).st_blocks * 512


def fill(image, budget):
    """Mounts the ext4 `image` and copies real files in until about `budget` bytes are used."""
    mnt = tempfile.mkdtemp(prefix="blksync-bench-mnt-")
    sh(f"mount -o loop {image} {mnt}")
    try:
        used = 0
        for src in ["/usr/share", "/usr/lib"]:
            for root, _, files in os.walk(src):
                for name in files:
                    path = os.path.join(root, name)
                    if not os.path.isfile(path) or os.path.islink(path):
                        continue
                    size = os.path.getsize(path)
                    if used + size > budget:
                        return used
                    dest = os.path.join(mnt, path.lstrip("/"))
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    try:
                        shutil.copyfile(path, dest)
                    except OSError:
                        continue
                    used += size
        return used
    finally:
        sh(f"umount {mnt}")
        os.rmdir(mnt)


def change(image, fraction, size):
    """A package-sized change: removes some files and adds new ones, about `fraction` of it."""
    mnt = tempfile.mkdtemp(prefix="blksync-bench-mnt-")
    sh(f"mount -o loop {image} {mnt}")
    try:
        share = os.path.join(mnt, "usr/share")
        victims = sorted(os.listdir(share))[::17][:5]
        for v in victims:
            shutil.rmtree(os.path.join(share, v), ignore_errors=True)
        added, target = 0, int(size * fraction)
        pkg = os.path.join(mnt, "opt/package")
        os.makedirs(pkg, exist_ok=True)
        roots = sorted(glob.glob("/usr/lib/python3*")) + ["/usr/lib"]
        for root, _, files in (w for r in roots for w in os.walk(r)):
            for name in files:
                path = os.path.join(root, name)
                if added >= target or not os.path.isfile(path) or os.path.islink(path):
                    continue
                dest = os.path.join(pkg, os.path.relpath(path, "/usr/lib"))
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.copyfile(path, dest)
                added += os.path.getsize(path)
        return added
    finally:
        sh(f"umount {mnt}")
        os.rmdir(mnt)


def changed_chunks_compressed(old, new, level):
    """Number of 1 MiB chunks that differ, and their size compressed with zstd at `level`."""
    count, total = 0, 0
    with open(old, "rb") as a, open(new, "rb") as b:
        while True:
            x, y = a.read(CHUNK), b.read(CHUNK)
            if not y:
                break
            if x != y and y.count(0) != len(y):
                count += 1
                out = subprocess.run(["zstd", f"-{level}", "-c"], input=y, capture_output=True, check=True).stdout
                total += len(out)
    return count, total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=os.path.join(HERE, "work"))
    ap.add_argument("--bin", default=os.environ.get("BLKSYNC_BIN", os.path.join(ROOT, "target", "release", "blksync")))
    ap.add_argument("--ssh", action="store_true", help="also diskrsync's anchor: 4 GiB over ssh")
    ap.add_argument("--ssh-runs", type=int, default=1, help="runs of the anchor (each a fresh copy, then the update)")
    ap.add_argument("--ssh-only", action="store_true", help="only the anchor (implies --ssh)")
    args = ap.parse_args()
    bs = os.path.abspath(args.bin)
    if not os.path.exists(bs):
        sh(f"cd {ROOT} && cargo build --release")
    os.makedirs(args.dir, exist_ok=True)
    d = lambda n: os.path.join(args.dir, n)
    raw, img, out = d("ext4.raw"), d("ext4.bsz"), d("ext4.zst")
    size = 1 << 30
    if not os.path.exists(raw) or os.path.getsize(raw) != size:
        print("# making a 1 GiB ext4 image of real files ...", file=sys.stderr)
        if os.path.exists(raw):
            os.unlink(raw)
        sh(f"truncate -s {size} {raw} && mkfs.ext4 -q -F {raw}")
        fill(raw, int(size * 0.7))
    sh(f"cat {raw} > /dev/null")
    if args.ssh_only:
        args.ssh = True
        return report_anchor(args, bs, raw)
    cpus = os.cpu_count()
    print(f"# compressed image benchmark: 1 GiB ext4 of real files, {cpus} cores, median of {args.runs}")

    def zstd(level):
        return lambda: run_io(f"zstd -q -{level} -T0 -f < {raw} > {out}")

    t_z1, _ = median(zstd(1), args.runs)
    z1 = os.path.getsize(out)
    t_z3, _ = median(zstd(3), args.runs)
    z3 = os.path.getsize(out)

    def fresh(level):
        def run():
            if os.path.exists(img):
                os.unlink(img)
            return run_io(f"{bs} sync -q --compress={level} {raw} {img}")
        return run

    t_b1, _ = median(fresh(1), args.runs)
    b1 = allocated(img)
    t_b3, _ = median(fresh(3), args.runs)
    b3 = allocated(img)

    print()
    print(f"{'':34} {'blksync':>10} {'baseline':>10} {'ratio':>7}  target")
    print(f"{'size, level 1 / zstd -1':34} {b1 / 1e6:9.1f}M {z1 / 1e6:9.1f}M {b1 / z1:7.3f}  <= 1.15")
    print(f"{'size, level 3 / zstd -3':34} {b3 / 1e6:9.1f}M {z3 / 1e6:9.1f}M {b3 / z3:7.3f}")
    print(f"{'size, level 3 / zstd -1':34} {b3 / 1e6:9.1f}M {z1 / 1e6:9.1f}M {b3 / z1:7.3f}  <= 1.15")
    print(f"{'fresh sync, level 1 / zstd -1 -T0':34} {t_b1:9.3f}s {t_z1:9.3f}s {t_b1 / t_z1:7.2f}  <= 1.3")
    print(f"{'fresh sync, level 3 / zstd -3 -T0':34} {t_b3:9.3f}s {t_z3:9.3f}s {t_b3 / t_z3:7.2f}")

    # The update: the image (level 3, the default) holds `raw`; change a copy and sync it in.
    new = d("ext4-new.raw")
    shutil.copyfile(raw, new)
    added = change(new, 0.05, size)
    sh(f"cat {new} {img} > /dev/null")
    t_up, wrote = run_io(f"{bs} sync -q {new} {img}")
    count, compressed = changed_chunks_compressed(raw, new, 3)
    print(f"{'update after ~5 % change':34} {wrote / 1e6:9.1f}M {compressed / 1e6:9.1f}M {wrote / max(1, compressed):7.2f}  <= 2 "
          f"(written to storage / changed chunks compressed; {count} chunks changed, {added / 1e6:.0f} MB of files added, {t_up:.2f}s)")
    check = subprocess.run([bs, "compare", "-q", new, img], capture_output=True)
    print(f"compare after the update: exit {check.returncode} (0: identical)")
    os.unlink(new)
    if args.ssh:
        report_anchor(args, bs, raw)


def report_anchor(args, bs, raw):
    updates = [anchor(args, bs, raw, run) for run in range(args.ssh_runs)]
    if len(updates) > 1:
        print(f"4 GiB over ssh, 1 % changed update: median {statistics.median(updates):.2f}s, "
              f"range {min(updates):.2f}-{max(updates):.2f}s over {len(updates)} runs")


def anchor(args, bs, raw, run=0):
    """diskrsync's anchor: a 1 %-changed update of a 4 GiB compressed image over ssh (loopback
    sshd started here, aes128-gcm), the image on the remote side."""
    sys.path.insert(0, HERE)
    from remote import CIPHER, free_port, start_sshd  # noqa: E402
    d = lambda n: os.path.join(args.dir, n)
    big, img = d("ext4x4.raw"), d("ext4x4.bsz")
    with open(big, "wb") as out, open(raw, "rb") as f:
        for _ in range(4):
            f.seek(0)
            shutil.copyfileobj(f, out, 1 << 24)
    sshdir = tempfile.mkdtemp(prefix="blksync-bench-ssh-")
    opts = start_sshd(sshdir, free_port())
    rsh = f"ssh {opts} {CIPHER}"
    dst = f"root@127.0.0.1:{img}"
    if os.path.exists(img):
        os.unlink(img)
    t_fresh, _ = run_io(f"{bs} sync -q -e '{rsh}' --compress {big} {dst}")
    # 1 % of 4 KiB blocks, scattered.
    import random
    rnd = random.Random(4 + run)
    size = os.path.getsize(big)
    with open(big, "r+b") as f:
        for b in rnd.sample(range(size // 4096), size // 4096 // 100):
            f.seek(b * 4096)
            f.write(rnd.randbytes(4096))
    sh(f"cat {big} > /dev/null")
    t_up, _ = run_io(f"{bs} sync -q -e '{rsh}' {big} {dst}")
    print(f"4 GiB over ssh: fresh compressed copy {t_fresh:.2f}s, 1 % changed update {t_up:.2f}s "
          f"(diskrsync anchor: about 6-7 s); image {allocated(img) / 1e6:.0f} MB")
    os.unlink(big)
    os.unlink(img)
    return t_up


if __name__ == "__main__":
    main()
