#!/usr/bin/env python3
"""The memory cache's cost per entry and its hit speed, measured on the real binaries.

Starts `fake-dashscope --full-precision` (1536-float answers as DashScope
prints them, ~31 KB of JSON) and `embedgate` (release builds under
target/release unless --bin-dir says otherwise) with the benchmark's config
(scripts/bench/gateway.toml.tmpl: memory cache, one tenant with rate and
quota, the ledger's journal on) and TOKIO_WORKER_THREADS=1, then:

  1. fills the cache with --keys distinct entries (misses, 8 at a time);
  2. hits each entry --hits times as an identity client, then once with
     Accept-Encoding: gzip, and waits until the gateway's CPU is idle (the
     compaction thread, when there is one, has done its queue);
  3. runs wrk -t1 -c32 (scripts/bench/post.lua) on one hot key, identity and
     gzip, --rounds x --seconds each, and reports req/s and the gateway's
     CPU per request.

VmRSS is read from /proc after each step; bytes per entry = growth of VmRSS
over the idle gateway's, divided by the entries. The compaction thread's CPU
(thread name cache-compact) divided by the entries is its cost per entry.
Standard library only; needs wrk.

  cargo build --release -p embedgate -p fake-dashscope && python3 scripts/cache_memory.py
"""

import argparse
import hashlib
import http.client
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
EMBED = "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding"
KEY = "bench-key"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def body(i):
    return (
        '{"model":"multimodal-embedding-one-peace-v1","input":{"contents":'
        '[{"text":"cache memory probe %d","factor":1}]},"parameters":{"auto_truncation":true}}' % i
    )


def start(cmd, env, prefix):
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    if not line.startswith(prefix):
        p.kill()
        sys.exit("did not start: %r" % line)
    return p, line[len(prefix):]


def rss_kb(pid):
    for line in open("/proc/%d/status" % pid):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def ticks(path):
    """utime + stime of /proc/.../stat."""
    s = open(path).read()
    f = s[s.rindex(")") + 2:].split()
    return int(f[11]) + int(f[12])


def thread_ticks(pid, name):
    t = 0
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            if open("/proc/%d/task/%s/comm" % (pid, tid)).read().strip() == name:
                t += ticks("/proc/%d/task/%s/stat" % (pid, tid))
        except OSError:
            pass
    return t


