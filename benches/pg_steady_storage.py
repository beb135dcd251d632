#!/usr/bin/env python3
"""Steady load on a PostgreSQL outbox, sampling its table sizes: shows
whether pruning and autovacuum keep the storage bounded.

Starts a mock ChurnZero and one `serve` on a fresh database, posts
`--rate` events a second (batches of 100) for `--seconds`, with a short
`--retention` and `--dedup-window` so that pruning runs for real, and
prints, every `--every` seconds, the rows and on-disk size of `events`,
`message_ids` and `order_keys` plus the live/dead tuple counts. The
outbox is bounded when the sizes level off instead of growing with the
number of events sent.

    cargo build --release
    python3 benches/pg_steady_storage.py --binary target/release/churnzero-forwarder \
        --server postgres://root@127.0.0.1:5432 --rate 5000 --seconds 300
"""
import argparse, base64, http.client, json, os, subprocess, sys, threading, time, uuid

def psql(url, sql):
    out = subprocess.run(["psql", url, "-AtX", "-c", sql], capture_output=True, text=True, check=True)
    return out.stdout.strip()

def free_port():
    import socket
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def wait_http(port, path, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path); r = c.getresponse(); r.read()
            if r.status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"nothing answered {path} on port {port}")

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="target/release/churnzero-forwarder")
    ap.add_argument("--server", default="postgres://root@127.0.0.1:5432")
    ap.add_argument("--rate", type=int, default=5000, help="events a second")
    ap.add_argument("--seconds", type=int, default=300)
    ap.add_argument("--every", type=int, default=30)
    ap.add_argument("--retention", default="30s")
    ap.add_argument("--users", type=int, default=10000)
    a = ap.parse_args()

    db = f"cfw_steady_{os.getpid()}"
    admin = f"{a.server}/postgres"
    psql(admin, f"CREATE DATABASE {db}")
    url = f"{a.server}/{db}"
    mport, fport = free_port(), free_port()
    procs = []
    try:
        procs.append(subprocess.Popen([a.binary, "mock-churnzero", "--listen", f"127.0.0.1:{mport}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen([a.binary, "serve", "--listen", f"127.0.0.1:{fport}",
                                       "--database", url, "--write-key", "wk",
                                       "--churnzero-url", f"http://127.0.0.1:{mport}",
                                       "--churnzero-app-key", "app",
                                       "--retention", a.retention, "--dedup-window", a.retention],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_http(fport, "/readyz")
        auth = "Basic " + base64.b64encode(b"wk:").decode()
        stop = time.time() + a.seconds
        sent = [0]
        lock = threading.Lock()
        threads = 8
        per_thread = a.rate / threads / 100.0  # batches a second per thread

        def load(t):
            c = http.client.HTTPConnection("127.0.0.1", fport, timeout=30)
            n = 0
            start = time.time()
            while time.time() < stop:
                due = start + n / per_thread
                if due > time.time():
                    time.sleep(due - time.time())
                batch = []
                for i in range(100):
                    user = (t * 7919 + n * 100 + i) % a.users
                    batch.append({"type": "track", "userId": f"u{user}", "event": "Steady",
                                  "messageId": str(uuid.uuid4()),
                                  "context": {"traits": {"accountExternalId": f"acct-{user % 50}",
                                                         "contactExternalId": f"u{user}"}}})
                body = json.dumps({"batch": batch})
                c.request("POST", "/v1/batch", body, {"Content-Type": "application/json", "Authorization": auth})
                r = c.getresponse(); r.read()
                if r.status == 200:
                    with lock:
                        sent[0] += 100
                n += 1

        ts = [threading.Thread(target=load, args=(t,), daemon=True) for t in range(threads)]
        for t in ts:
            t.start()
        print("elapsed_s,events_sent,events_rows,events_mb,events_dead_tuples,message_ids_rows,message_ids_mb,order_keys_rows,total_db_mb", flush=True)
        t0 = time.time()
        while True:
            time.sleep(a.every if time.time() + a.every <= stop else max(0, stop - time.time()))
            q = ("SELECT (SELECT count(*) FROM events), pg_total_relation_size('events')/1048576.0, "
                 "(SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname='events'), "
                 "(SELECT count(*) FROM message_ids), pg_total_relation_size('message_ids')/1048576.0, "
                 "(SELECT count(*) FROM order_keys), pg_database_size(current_database())/1048576.0")
            r = psql(url, q).split("|")
            print(f"{time.time() - t0:.0f},{sent[0]},{r[0]},{float(r[1]):.1f},{r[2]},{r[3]},{float(r[4]):.1f},{r[5]},{float(r[6]):.1f}", flush=True)
            if time.time() >= stop:
                break
        for t in ts:
            t.join()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        psql(admin, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")

if __name__ == "__main__":
    main()
