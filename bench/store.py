#!/usr/bin/env python3
"""Benchmarks of the shared store (issue 4), each against a baseline in the same run.

    python3 bench/store.py [tps] [items] [restart] [--pg postgres://postgres@127.0.0.1:5432/postgres]

tps      32 clients looping claim-one-item -> finish on PostgreSQL (the store's own
         path, as a worker runs it: each finish claims the next fragment in its
         transaction) against pgbench's TPC-B-like script with 32 clients; also 1 and
         8 clients (each against pgbench with as many), and SQLite
items    `cat >/dev/null` over 20,000,000 items with 1, 8 and 32 worker processes
         (1 slot each): items/s and claims (fragments)/s, PostgreSQL and SQLite
restart  ~60 s of spin.py work on 2 workers while PostgreSQL is restarted twice:
         completes, no item missing, none counted twice
"""
import json, os, re, subprocess, sys, tempfile, time

from common import GRANULE, PYTHON, ROOT, SPIN, build, recorded, status, write_spec

PG = os.environ.get("GRANULE_BENCH_POSTGRES", "postgres://postgres@127.0.0.1:5432/postgres")


def psql(sql, url=PG):
    subprocess.run(["psql", "-q", "-d", url, "-c", sql], check=True, capture_output=True)


def fresh_db(name):
    psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    psql(f"CREATE DATABASE {name}")
    return PG.rsplit("/", 1)[0] + "/" + name


def pgbench(clients=32, seconds=10, scale=32, fresh=True):
    # Scale at least the number of clients: at -s 1 every TPC-B update hits the one
    # branch row and the baseline measures lock contention, not the server.
    url = fresh_db("granule_pgbench") if fresh else PG.rsplit("/", 1)[0] + "/granule_pgbench"
    if fresh:
        subprocess.run(["pgbench", "-i", "-q", "-s", str(scale), url], check=True, capture_output=True)
    out = subprocess.run(["pgbench", "-c", str(clients), "-j", "2", "-T", str(seconds), url],
                         check=True, capture_output=True, text=True).stdout
    return float(re.search(r"tps = ([\d.]+)", out).group(1))


def bench_store(clients, seconds, store=None):
    with tempfile.TemporaryDirectory() as d:
        args = [GRANULE, "bench-store", "--clients", str(clients), "--duration", f"{seconds}s", "--state", d]
        if store:
            args += ["--store", store]
        out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def tps():
    base = pgbench()
    url = fresh_db("granule_bench_store")
    r = bench_store(32, 10, url)
    print(f"tps: pgbench (TPC-B-like, -s 32, 32 clients) {base:.0f} tps; granule claim->finish, 32 clients on "
          f"PostgreSQL: {r['cycles_per_s']:.0f} cycles/s (each one transaction: the finish claims the next), "
          f"ratio {r['cycles_per_s'] / base:.2f} in cycles (bar >= 1.0), claimed twice {r['claimed_twice']}",
          flush=True)
    for clients in (1, 8):
        base = pgbench(clients, 5, fresh=False)
        r = bench_store(clients, 5, fresh_db("granule_bench_store"))
        print(f"tps: {clients} clients on PostgreSQL: {r['cycles_per_s']:.0f} cycles/s, pgbench with "
              f"{clients} clients {base:.0f} tps, ratio {r['cycles_per_s'] / base:.2f}", flush=True)
    for clients in (1, 8, 32):
        r = bench_store(clients, 5)
        print(f"tps: {clients} clients on SQLite: {r['cycles_per_s']:.0f} cycles/s, claimed twice {r['claimed_twice']}",
              flush=True)


def run_workers(d, env, workers, limit=600):
    subprocess.run([GRANULE, "submit", "job.toml"], cwd=d, env=env, check=True, capture_output=True)
    t0 = time.perf_counter()
    procs = [subprocess.Popen([GRANULE, "worker", "-q", "--slots", "1"], cwd=d, env=env) for _ in range(workers)]
    for p in procs:
        p.wait(timeout=limit)
    return time.perf_counter() - t0


def items():
    n = 20_000_000
    for backend in ("postgres", "sqlite"):
        for workers in (1, 8, 32):
            with tempfile.TemporaryDirectory() as d:
                env = dict(os.environ)
                env.pop("GRANULE_STORE", None)
                if backend == "postgres":
                    env["GRANULE_STORE"] = fresh_db("granule_bench_items")
                write_spec(d, ["sh", "-c", "cat >/dev/null"], n)
                elapsed = run_workers(d, env, workers)
                s = status(d, env)["jobs"][0]["stages"][0]
                ok = s["done"] == n
                print(f"items: {backend}, {workers} workers x 1 slot, {n} items: {elapsed:.2f}s, "
                      f"{n / elapsed / 1e6:.2f} M items/s (bar >= 1 M/s at 32 on PostgreSQL), "
                      f"{s['fragments'] / elapsed:.0f} claims/s ({s['fragments']} fragments), all counted once: {ok}",
                      flush=True)


def restart():
    items_n = 640_000
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out")
        os.mkdir(out)
        env = dict(os.environ, MED_US="40", SIGMA="1.3", SEED="7", OUT_DIR=out, GRANULE_STORE=fresh_db("granule_bench_restart"))
        write_spec(d, [PYTHON, SPIN], items_n)
        subprocess.run([GRANULE, "submit", "job.toml"], cwd=d, env=env, check=True, capture_output=True)
        t0 = time.perf_counter()
        procs = [subprocess.Popen([GRANULE, "worker", "-q", "--slots", "1"], cwd=d, env=env) for _ in range(2)]
        version = sorted(os.listdir("/etc/postgresql"))[-1]
        restarts = []
        for at in (10, 20):
            time.sleep(max(0, at - (time.perf_counter() - t0)))
            subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"], check=True)
            restarts.append(round(time.perf_counter() - t0, 1))
            assert any(p.poll() is None for p in procs), "the job ended before the restart"
        for p in procs:
            p.wait(timeout=600)
        elapsed = time.perf_counter() - t0
        s = status(d, env)["jobs"][0]["stages"][0]
        seen = {}
        for name in os.listdir(out):
            for line in open(os.path.join(out, name)):
                seen[int(line)] = seen.get(int(line), 0) + 1
    missing = items_n - len(seen)
    twice = sum(c - 1 for c in seen.values())
    print(f"restart: PostgreSQL restarted at {restarts} s; job finished in {elapsed:.1f}s, done {s['done']} of "
          f"{items_n} (counted once: {s['done'] == items_n}), missing {missing}, run twice {twice} items, lost {s['lost']}",
          flush=True)


def main():
    which = [a for a in sys.argv[1:] if not a.startswith("--")] or ["tps", "items", "restart"]
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "granule"], cwd=ROOT, check=True)
    for w in which:
        {"tps": tps, "items": items, "restart": restart}[w]()


if __name__ == "__main__":
    main()