def send_all(host, port, indices, headers, want, conns=8):
    """POSTs body(i) for each i, `conns` at a time; every answer must be 200 with X-Cache `want`."""
    errors = []
    lock = threading.Lock()
    it = iter(indices)

    def worker():
        c = http.client.HTTPConnection(host, port, timeout=30)
        while True:
            with lock:
                i = next(it, None)
            if i is None:
                break
            h = {"Authorization": "Bearer " + KEY, "Content-Type": "application/json"}
            h.update(headers)
            c.request("POST", EMBED, body=body(i), headers=h)
            r = c.getresponse()
            r.read()
            if r.status != 200 or r.getheader("x-cache") != want:
                with lock:
                    errors.append((i, r.status, r.getheader("x-cache")))
        c.close()

    ts = [threading.Thread(target=worker) for _ in range(conns)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        sys.exit("unexpected answers: %r" % errors[:5])


def wait_idle(pid, quiet_ticks=2, settle=1.0, limit=120):
    """Waits until the process used at most `quiet_ticks` of CPU in `settle` seconds."""
    deadline = time.time() + limit
    last = ticks("/proc/%d/stat" % pid)
    while time.time() < deadline:
        time.sleep(settle)
        now = ticks("/proc/%d/stat" % pid)
        if now - last <= quiet_ticks:
            return
        last = now


def wrk(url, secs, accept_encoding, pid):
    env = dict(os.environ)
    env.update(
        BENCH_BODY=body(0),
        BENCH_AUTH="Bearer " + KEY,
        BENCH_PATH=EMBED,
        BENCH_ACCEPT_ENCODING=accept_encoding,
    )
    before = ticks("/proc/%d/stat" % pid)
    out = subprocess.run(
        ["wrk", "-t1", "-c32", "-d%ds" % secs, "--timeout", "5s", "-s",
         str(ROOT / "scripts/bench/post.lua"), url],
        env=env, capture_output=True, text=True, check=True,
    ).stdout
    after = ticks("/proc/%d/stat" % pid)
    m = re.search(r"BENCH requests=(\d+) duration_us=(\d+).*non2xx=(\d+) sockerr=(\d+) bytes_per_req=(\d+)", out)
    if not m:
        sys.exit("no wrk result: " + out)
    n, us, bad, sock, per = (int(x) for x in m.groups())
    if bad or sock:
        sys.exit("wrk: %d non-2xx, %d socket errors" % (bad, sock))
    return n / (us / 1e6), (after - before) / CLK_TCK * 1e6 / n, per


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", default=str(ROOT / "target/release"))
    ap.add_argument("--keys", type=int, default=4096)
    ap.add_argument("--hits", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--interleaved", action="store_true",
                    help="fill and hit in rounds of 256 keys (each key's first hit soon after its miss) "
                         "instead of filling all keys first")
    ap.add_argument("--cache", action="append", default=[],
                    help="a [cache] line for the gateway's config, e.g. hot_max_bytes = 0")
    ap.add_argument("--settle", type=float, default=0,
                    help="seconds to wait before each VmRSS reading (an allocator's delayed purge)")
    a = ap.parse_args()
    bins = pathlib.Path(a.bin_dir)

    work = tempfile.mkdtemp(prefix="cache-memory-")
    fake, fake_url = start(
        [str(bins / "fake-dashscope"), "--listen", "127.0.0.1:0", "--latency-ms", "0", "--full-precision"],
        dict(os.environ), "fake-dashscope listening on ",
    )
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    config = (ROOT / "scripts/bench/gateway.toml.tmpl").read_text()
    for k, v in {"@UPSTREAM@": fake_url, "@KEY_SHA256@": digest, "@CACHE_LINE@": "\n".join(a.cache),
                 "@STATE_LINE@": "", "@JOURNAL@": "true", "@DATA@": work + "/data"}.items():
        config = config.replace(k, v)
    cfg = pathlib.Path(work) / "gw.toml"
    cfg.write_text(config)
    env = dict(os.environ, BENCH_UPSTREAM_KEY="bench-upstream-key", EMBEDGATE_LOG="warn",
               TOKIO_WORKER_THREADS="1")
    try:
        gw, gw_url = start([str(bins / "embedgate"), "--config", str(cfg)], env, "embedgate listening on ")
    except SystemExit:
        fake.terminate()
        raise
    host, port = gw_url.replace("http://", "").rsplit(":", 1)
    port = int(port)
    try:
        time.sleep(0.5)
        idle = rss_kb(gw.pid)
        keys = range(a.keys)
        compact = lambda: thread_ticks(gw.pid, "cache-compact")
        rows = []

        def step(what, c0):
            wait_idle(gw.pid)
            time.sleep(a.settle)
            kb = rss_kb(gw.pid)
            c = (compact() - c0) / CLK_TCK
            rows.append((what, kb, c))

        t0 = time.time()
        if a.interleaved:
            c0 = compact()
            for first in range(0, a.keys, 256):
                chunk = range(first, min(first + 256, a.keys))
                send_all(host, port, chunk, {}, "MISS")
                send_all(host, port, chunk, {}, "HIT")
            step("fill + 1 hit, 256 keys at a time (%.1f s)" % (time.time() - t0), c0)
        else:
            send_all(host, port, keys, {}, "MISS")
            step("the fill (%.1f s)" % (time.time() - t0), compact())
        for n in range(a.hits):
            c0 = compact()
            send_all(host, port, keys, {}, "HIT")
            step("identity hit %d of each key" % (n + 1), c0)
        c0 = compact()
        send_all(host, port, keys, {"Accept-Encoding": "gzip"}, "HIT")
        step("a gzip hit of each key", c0)

        print("binaries: %s" % bins)
        print("%d keys, 1536 full-precision floats each; TOKIO_WORKER_THREADS=1" % a.keys)
        print("VmRSS idle: %.1f MB" % (idle / 1024))
        for what, kb, c in rows:
            print("VmRSS after %-30s %6.1f MB = idle + %5.0f B/entry; compaction thread %.2f s CPU"
                  % (what + ":", kb / 1024, (kb - idle) * 1024 / a.keys, c))
        total = compact() / CLK_TCK
        if total:
            print("compaction thread: %.2f s CPU in all, %.0f us per key" % (total, total * 1e6 / a.keys))
        for ae, label in (("", "identity"), ("gzip", "gzip")):
            runs = [wrk(gw_url, a.seconds, ae, gw.pid) for _ in range(a.rounds)]
            rps = sum(r[0] for r in runs) / len(runs)
            cpu = sum(r[1] for r in runs) / len(runs)
            print("hot key %-8s: %8.0f req/s, %5.1f us CPU/req, %d bytes/answer (runs: %s)"
                  % (label, rps, cpu, runs[-1][2],
                     ", ".join("%.0f req/s %.1f us" % (r[0], r[1]) for r in runs)))
        print("VmRSS at the end      %7.1f MB" % (rss_kb(gw.pid) / 1024))
    finally:
        gw.terminate()
        fake.terminate()
        gw.wait()
        fake.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
