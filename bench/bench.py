#!/usr/bin/env python3
"""blksync local-engine benchmark.

Generates images, times `blksync sync` next to baselines measured in the same run, and prints
ratios against the targets of issue #2. Every timed run starts with its input files read into
the page cache just before (blksync drops what it reads, so each run re-warms).

Usage: bench/bench.py [--size 1G] [--runs 3] [--dir bench/work] [--bin target/release/blksync]
"""

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time

BLOCK = 4096


def parse_size(text):
    units = {"K": 10, "M": 20, "G": 30, "T": 40}
    text = text.strip().upper()
    if text[-1] in units:
        return int(float(text[:-1]) * (1 << units[text[-1]]))
    return int(text)


def run(cmd, capture=False):
    """Runs cmd; returns (seconds, peak RSS KiB, stdout)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                            stderr=subprocess.PIPE, shell=isinstance(cmd, str))
    out, err = proc.communicate()
    _, status, usage = os.wait4(proc.pid, 0) if False else (None, proc.returncode, None)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"bench: {cmd} failed ({proc.returncode}): {err.decode(errors='replace')}")
    return seconds, out


def run_rss(cmd):
    """Runs cmd with wait4 to get the child's peak RSS (KiB); returns (seconds, rss, stdout)."""
    start = time.perf_counter()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.dup2(w, 1)
        os.close(r)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.execvp(cmd[0], cmd)
    os.close(w)
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench: {cmd} failed with status {status}")
    return seconds, usage.ru_maxrss, out


def warm(*paths):
    for p in paths:
        if os.path.exists(p):
            with open(p, "rb") as f:
                while f.read(1 << 22):
                    pass


def drop_file(path):
    if os.path.exists(path):
        os.unlink(path)


def allocated(path):
    return os.stat(path).st_blocks * 512


def make_random(path, size, seed):
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 22)
            f.write(rnd.randbytes(n))
            left -= n


