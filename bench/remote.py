#!/usr/bin/env python3
"""blksync remote benchmark (issue #3): sync over ssh next to baselines run in the same session.

Starts its own sshd on loopback (tests/lab/sshd); every ssh, baseline or blksync, uses the same
cipher (aes128-gcm, no ssh compression). With --wan, also builds two network namespaces joined by
a 40 ms RTT delay line (bench/lab/netns-lab) and compares an unchanged sync across it with the
same sync over the unshaped link.

Usage: bench/remote.py [--size 1G] [--runs 3] [--wan] [--bin target/release/blksync]
Needs: root, openssh-server, b3sum (apt-get install b3sum), python3.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from bench import changed_pair, make_random, parse_size, run_rss, warm  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CIPHER = "-c aes128-gcm@openssh.com -o Compression=no"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=True, check=True, **kw)


def timed(cmd):
    t = time.perf_counter()
    sh(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def median(fn, runs):
    # One untimed warm-up: on this VM the first run touching fresh memory or page cache can be
    # several times slower than the next ones (see BENCHMARKS.md).
    fn()
    values = [fn() for _ in range(runs)]
    return statistics.median(v[0] if isinstance(v, tuple) else v for v in values), values[-1]


def start_sshd(directory, port, addr="127.0.0.1", netns=None):
    args = [os.path.join(ROOT, "tests/lab/sshd"), "start", "--dir", directory, "--port", str(port),
            "--addr", addr, "--owner", str(os.getpid())]
    if netns:
        args += ["--netns", netns]
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=os.path.join(HERE, "work"))
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "blksync"))
    ap.add_argument("--wan", action="store_true", help="also measure over a 40 ms RTT link")
    ap.add_argument("--sparse-only", action="store_true", help="only the sparse images (D)")
    ap.add_argument("--wan-only", action="store_true", help="only the 40 ms RTT link (implies --wan)")
    ap.add_argument("--rtt-runs", type=int, default=9,
                    help="interleaved rounds for the round-trip count over the slow link")
    args = ap.parse_args()
    if shutil.which("b3sum") is None:
        sys.exit("bench: b3sum not found (apt-get install b3sum)")
    size = parse_size(args.size)
    bs = os.path.abspath(args.bin)
    os.makedirs(args.dir, exist_ok=True)
    d = lambda n: os.path.join(args.dir, n)
    base, changed, mirror = d("base.img"), d("r-changed.img"), d("r-mirror.img")
    if not os.path.exists(base) or os.path.getsize(base) != size:
        make_random(base, size, 1)
    restore_mirror = changed_pair(base, changed, mirror, size)

    sshdir = tempfile.mkdtemp(prefix="blksync-bench-sshd-")
    port = free_port()
    opts = start_sshd(sshdir, port)
    ssh = f"ssh {opts} {CIPHER}"
    host = "root@127.0.0.1"
    cache = tempfile.mkdtemp(prefix="blksync-bench-cache-")
    # Install the agent once (upload), outside the timings; then give it an RSS probe.
    agent = os.path.join(cache, "blksync-agent")
    rss_file = os.path.join(cache, "agent-rss")
    with open(agent, "w") as f:
        f.write(f'#!/bin/sh\n[ "$2" = --protocol ] && exec {bs} agent --protocol\n'
                f'exec /usr/bin/time -f %M -o {rss_file} {bs} agent\n')
    os.chmod(agent, 0o755)
    blk = [bs, "sync", "--json", "--progress=none", "-e", ssh, "--remote-path", agent]

    def timed_json(argv):
        t0 = time.perf_counter()
        t, rss, out = run_rss(argv)
        return time.perf_counter() - t0, json.loads(out), rss

    def blksync(*a):
        t0 = time.perf_counter()
        t, rss, out = run_rss(blk + list(a))
        return time.perf_counter() - t0, json.loads(out), rss

    if args.wan_only:
        wan(args, bs, base, mirror, agent, size)
        return
    rows = []
    print(f"# blksync remote benchmark: {size >> 20} MiB images, loopback ssh ({CIPHER}), median of {args.runs}")
    print(f"# machine: {os.cpu_count()} cores, kernel {os.uname().release}")

    ssh_t, _ = median(lambda: timed(f"{ssh} {host} true"), args.runs)
    if not args.sparse_only:
        # A. fresh copy of random data vs the raw ssh pipe.
        remote_out = d("r-fresh.img")

        def pipe():
            if os.path.exists(remote_out):
                os.unlink(remote_out)
            warm(base)
            return timed(f"cat {base} | {ssh} {host} 'cat > {remote_out}'")

        def pipe_sync():
            if os.path.exists(remote_out):
                os.unlink(remote_out)
            warm(base)
            return timed(f"cat {base} | {ssh} {host} 'cat > {remote_out} && sync {remote_out}'")

        def fresh():
            if os.path.exists(remote_out):
                os.unlink(remote_out)
            sh("sync")
            warm(base)
            return blksync(base, f"{host}:{remote_out}")

        pipe_t, _ = median(pipe, args.runs)
        pipes_t, _ = median(pipe_sync, args.runs)
        fresh_t, (_, j, rss_fresh) = median(fresh, args.runs)
        rows.append(("fresh random copy", fresh_t, "cat | ssh 'cat > DST'", pipe_t, pipe_t / fresh_t, ">= 0.90 (throughput)"))
        rows.append(("fresh random copy", fresh_t, "... && sync DST", pipes_t, pipes_t / fresh_t, ">= 0.90 (throughput)"))
        os.unlink(remote_out)

        # B. unchanged image vs b3sum of both files.
        def b3():
            warm(base, mirror)
            return timed(f"b3sum {base} {mirror}")

        def unchanged():
            warm(base, mirror)
            return blksync(base, f"{host}:{mirror}")

        # Issue 13's floor: both ends hashing at once, ssh start-up included.
        def floor():
            warm(base, mirror)
            return timed(f"b3sum {base} > /dev/null & {ssh} {host} b3sum {mirror} > /dev/null; wait")

        b3_t, _ = median(b3, args.runs)
        floor_t, _ = median(floor, args.runs)
        un_t, (_, j_un, rss_un) = median(unchanged, args.runs)
        rows.append(("unchanged", un_t, "b3sum SRC DST", b3_t, un_t / b3_t, "<= 1.5 (time)"))
        rows.append(("unchanged", un_t, "b3sum SRC & ssh b3sum DST", floor_t, un_t / floor_t, "<= 1.3 (issue 13)"))
        rows.append(("unchanged - ssh true", un_t - ssh_t, "b3sum SRC DST", b3_t, (un_t - ssh_t) / b3_t,
                     f"(ssh start-up alone: {ssh_t:.3f}s)"))

        # C. 1 % scattered 4 KiB changes: bytes on the wire.
        def changed_run():
            restore_mirror()
            warm(changed, mirror)
            return blksync(changed, f"{host}:{mirror}")

        ch_t, (_, j_ch, rss_ch) = median(changed_run, args.runs)
        wire = j_ch["bytes_sent"] + j_ch["bytes_received"]
        budget = 1.1 * j_ch["bytes_differing"] + 0.001 * size
        rows.append(("1% changed", ch_t, "b3sum SRC DST", b3_t, ch_t / b3_t, "(time, for reference)"))

    # D. sparse images (issue 13, item 3): one byte in 64 GiB, and a nearly empty 16 TiB image
    # (ext4's largest file is just under 16 TiB). The baseline is ssh's own start-up.
    sparse_rss = []
    for label, huge in (("64 GiB, 1 byte", 64 << 30), ("16 TiB sparse", (16 << 40) - (1 << 20))):
        src, dst = d("r-sparse-src.img"), d("r-sparse-dst.img")
        for path in (src, dst):
            if os.path.exists(path):
                os.unlink(path)
        with open(src, "wb") as f:
            f.truncate(huge)
            f.seek(huge // 3)
            f.write(b"x")
        chain = d("r-sparse-chain")
        shutil.rmtree(chain, ignore_errors=True)
        runs = [("push, new copy", lambda: blksync(src, f"{host}:{dst}"), True),
                ("push, unchanged", lambda: blksync(src, f"{host}:{dst}"), False),
                ("pull, unchanged", lambda: blksync(f"{host}:{src}", dst), False)]
        if huge < 1 << 40:
            backup = [bs, "backup", "--json", "--progress=none", "-e", ssh, "--remote-path", agent]
            runs.append(("backup, unchanged", lambda: timed_json(backup + [f"{host}:{src}", chain]), False))
            timed_json(backup + [f"{host}:{src}", chain])
        for what, fn, fresh in runs:
            if fresh:
                t = fn()[0]
                os.unlink(dst)
                t2 = fn()[0]
                t = min(t, t2)
            else:
                t, _ = median(lambda: fn()[0], args.runs)
            rows.append((f"{label}: {what}", t, "ssh HOST true", ssh_t, t / ssh_t,
                         "<= ssh + 0.5 s" if huge < 1 << 40 else "< 10 s"))
        client_rss = blksync(f"{host}:{src}", dst)[2]
        agent_rss = int(open(rss_file).read().split()[-1]) if os.path.exists(rss_file) else -1
        sparse_rss.append((label, client_rss, agent_rss))
        for path in (src, dst):
            os.unlink(path)
        shutil.rmtree(chain, ignore_errors=True)

    print()
    print(f"{'scenario':<34} {'blksync s':>10}  {'baseline':<24} {'base s':>8} {'ratio':>7}  target")
    for name, t, bn, bt, ratio, target in rows:
        print(f"{name:<34} {t:>10.3f}  {bn:<24} {bt:>8.3f} {ratio:>7.2f}  {target}")
    print()
    for label, client_rss, agent_rss in sparse_rss:
        print(f"{label}, pull: peak RSS client {client_rss / 1024:.1f} MiB (incl. ssh), agent {agent_rss / 1024:.1f} MiB")
    if not args.sparse_only:
        print(f"1% changed: differing {j_ch['bytes_differing']} B, on the wire {wire} B "
              f"(sent {j_ch['bytes_sent']}, received {j_ch['bytes_received']}); budget 1.1 x differing + 0.1 % "
              f"= {budget:.0f} B -> {wire / budget:.2f} of budget")
        print(f"unchanged: on the wire {j_un['bytes_sent'] + j_un['bytes_received']} B for {size >> 20} MiB")
        agent_rss = int(open(rss_file).read().split()[-1]) if os.path.exists(rss_file) else -1
        print(f"peak RSS: client {max(rss_fresh, rss_un, rss_ch) / 1024:.1f} MiB (incl. ssh), "
              f"agent {agent_rss / 1024:.1f} MiB (last run) (target <= 64 MiB each)")

    if args.wan:
        wan(args, bs, base, mirror, agent, size)


def wan(args, bs, base, mirror, agent, size):
    lab = os.path.join(HERE, "lab", "netns-lab")
    env = subprocess.run([lab, "up", "--name", "bkb", "--delay-ms", "20"], check=True, capture_output=True, text=True).stdout
    try:
        sshdir = tempfile.mkdtemp(prefix="blksync-bench-wan-")
        opts = start_sshd(sshdir, 22, addr="127.77.0.2", netns="bkb-b")
        ctl = os.path.join(sshdir, "ctl")
        master = f"-o ControlMaster=auto -o ControlPath={ctl} -o ControlPersist=120"
        ssh = f"ssh {opts} {CIPHER} {master}"
        sh(f"ip netns exec bkb-a {ssh} root@127.77.0.2 true")  # open the shared connection
        cmd = (f"ip netns exec bkb-a {bs} sync --progress=none --json -e '{ssh}' --remote-path {agent} "
               f"{base} root@127.77.0.2:{mirror}")

        def shaped():
            warm(base, mirror)
            return timed(cmd)

        def shaped_cold():
            warm(base, mirror)
            return timed(cmd.replace(master, ""))

        sshdir2 = tempfile.mkdtemp(prefix="blksync-bench-lo-")
        opts2 = start_sshd(sshdir2, free_port())
        ctl2 = os.path.join(sshdir2, "ctl")
        master2 = f"-o ControlMaster=auto -o ControlPath={ctl2} -o ControlPersist=120"
        ssh2 = f"ssh {opts2} {CIPHER} {master2}"
        sh(f"{ssh2} root@127.0.0.1 true")
        cmd2 = f"{bs} sync --progress=none --json -e '{ssh2}' --remote-path {agent} {base} root@127.0.0.1:{mirror}"

        def plain():
            warm(base, mirror)
            return timed(cmd2)

        t_plain, _ = median(plain, args.runs)
        t_wan, _ = median(shaped, args.runs)
        t_cold, _ = median(shaped_cold, args.runs)

        # Issue 13, item 4: round trips blksync adds beyond ssh's own extra set-up time on the
        # slow link. A 256 MiB unchanged image, a new ssh connection per run on both links.
        small_a, small_b = os.path.join(args.dir, "wan-a.img"), os.path.join(args.dir, "wan-b.img")
        with open(base, "rb") as f, open(small_a, "wb") as a:
            a.write(f.read(256 << 20))
        shutil.copyfile(small_a, small_b)
        ssh_wan, ssh_lo = ssh.replace(master, ""), ssh2.replace(master2, "")

        def rtt_case(prefix, ssh_cmd, host):
            def run():
                warm(small_a, small_b)
                return timed(f"{prefix}{bs} sync --progress=none -e '{ssh_cmd}' --remote-path {agent} "
                             f"{small_a} root@{host}:{small_b}")
            return run

        # The four timings are taken in rounds, one of each per round, so that a slow spell of
        # the VM hits all four; each round gives its own count, and the spread is reported.
        cases = [lambda: timed(f"{ssh_lo} root@127.0.0.1 true"),
                 lambda: timed(f"ip netns exec bkb-a {ssh_wan} root@127.77.0.2 true"),
                 rtt_case("", ssh_lo, "127.0.0.1"),
                 rtt_case("ip netns exec bkb-a ", ssh_wan, "127.77.0.2")]
        for case in cases:
            case()  # warm-up
        rounds = [[case() for case in cases] for _ in range(args.rtt_runs)]
        medians = [statistics.median(r[i] for r in rounds) for i in range(4)]
        t_ssh_lo, t_ssh_wan, t_blk_lo, t_blk_wan = medians
        extras = sorted(((r[3] - r[2]) - (r[1] - r[0])) / 0.040 for r in rounds)
        extra = (t_blk_wan - t_blk_lo) - (t_ssh_wan - t_ssh_lo)
        print()
        print(f"256 MiB unchanged, new connection each run, {args.rtt_runs} rounds: blksync {t_blk_lo:.3f}s -> "
              f"{t_blk_wan:.3f}s, ssh true {t_ssh_lo:.3f}s -> {t_ssh_wan:.3f}s (medians); blksync adds "
              f"{extra:.3f}s = {extra / 0.040:.1f} round trips beyond ssh's own (target <= 1)")
        print(f"  per round: median {statistics.median(extras):.1f}, range {extras[0]:.1f} .. {extras[-1]:.1f}, "
              f"rounds within target {sum(e <= 1 for e in extras)} of {len(extras)}: "
              + " ".join(f"{e:.1f}" for e in extras))
        print(f"unchanged over 40 ms RTT (ControlMaster, connection open): {t_wan:.3f}s vs unshaped {t_plain:.3f}s "
              f"-> {t_wan / t_plain:.2f} (target <= 1.2)")
        print(f"unchanged over 40 ms RTT with a new ssh connection each run: {t_cold:.3f}s "
              f"-> {t_cold / t_plain:.2f} (ssh's own handshake is several round trips)")
    finally:
        # A run returns once its goodbye is on the way (a session of plain files does not wait
        # for the agent to exit): let the last agents exit before the link goes, or they stay,
        # holding their destination's lock, until ssh gives up on a link that vanished.
        for _ in range(100):
            if subprocess.run(["pgrep", "-f", f"{bs} agent"], capture_output=True).returncode != 0:
                break
            time.sleep(0.05)
        subprocess.run([lab, "down", "--name", "bkb"], check=False, capture_output=True)


if __name__ == "__main__":
    main()
