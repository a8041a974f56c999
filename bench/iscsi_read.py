#!/usr/bin/env python3
"""blksync iSCSI read benchmark: `blksync sync iscsi://… FILE` of a whole LUN next to iscsi-perf
(libiscsi), the baseline, against the same tgtd and LUN in the same run.

The LUN is a file of random data (no holes: every byte crosses the socket) served by tgtd
through tests/lab/iscsi on loopback. Measured, interleaved round by round so that a noisy
machine hurts every case alike:

- iscsi-perf -b 512 -m 16 (256 KiB commands, 16 in flight; the baseline) and -m 32, for
  --seconds each: libiscsi reading the LUN sequentially and discarding the data;
- iscsi-perf with its defaults (4 KiB commands, 32 in flight);
- `blksync sync -q URL FILE` (the CLI, the engine's defaults) into:
  - a new file on tmpfs (--tmpfs, /dev/shm; removed before each run, so its pages are new),
  - an existing file on tmpfs that holds other data (rewritten before each run, untimed), which
    the sync reads, compares and overwrites in place,
  - an existing file on tmpfs that already holds the LUN's data (a rerun: read and compared,
    nothing written),
  - a new file on the disk (the bench directory, --dir), made durable (fdatasync) before the
    sync reports success;
- examples/iscsi_copy reading the LUN with 2 threads and discarding it: the initiator alone;
- dd of a new 1 GiB file from /dev/zero, on tmpfs and (with conv=fdatasync) on the disk: what
  writing the copy costs here without iSCSI.

blksync's rates are the whole process timed (start, login, the copy, fdatasync, logout) and
its CPU time from wait4; iscsi-perf reports MB/s over its fixed time after login. Both in MB/s
(10^6 bytes). tgtd's CPU time per GiB moved is read from /proc. Printed per case: median, min
and max of --runs after one warm-up round, the ratio of the median to iscsi-perf -m 16's, and
the median, min and max of the per-round ratios (each run against the iscsi-perf -m 16 run of
its own round).

With --other-bin PATH (an older build, say), the three tmpfs rows are measured for that
binary too, in the same rounds.

Usage: bench/iscsi_read.py [--size 1G] [--runs 5] [--seconds 4] [--dir /tmp] [--tmpfs /dev/shm]
       [--bin target/release/blksync] [--copy target/release/examples/iscsi_copy]
       [--other-bin PATH]
Needs: tgt (tgtd), libiscsi-bin (iscsi-perf), python3, root; builds what is missing.
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
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BASE = "iscsi-perf -b 512 -m 16 (256 KiB)"


def start(directory, image):
    out = subprocess.run([LAB, "start", "--dir", directory, "--file", image],
                         check=True, capture_output=True, text=True).stdout
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return values["LAB_ISCSI_URL"].strip("'"), int(values["LAB_ISCSI_PID"])


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


def cpu_of(pid):
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --pin: the clients' CPU list (`taskset -c`), tgtd being on the other core.
PIN = []


def timed(cmd):
    """Runs cmd; returns (seconds, CPU seconds of it, its standard output)."""
    cmd = PIN + list(cmd)
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.read().decode(errors="replace")
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    if status != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed: {err[-500:]}")
    return seconds, usage.ru_utime + usage.ru_stime, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=4, help="iscsi-perf -t")
    ap.add_argument("--dir", default=None, help="where the LUN's file and the copy on disk go")
    ap.add_argument("--tmpfs", default="/dev/shm", help="a tmpfs for the copies in memory")
    ap.add_argument("--bin", default=os.path.join(TARGET, "release", "blksync"))
    ap.add_argument("--copy", default=os.path.join(TARGET, "release", "examples", "iscsi_copy"))
    ap.add_argument("--other-bin", default=None, help="another blksync build, measured alongside")
    ap.add_argument("--pin", action="store_true",
                    help="tgtd on CPU 0 and every client on CPU 1, as when the target is another "
                         "machine: a client's CPU is then not taken from the target's")
    args = ap.parse_args()
    for tool in ("tgtd", "iscsi-perf"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} not found (apt-get install tgt libiscsi-bin)")
    if not os.path.exists(args.bin):
        subprocess.run(["cargo", "build", "--release", "-p", "blksync-cli"], check=True, cwd=ROOT)
    if not os.path.exists(args.copy):
        subprocess.run(["cargo", "build", "--release", "-p", "blksync-iscsi", "--example", "iscsi_copy"],
                       check=True, cwd=ROOT)
    size = parse_size(args.size)
    directory = tempfile.mkdtemp(prefix="blksync-bench-iscsi-", dir=args.dir)
    memory = tempfile.mkdtemp(prefix="blksync-bench-iscsi-", dir=args.tmpfs)
    lab = os.path.join(directory, "lab")
    try:
        image = os.path.join(directory, "lun.img")
        other = os.path.join(memory, "other.img")
        for path in (image, other):
            with open(path, "wb") as f:
                for _ in range(size >> 20):
                    f.write(os.urandom(1 << 20))
        url, tgtd = start(lab, image)
        if args.pin:
            subprocess.run(["taskset", "-apc", "0", str(tgtd)], check=True, capture_output=True)
            PIN[:] = ["taskset", "-c", "1"]
        new_mem = os.path.join(memory, "new.img")
        changed_mem = os.path.join(memory, "changed.img")
        same_mem = os.path.join(memory, "same.img")
        new_disk = os.path.join(directory, "new.img")
        shutil.copyfile(image, same_mem)

        def sync(target, before=None, binary=args.bin):
            def run():
                if before:
                    before()
                seconds, cpu, _ = timed([binary, "sync", "-q", url, target])
                return size / seconds / 1e6, cpu, size
            return run

        def remove(path):
            return lambda: os.path.exists(path) and os.unlink(path)

        def restore():
            shutil.copyfile(other, changed_mem)

        def copy_discarded():
            seconds, cpu, _ = timed([args.copy, "read", url, "-", "--threads", "2"])
            return size / seconds / 1e6, cpu, size

        def perf(*flags):
            def run():
                _, cpu, out = timed(["iscsi-perf", "-t", str(args.seconds), *flags, url])
                found = re.findall(r"iops average \d+ \((\d+) MB/s\)", out)
                if not found:
                    sys.exit(f"bench: no rate in iscsi-perf's output: {out[-300:]}")
                # iscsi-perf's "MB" are MiB.
                rate = int(found[-1]) * (1 << 20) / 1e6
                return rate, cpu, rate * 1e6 * args.seconds
            return run

        def dd(path, sync_to_disk):
            def run():
                if os.path.exists(path):
                    os.unlink(path)
                flags = ["conv=fdatasync"] if sync_to_disk else []
                seconds, cpu, _ = timed(["dd", "if=/dev/zero", f"of={path}", "bs=2M", f"count={size >> 21}",
                                         "status=none", *flags])
                os.unlink(path)
                return size / seconds / 1e6, cpu, None
            return run

        cases = [
            (BASE, perf("-b", "512", "-m", "16")),
            ("iscsi-perf -b 512 -m 32 (256 KiB)", perf("-b", "512", "-m", "32")),
            ("iscsi-perf defaults (4 KiB, -m 32)", perf()),
            ("blksync sync, new file on tmpfs", sync(new_mem, remove(new_mem))),
            ("blksync sync, existing file on tmpfs", sync(changed_mem, restore)),
            ("blksync sync, rerun on tmpfs (same data)", sync(same_mem)),
            ("blksync sync, new file on disk", sync(new_disk, remove(new_disk))),
            ("iscsi_copy 2 threads, discarded", copy_discarded),
            ("dd, new file on tmpfs (no iSCSI)", dd(os.path.join(memory, "dd.img"), False)),
            ("dd, new file on disk, fdatasync (no iSCSI)", dd(os.path.join(directory, "dd.img"), True)),
        ]
        if args.other_bin:
            other_bin = os.path.abspath(args.other_bin)
            cases[6:6] = [
                ("other build: new file on tmpfs", sync(new_mem, remove(new_mem), other_bin)),
                ("other build: existing file on tmpfs", sync(changed_mem, restore, other_bin)),
                ("other build: rerun on tmpfs (same data)", sync(same_mem, None, other_bin)),
            ]
        rates = {name: [] for name, _ in cases}
        cpus = {name: [] for name, _ in cases}
        tgtd_cpu = {name: [] for name, _ in cases}
        for round_ in range(args.runs + 1):
            for name, fn in cases:
                before = cpu_of(tgtd)
                rate, cpu, moved = fn()
                if round_ == 0:
                    continue  # warm-up: the LUN's file in the page cache, tgtd's buffers
                rates[name].append(rate)
                cpus[name].append(cpu / ((moved or size) / (1 << 30)))
                if moved:
                    tgtd_cpu[name].append((cpu_of(tgtd) - before) / (moved / (1 << 30)))
        load = open("/proc/loadavg").read().split()[:3]
        print(f"# blksync iSCSI read benchmark: {size >> 20} MiB LUN (tgtd, file of random data, loopback), "
              f"{args.runs} interleaved rounds after a warm-up; {machine()}; load average {' '.join(load)}"
              + ("; pinned: tgtd on CPU 0, clients on CPU 1" if args.pin else ""))
        base = statistics.median(rates[BASE])
        print(f"{'case':<46} {'median MB/s':>11} {'min':>6} {'max':>6} {'/ perf':>7} "
              f"{'per round (min-max)':>20} {'CPU s/GiB':>9} {'tgtd CPU':>8}")
        for name, _ in cases:
            r = rates[name]
            med = statistics.median(r)
            per_round = [x / b for x, b in zip(r, rates[BASE])]
            cpu = f"{statistics.median(cpus[name]):.2f}" if cpus[name] else "-"
            t = f"{statistics.median(tgtd_cpu[name]):.2f}" if tgtd_cpu[name] else "-"
            print(f"{name:<46} {med:>11.0f} {min(r):>6.0f} {max(r):>6.0f} {med / base:>6.2f}x "
                  f"{statistics.median(per_round):>8.2f} ({min(per_round):.2f}-{max(per_round):.2f}) "
                  f"{cpu:>9} {t:>8}")
        print("(blksync: the whole process timed, fdatasync of the copy included; iscsi-perf: its own rate "
              "after login. CPU s/GiB: the client's user + system time; tgtd CPU: tgtd's, per GiB served.)")
    finally:
        stop(lab)
        shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(memory, ignore_errors=True)


if __name__ == "__main__":
    main()
