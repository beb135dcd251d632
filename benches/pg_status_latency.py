#!/usr/bin/env python3
"""`/status` latency on a PostgreSQL outbox of 1,000,000 rows.

Makes a database of its own on the server, lets `serve` migrate it, fills
`events` with 300,000 pending or queued events (10,000 users: one head each,
the rest queued behind it), 100,000 dead letters and 600,000 delivered
events (the counters follow through the schema's triggers), then times
`GET /status` one request after another and prints p50, p90 and p99.

    cargo build --release
    python3 benches/pg_status_latency.py --bin target/release/churnzero-forwarder \
        --server postgres://root@127.0.0.1:5432 [--requests 300]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request


def psql(server, db, sql):
    subprocess.run(
        ["psql", "-q", "-v", "ON_ERROR_STOP=1", f"{server}/{db}", "-c", sql],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/churnzero-forwarder")
    ap.add_argument("--server", default="postgres://root@127.0.0.1:5432")
    ap.add_argument("--requests", type=int, default=300)
    args = ap.parse_args()

    db = f"cfwbench_status_{os.getpid()}"
    psql(args.server, "postgres", f"CREATE DATABASE {db}")
    port = free_port()
    serve = subprocess.Popen(
        [args.bin, "serve", "--listen", f"127.0.0.1:{port}", "--database",
         f"{args.server}/{db}", "--write-key", "wk", "--churnzero-url",
         "http://127.0.0.1:9", "--churnzero-app-key", "k", "--no-delivery"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{base}/readyz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        started = time.time()
        psql(args.server, db, """
            INSERT INTO order_keys SELECT 'u' || k FROM generate_series(0, 9999) k;
            INSERT INTO events (source, message_id, kind, order_key, payload, state,
                                accepted_at, next_attempt_at)
            SELECT 'wk', 'p' || i, 'track', 'u' || (i % 10000), '{"type":"track"}',
                   CASE WHEN i < 10000 THEN 0 ELSE 5 END, 1, 1
            FROM generate_series(0, 299999) i;
            INSERT INTO events (source, message_id, kind, order_key, payload, state,
                                accepted_at, next_attempt_at, finished_at, reason, attempts)
            SELECT 'wk', 'd' || i, 'track', 'd' || i, '{"type":"track"}', 3, 1, 1, 2,
                   'rejected (400)', 1
            FROM generate_series(0, 99999) i;
            INSERT INTO events (source, message_id, kind, order_key, payload, state,
                                accepted_at, next_attempt_at, finished_at, attempts)
            SELECT 'wk', 'x' || i, 'track', 'x' || (i % 50000), '{"type":"track"}', 2, 1, 1,
                   (extract(epoch FROM now()) * 1000)::bigint, 1
            FROM generate_series(0, 599999) i;
        """)
        psql(args.server, db, "VACUUM ANALYZE")
        filled = time.time() - started
        status = json.load(urllib.request.urlopen(f"{base}/status", timeout=10))
        outbox = status.get("outbox", status)
        times = []
        for _ in range(args.requests):
            t = time.perf_counter()
            urllib.request.urlopen(f"{base}/status", timeout=10).read()
            times.append((time.perf_counter() - t) * 1000)
        times.sort()
        q = lambda p: times[min(len(times) - 1, int(p * len(times)))]
        print(json.dumps({
            "rows": 1_000_000,
            "fill_seconds": round(filled, 1),
            "pending": outbox.get("pending"),
            "dead": outbox.get("dead"),
            "requests": args.requests,
            "p50_ms": round(q(0.50), 2),
            "p90_ms": round(q(0.90), 2),
            "p99_ms": round(q(0.99), 2),
            "max_ms": round(times[-1], 2),
        }))
    finally:
        serve.terminate()
        serve.wait()
        psql(args.server, "postgres", f"DROP DATABASE IF EXISTS {db}")


if __name__ == "__main__":
    sys.exit(main())
