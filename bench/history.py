#!/usr/bin/env python3
"""blksync history benchmark (issue #4): backup increments and restores next to baselines run
in the same session.

1. 1 % scattered 4 KiB changes of random data: increment size vs changed bytes, and backup time
   vs a plain `blksync sync` of the same change.
1b. `sync --undo` of the same change vs the plain sync (the cost of the write-ahead log).
1c. `diff` of the same change vs `compare` of the same pair (the cost of recording, and of the
    image fingerprints).
2. restore of base + 20 increments vs `cp --sparse=always` of the image.
3. compressible data (an ext4 image with files, changed by appending to them): increment size
   vs changed bytes. Needs root (loop mount).
4. with --remote: history commands across loopback ssh (own sshd, tests/lab/sshd) next to the same
   command run locally: a pulled diff (SRC remote) and its bytes on the wire against the changed
   bytes; apply of that delta onto a remote mirror; list and prune of a remote chain.

Usage: bench/history.py [--size 1G] [--runs 3] [--bin target/release/blksync] [--remote]
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
    ap.add_argument("--remote", action="store_true", help="also run history commands over ssh")
    ap.add_argument("--only-remote", action="store_true", help=argparse.SUPPRESS)
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
    if args.only_remote:
        return remote(args, bs, base, changed, mirror, restore_mirror, d)

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

    # 1b. sync --undo (write-ahead: each changed chunk's old content fdatasynced into the log
    # before it is overwritten) vs the plain sync of the same change.
    undo = d("h-undo.delta")

    def undo_sync():
        restore_mirror()
        for p in (undo, undo + ".partial"):
            if os.path.exists(p):
                os.unlink(p)
        warm(changed, mirror)
        t, _ = timed([bs, "sync", "-q", changed, mirror, "--undo", undo])
        return t, None

    undo_t, _ = median_time(undo_sync, args.runs)
    print(f"1% changed: sync --undo {undo_t:.3f}s vs plain sync {sync_t:.3f}s -> {undo_t / sync_t:.2f}; "
          f"log {os.path.getsize(undo)} B")

    # 1c. diff of the same change (a delta with both images' fingerprints) vs `compare`, which
    # reads the same bytes and records nothing.
    patch = d("h-patch.delta")

    def compare():
        warm(changed, base)
        t = time.perf_counter()
        subprocess.run([bs, "compare", "-q", changed, base], capture_output=True)
        return time.perf_counter() - t, None

    def diff():
        if os.path.exists(patch):
            os.unlink(patch)
        warm(changed, base)
        t, _ = timed([bs, "diff", "-q", changed, base, "-o", patch])
        return t, None

    cmp_t, _ = median_time(compare, args.runs)
    diff_t, _ = median_time(diff, args.runs)
    print(f"1% changed: diff {diff_t:.3f}s vs compare {cmp_t:.3f}s -> {diff_t / cmp_t:.2f}; "
          f"delta {os.path.getsize(patch)} B")

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
    if args.remote:
        remote(args, bs, base, changed, mirror, restore_mirror, d)


def remote(args, bs, base, changed, mirror, restore_mirror, d):
    """4. History commands across loopback ssh, each next to the same command run locally."""
    from remote import CIPHER, free_port, start_sshd  # noqa: E402

    sshdir = tempfile.mkdtemp(prefix="blksync-bench-sshd-")
    opts = start_sshd(sshdir, free_port())
    cache = tempfile.mkdtemp(prefix="blksync-bench-cache-")
    rsh = f"ssh {opts} {CIPHER} -o SetEnv=XDG_CACHE_HOME={cache}"
    host = "root@127.0.0.1"
    ssh = lambda *a: [bs, a[0], "-e", rsh, *a[1:]]
    subprocess.run(ssh("list", f"{host}:/nonexistent"), capture_output=True)  # uploads the agent
    restore_mirror()
    delta, remote_delta = d("h-pull.delta"), d("h-local.delta")

    def local_diff():
        warm(changed, mirror)
        return timed([bs, "diff", "-q", "--json", changed, mirror, "-o", remote_delta])

    def pulled_diff():
        warm(changed, mirror)
        return timed(ssh("diff", "-q", "--json", f"{host}:{changed}", mirror, "-o", delta))

    def pulled_sync():
        restore_mirror()
        warm(changed, mirror)
        return timed(ssh("sync", "-q", f"{host}:{changed}", mirror))

    ssh_t, _ = median_time(lambda: timed(rsh.split() + [host, "true"]), args.runs)
    print(f"ssh start-up alone (ssh host true): {ssh_t:.3f}s")
    ld_t, _ = median_time(local_diff, args.runs)
    pd_t, out = median_time(pulled_diff, args.runs)
    ps_t, _ = median_time(pulled_sync, args.runs)
    restore_mirror()
    j = json.loads(out)
    changed_bytes = j["bytes_written"] + j["bytes_zeroed"]
    wire = j["bytes_sent"] + j["bytes_received"]
    print(f"remote diff (SRC over ssh): {pd_t:.3f}s vs a remote sync of the same change {ps_t:.3f}s "
          f"-> {pd_t / ps_t:.2f} (local diff {ld_t:.3f}s); "
          f"wire {wire} B for {changed_bytes} B changed -> {wire / changed_bytes:.3f} x")

    def local_apply():
        restore_mirror()
        warm(delta, mirror)
        return timed([bs, "apply", "-q", delta, mirror])

    def pushed_apply():
        restore_mirror()
        warm(delta, mirror)
        return timed(ssh("apply", "-q", delta, f"{host}:{mirror}"))

    la_t, _ = median_time(local_apply, args.runs)
    pa_t, _ = median_time(pushed_apply, args.runs)
    ok = subprocess.run(["cmp", changed, mirror]).returncode == 0
    print(f"remote apply (delta pushed to the target's host): {pa_t:.3f}s vs local apply {la_t:.3f}s "
          f"+ ssh start-up {ssh_t:.3f}s -> {pa_t / (la_t + ssh_t):.2f}; mirror {'identical' if ok else 'DIFFERS'}")

    chain = d("h-rchain")
    shutil.rmtree(chain, ignore_errors=True)
    work = d("h-rwork.img")
    shutil.copyfile(base, work)
    rnd = random.Random(9)
    size = os.path.getsize(base)
    for _ in range(6):
        with open(work, "r+b") as f:
            for b in rnd.sample(range(size // BLOCK), max(1, size // BLOCK // 100)):
                f.seek(b * BLOCK)
                f.write(rnd.randbytes(BLOCK))
        subprocess.run([bs, "backup", "-q", work, chain], check=True)
    l_t, _ = timed([bs, "list", chain])
    r_t, _ = timed(ssh("list", f"{host}:{chain}"))
    print(f"remote list of a 6-point chain: {r_t:.3f}s vs local {l_t:.3f}s + ssh start-up {ssh_t:.3f}s "
          f"-> {r_t / (l_t + ssh_t):.2f}")
    twin = chain + "-local"
    shutil.rmtree(twin, ignore_errors=True)
    shutil.copytree(chain, twin)
    subprocess.run(["sync"], check=True)
    lp_t, _ = timed([bs, "prune", "-q", "--keep", "2", twin])
    p_t, _ = timed(ssh("prune", "-q", "--keep", "2", f"{host}:{chain}"))
    print(f"remote prune folding 3 increments: {p_t:.3f}s vs local {lp_t:.3f}s + ssh start-up {ssh_t:.3f}s "
          f"-> {p_t / (lp_t + ssh_t):.2f} (it runs on the chain's host)")
    shutil.rmtree(chain, ignore_errors=True)
    shutil.rmtree(twin, ignore_errors=True)
    for p in (work, delta, remote_delta):
        if os.path.exists(p):
            os.unlink(p)


if __name__ == "__main__":
    main()
