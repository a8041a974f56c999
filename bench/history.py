#!/usr/bin/env python3
"""blksync history benchmark (issue #4): backup increments and restores next to baselines run
in the same session.

1. 1 % scattered 4 KiB changes of random data: increment size vs changed bytes, and backup time
   vs a plain `blksync sync` of the same change.
2. restore of base + 20 increments vs `cp --sparse=always` of the image.
3. compressible data (an ext4 image with files, changed by appending to them): increment size
   vs changed bytes. Needs root (loop mount).

Usage: bench/history.py [--size 1G] [--runs 3] [--bin target/release/blksync]
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from bench import BLOCK, changed_pair, make_random, median_time, parse_size, warm  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def timed(cmd):
    t = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t, out.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=os.path.join(HERE, "work"))
    ap.add_argument("--bin", default=os.path.join(HERE, "..", "target", "release", "blksync"))
    args = ap.parse_args()
    size = parse_size(args.size)
    bs = os.path.abspath(args.bin)
    d = lambda n: os.path.join(args.dir, n)
    os.makedirs(args.dir, exist_ok=True)
    base, changed, mirror = d("base.img"), d("h-changed.img"), d("h-mirror.img")
    if not os.path.exists(base) or os.path.getsize(base) != size:
        make_random(base, size, 1)
    restore_mirror = changed_pair(base, changed, mirror, size)
    print(f"# blksync history benchmark: {size >> 20} MiB images, median of {args.runs}")

    # 1. Increment for 1 % scattered changes, vs a plain sync of the same change.
    def plain_sync():
        restore_mirror()
        warm(changed, mirror)
        t, _ = timed([bs, "sync", "-q", changed, mirror])
        return t, None

    sync_t, _ = median_time(plain_sync, args.runs)
    chain = d("h-chain")

    def increment():
        shutil.rmtree(chain, ignore_errors=True)
        subprocess.run([bs, "backup", "-q", base, chain], check=True)
        # The chain reads its own base image, not `base`: that is what must be in the cache.
        warm(changed, *[os.path.join(chain, n) for n in os.listdir(chain) if n.endswith(".img")])
        t, out = timed([bs, "backup", "-q", "--json", changed, chain])
        return t, json.loads(out)

    inc_t, j = median_time(increment, args.runs)
    inc_file = os.path.getsize(os.path.join(chain, "inc-000001.delta"))
    changed_bytes = j["bytes_written"] + j["bytes_zeroed"]
    index = 21 * (changed_bytes // BLOCK) + 8 + 72
    print(f"1% changed: increment {inc_file} B for {changed_bytes} B changed "
          f"-> {inc_file / changed_bytes:.3f} x (target <= 1.05 x + index of ~{index} B: "
          f"{inc_file / (1.05 * changed_bytes + index):.2f} of budget)")
    print(f"1% changed: backup {inc_t:.3f}s vs plain sync {sync_t:.3f}s -> {inc_t / sync_t:.2f} (target <= 1.2)")

    # 2. Restore of base + 20 increments vs cp --sparse=always.
    shutil.rmtree(chain, ignore_errors=True)
    work = d("h-work.img")
    shutil.copyfile(base, work)
    subprocess.run([bs, "backup", "-q", work, chain], check=True)
    rnd = random.Random(7)
    with open(work, "r+b") as f:
        for _ in range(20):
            for b in rnd.sample(range(size // BLOCK), max(1, size // BLOCK // 100)):
                f.seek(b * BLOCK)
                f.write(rnd.randbytes(BLOCK))
            f.flush()
            subprocess.run([bs, "backup", "-q", work, chain], check=True)
    out = d("h-restored.img")
    base_img = [os.path.join(chain, n) for n in os.listdir(chain) if n.endswith(".img")][0]

    def cp():
        if os.path.exists(out):
            os.unlink(out)
        warm(work)
        t, _ = timed(["cp", "--sparse=always", work, out])
        return t, None

    def cp_sync():
        if os.path.exists(out):
            os.unlink(out)
        warm(work)
        t, _ = timed(["sh", "-c", f"cp --sparse=always {work} {out} && sync {out}"])
        return t, None

    def restore():
        if os.path.exists(out):
            os.unlink(out)
        subprocess.run(["sync"], check=True)
        warm(base_img, *[os.path.join(chain, n) for n in os.listdir(chain) if n.endswith(".delta")])
        t, _ = timed([bs, "restore", "-q", chain, out])
        return t, None

    cp_t, _ = median_time(cp, args.runs)
    cps_t, _ = median_time(cp_sync, args.runs)
    r_t, _ = median_time(restore, args.runs)
    ok = subprocess.run(["cmp", work, out]).returncode == 0
    print(f"restore base + 20 increments: {r_t:.3f}s vs cp --sparse=always {cp_t:.3f}s -> {r_t / cp_t:.2f}, "
          f"vs cp && sync {cps_t:.3f}s -> {r_t / cps_t:.2f} (target <= 1.5); restored image {'identical' if ok else 'DIFFERS'}")
    os.unlink(out)

    # 3. Compressible data: an ext4 image with text files, changed by appending to them.
    if os.geteuid() != 0:
        print("compressible: skipped (needs root for a loop mount)")
        return
    img, mnt, chain2 = d("h-ext4.img"), tempfile.mkdtemp(prefix="blksync-bench-mnt-"), d("h-chain2")
    shutil.rmtree(chain2, ignore_errors=True)
    with open(img, "wb") as f:
        f.truncate(256 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", img], check=True)
    subprocess.run(["mount", "-o", "loop", img, mnt], check=True)
    try:
        words = [b"block", b"device", b"sync", b"image", b"backup", b"delta", b"chain", b"restore"]
        for i in range(400):
            with open(os.path.join(mnt, f"log{i}.txt"), "wb") as f:
                f.write(b" ".join(rnd.choice(words) for _ in range(20000)) + b"\n")
        subprocess.run(["sync"], check=True)
        subprocess.run(["umount", mnt], check=True)
        subprocess.run([bs, "backup", "-q", img, chain2], check=True)
        subprocess.run(["mount", "-o", "loop", img, mnt], check=True)
        for i in range(0, 400, 4):
            with open(os.path.join(mnt, f"log{i}.txt"), "ab") as f:
                f.write(b" ".join(rnd.choice(words) for _ in range(8000)) + b"\n")
        subprocess.run(["sync"], check=True)
    finally:
        subprocess.run(["umount", mnt], check=False)
    _, outj = timed([bs, "backup", "-q", "--json", img, chain2])
    j = json.loads(outj)
    inc = os.path.getsize(os.path.join(chain2, "inc-000001.delta"))
    changed_bytes = j["bytes_written"] + j["bytes_zeroed"]
    print(f"compressible (ext4 with text files): increment {inc} B for {changed_bytes} B changed "
          f"-> {inc / changed_bytes:.3f} x (target <= 0.6)")
    for p in (img,):
        os.unlink(p)
    shutil.rmtree(chain2, ignore_errors=True)
    shutil.rmtree(chain, ignore_errors=True)


if __name__ == "__main__":
    main()