def changed_pair(base, changed, mirror, size):
    """Writes `changed` (base with 1 % of 4 KiB blocks replaced at random) and `mirror` (a copy
    of base); returns a function that puts the mirror back after a sync changed it."""
    blocks = size // BLOCK
    rnd = random.Random(2)
    picks = sorted(rnd.sample(range(blocks), max(1, blocks // 100)))
    shutil.copyfile(base, changed)
    with open(changed, "r+b") as f:
        for b in picks:
            f.seek(b * BLOCK)
            f.write(rnd.randbytes(BLOCK))
    shutil.copyfile(base, mirror)
    originals = []
    with open(base, "rb") as f:
        for b in picks:
            f.seek(b * BLOCK)
            originals.append((b * BLOCK, f.read(BLOCK)))

    def restore_mirror():
        with open(mirror, "r+b") as f:
            for off, data in originals:
                f.seek(off)
                f.write(data)
        os.fsync(os.open(mirror, os.O_RDONLY))

    return restore_mirror


def median_time(fn, runs):
    times = []
    result = None
    for _ in range(runs):
        t, result = fn()
        times.append(t)
    return statistics.median(times), result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=os.path.join(os.path.dirname(__file__), "work"))
    ap.add_argument("--bin", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "blksync"))
    ap.add_argument("--huge", default="64G", help="size of the sparse file for the RSS check")
    args = ap.parse_args()
    size = parse_size(args.size)
    os.makedirs(args.dir, exist_ok=True)
    d = lambda name: os.path.join(args.dir, name)
    bs = os.path.abspath(args.bin)
    if not os.path.exists(bs):
        sys.exit(f"bench: {bs} not found; run cargo build --release first")

    print(f"# blksync local benchmark: {size >> 20} MiB images, median of {args.runs} runs")
    print(f"# machine: {os.cpu_count()} cores, {open('/proc/cpuinfo').read().split('model name')[1].split(':')[1].splitlines()[0].strip()}, "
          f"kernel {os.uname().release}, fs of {args.dir}: "
          f"{subprocess.run(['stat', '-f', '-c', '%T', args.dir], capture_output=True, text=True).stdout.strip()}")

    # --- images
    base, changed, sparse = d("base.img"), d("changed.img"), d("sparse.img")
    mirror = d("mirror.img")
    if not os.path.exists(base) or os.path.getsize(base) != size:
        print("# generating images ...", file=sys.stderr)
        make_random(base, size, 1)
    restore_mirror = changed_pair(base, changed, mirror, size)

    # 90 % zero sparse source: 10 % of 1 MiB slots hold random data, the rest are holes.
    drop_file(sparse)
    with open(sparse, "wb") as f:
        f.truncate(size)
        slots = size >> 20
        for s in sorted(random.Random(3).sample(range(slots), max(1, slots // 10))):
            f.seek(s << 20)
            f.write(random.Random(s).randbytes(1 << 20))
    subprocess.run(["sync"], check=True)

    results = []

    def row(name, t, base_name, bt, target, note=""):
        ratio = t / bt if bt else float("inf")
        verdict = "ok" if ratio <= target else "MISS"
        results.append((name, t, base_name, bt, ratio, target, verdict, note))

    def blk(*a):
        _, _, out = run_rss([bs, "sync", "--json", "--progress=none", *a])
        return json.loads(out)

    # --- unchanged
    def t_cat():
        warm(base, mirror)
        t, _ = run(f"cat {base} {mirror} >/dev/null")
        return t, None
    cat_t, _ = median_time(t_cat, args.runs)

    def t_unchanged():
        warm(base, mirror)
        t0 = time.perf_counter()
        j = blk(base, mirror)
        return time.perf_counter() - t0, j
    t, j = median_time(t_unchanged, args.runs)
    row("unchanged", t, "cat SRC DST", cat_t, 1.3, f"written {j['bytes_written']}")

    # --- 1 % changed
    def t_cat2():
        warm(changed, mirror)
        t, _ = run(f"cat {changed} {mirror} >/dev/null")
        return t, None
    cat2_t, _ = median_time(t_cat2, args.runs)

    def t_changed():
        restore_mirror()
        warm(changed, mirror)
        t0 = time.perf_counter()
        j = blk(changed, mirror)
        return time.perf_counter() - t0, j
    t, j = median_time(t_changed, args.runs)
    wr = j["bytes_written"] / max(1, j["bytes_differing"])
    row("1% changed", t, "cat SRC DST", cat2_t, 1.3,
        f"differing {j['bytes_differing']}, written {j['bytes_written']} ({wr:.3f}x, target <= 1.05x)")

    # --- fresh copies: sparse and random
    for label, src in (("90% zero sparse, fresh", sparse), ("random, fresh", base)):
        out = d("fresh.img")

        def t_cp():
            drop_file(out)
            warm(src)
            t, _ = run(["cp", "--sparse=always", src, out])
            return t, allocated(out)
        cp_t, cp_alloc = median_time(t_cp, args.runs)

        def t_cp_sync():
            drop_file(out)
            warm(src)
            t, _ = run(f"cp --sparse=always {src} {out} && sync {out}")
            return t, None
        cps_t, _ = median_time(t_cp_sync, args.runs)

        def t_fresh():
            drop_file(out)
            subprocess.run(["sync"], check=True)
            warm(src)
            t0 = time.perf_counter()
            j = blk(src, out)
            return time.perf_counter() - t0, (j, allocated(out))
        t, (j, alloc) = median_time(t_fresh, args.runs)
        target = 1.0 if "sparse" in label else 1.2
        note = f"alloc dst {alloc >> 20} MiB vs src {allocated(src) >> 20} MiB"
        row(label, t, "cp --sparse=always", cp_t, target, note)
        row(label, t, "cp --sparse=always && sync", cps_t, target, "(blksync fsyncs; plain cp does not)")
        drop_file(out)

    # --- peak RSS on a huge sparse file
    huge, huge_out = d("huge.img"), d("huge-copy.img")
    drop_file(huge)
    drop_file(huge_out)
    with open(huge, "wb") as f:
        f.truncate(parse_size(args.huge))
        for i in range(64):
            f.seek(i * (parse_size(args.huge) // 64))
            f.write(random.Random(i).randbytes(1 << 20))
    t, rss, _ = run_rss([bs, "sync", "--json", "--progress=none", huge, huge_out])
    _, rss_base, _ = run_rss([bs, "sync", "--json", "--progress=none", base, mirror])
    drop_file(huge)
    drop_file(huge_out)

    print()
    print(f"{'scenario':<24} {'blksync s':>10} {'baseline':<28} {'base s':>8} {'ratio':>7} {'target':>7}  verdict  notes")
    for name, t, bn, bt, ratio, target, verdict, note in results:
        print(f"{name:<24} {t:>10.3f} {bn:<28} {bt:>8.3f} {ratio:>7.2f} {'<=' + str(target):>7}  {verdict:<7}  {note}")
    print()
    print(f"peak RSS: {rss / 1024:.1f} MiB syncing a {args.huge} sparse file ({t:.2f}s); "
          f"{rss_base / 1024:.1f} MiB on the {size >> 20} MiB image (target <= 64 MiB)")


if __name__ == "__main__":
    main()
