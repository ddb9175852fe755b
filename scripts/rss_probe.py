#!/usr/bin/env python3
"""Gateway memory under maximal input: the real binaries, VmRSS read from /proc.

Starts `fake-dashscope` and `embedgate` (release builds under target/ unless
--bin-dir says otherwise) on free ports with the default limits and one tenant,
then sends each scenario's requests, CONCURRENCY at a time on fresh
connections, and prints the gateway's VmRSS (and peak, VmHWM) after each.
Standard library only.

  cargo build --release --workspace && python3 scripts/rss_probe.py [--count 1000]

Scenarios (bodies of exactly server.max_body_bytes unless said otherwise):
  accepted   32 items at their longest (16 x 16 KiB text, 16 x 8 KiB URLs),
             padded with spaces to the limit; each distinct, sent with
             Cache-Control: no-store, so each one is parsed, forwarded
             upstream and metered, and none is kept in the cache
  items      as many {"text":"a"} items as fit: refused (item count)
  attack     the reported attack, 65,000 {"text":"a"} items (845 KB),
             20 requests 5 at a time
"""

import argparse
import hashlib
import http.client
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
EMBED = "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding"
MODEL = "multimodal-embedding-one-peace-v1"
KEY = "sk-rss-probe"
LIMIT = 1024 * 1024


def start(cmd, env, prefix):
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    if not line.startswith(prefix):
        p.kill()
        sys.exit("did not start: %r" % line)
    return p, line[len(prefix):]


def status(pid):
    out = {}
    for line in open("/proc/%d/status" % pid):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) // 1024
    return out


def pad(body):
    raw = json.dumps(body, separators=(",", ":")).encode()
    assert len(raw) <= LIMIT, len(raw)
    return raw + b" " * (LIMIT - len(raw))


def accepted(i):
    text = [{"text": ("%08d" % i) + "t" * (16 * 1024 - 8)} for _ in range(16)]
    urls = [{"image": "https://x/" + "u" * (8 * 1024 - 10)} for _ in range(16)]
    return pad({"model": MODEL, "input": {"contents": text + urls},
                "parameters": {"auto_truncation": True}})


def items_over(_i):
    item = b'{"text":"a"},'
    head = ('{"model":"%s","input":{"contents":[' % MODEL).encode()
    n = (LIMIT - len(head) - 20) // len(item)
    raw = head + item * n + b'{"text":"a"}]}}'
    return raw + b" " * (LIMIT - len(raw))


def attack(_i):
    return json.dumps({"model": MODEL, "input": {"contents": [{"text": "a"}] * 65000}},
                      separators=(",", ":")).encode()


def run(addr, make, count, concurrency, headers):
    host, port = addr.rsplit(":", 1)
    codes = {}
    lock = threading.Lock()
    next_i = [0]

    def worker():
        while True:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= count:
                return
            body = make(i)
            c = http.client.HTTPConnection(host, int(port), timeout=60)
            try:
                c.request("POST", EMBED, body=body, headers=headers)
                r = c.getresponse()
                r.read()
                key = r.status
            except OSError as e:
                key = type(e).__name__
            finally:
                c.close()
            with lock:
                codes[key] = codes.get(key, 0) + 1

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin-dir", default=str(ROOT / "target" / "release"))
    ap.add_argument("--gateway", help="embedgate binary (default: BIN_DIR/embedgate)")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--only", action="append", choices=["accepted", "items", "attack"],
                    help="run only this scenario (repeatable)")
    args = ap.parse_args()
    bins = pathlib.Path(args.bin_dir)
    gateway = args.gateway or str(bins / "embedgate")

    env = dict(os.environ, RSS_PROBE_UPSTREAM_KEY="sk-upstream", EMBEDGATE_LOG="warn")
    fake, fake_url = start([str(bins / "fake-dashscope"), "--listen", "127.0.0.1:0",
                            "--api-key-env", "RSS_PROBE_UPSTREAM_KEY"],
                           env, "fake-dashscope listening on ")
    tmp = tempfile.TemporaryDirectory()
    config = pathlib.Path(tmp.name) / "embedgate.toml"
    config.write_text(
        '[server]\nlisten = "127.0.0.1:0"\nwatch_config = false\n'
        '[upstream]\nbase_url = "%s"\napi_key_env = "RSS_PROBE_UPSTREAM_KEY"\n'
        '[[tenants]]\nname = "probe"\nkey_sha256 = ["%s"]\n'
        % (fake_url, hashlib.sha256(KEY.encode()).hexdigest()))
    gw, gw_url = start([gateway, "--config", str(config)], env,
                       "embedgate listening on http://")
    try:
        headers = {"Authorization": "Bearer " + KEY, "Content-Type": "application/json"}
        print("gateway %s, pid %d" % (gateway, gw.pid))
        print("%-10s %6s %4s  %-28s %9s %9s" % ("scenario", "count", "conc", "answers", "VmRSS MB", "VmHWM MB"))
        s = status(gw.pid)
        print("%-10s %6s %4s  %-28s %9d %9d" % ("start", "-", "-", "-", s["VmRSS"], s["VmHWM"]))
        plan = [
            ("accepted", accepted, args.count, args.concurrency,
             dict(headers, **{"Cache-Control": "no-store"})),
            ("items", items_over, args.count, args.concurrency, headers),
            ("attack", attack, 20, 5, headers),
        ]
        for name, make, count, conc, h in plan:
            if args.only and name not in args.only:
                continue
            t = time.time()
            codes = run(gw_url, make, count, conc, h)
            s = status(gw.pid)
            answers = ", ".join("%s x%d" % kv for kv in sorted(codes.items(), key=str))
            print("%-10s %6d %4d  %-28s %9d %9d   (%.1fs)"
                  % (name, count, conc, answers, s["VmRSS"], s["VmHWM"], time.time() - t))
    finally:
        gw.kill()
        fake.kill()


if __name__ == "__main__":
    main()
