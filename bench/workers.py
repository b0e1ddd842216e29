#!/usr/bin/env python3
"""Benchmarks of workers that end (issue 3). Figures are ratios to the ideal
(total work / slots) and counts of items run twice, measured in one run.

    python3 bench/workers.py [succession] [sigterm] [sigkill] [straggler]

succession  ~60 s of spin.py work on 2 slots, run by a succession of 1-slot workers
            with 5 s lifespans: makespan / ideal, work run twice
sigterm     the same job, a random worker gets SIGTERM (grace 2 s) every 0.5-4 s
sigkill     the same job, a random worker gets SIGKILL every 0.5-4 s: work run
            twice per kill, against one heartbeat (100 ms) x 1 slot
straggler   2 workers; items 40,000-41,000 of 50,000 are 20x slower: makespan /
            ideal with splitting, and without (--no-steal) in the same run
"""
import importlib.util, json, os, random, signal, subprocess, sys, tempfile, time

from common import GRANULE, PYTHON, ROOT, SPIN, build, recorded, status, write_spec

SLOW = os.path.join(ROOT, "bench", "slow.py")
SPIN_ENV = {"MED_US": "40", "SIGMA": "1.3", "SEED": "7"}


def load_spin():
    spec = importlib.util.spec_from_file_location("spin", SPIN)
    os.environ.update(SPIN_ENV)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def drive(d, env, workers, args, chaos=None, limit=600):
    """Keeps `workers` worker processes alive until the job is done."""
    procs = [None] * workers
    t0 = time.perf_counter()
    kills = 0
    while True:
        st = status(d)["jobs"][0]
        if st["state"] != "running":
            break
        assert time.perf_counter() - t0 < limit, "job did not finish"
        for i, p in enumerate(procs):
            if p is None or p.poll() is not None:
                procs[i] = subprocess.Popen([GRANULE, "worker", "-q", "--slots", "1", *args], cwd=d, env=env)
        if chaos:
            kills += chaos(procs)
        time.sleep(0.02)
    makespan = time.perf_counter() - t0
    for p in procs:
        if p:
            p.wait()
    return makespan, kills


def spin_job(d, items):
    write_spec(d, [PYTHON, SPIN], items)
    out = os.path.join(d, "out")
    os.mkdir(out)
    env = dict(os.environ, **SPIN_ENV, OUT_DIR=out)
    subprocess.run([GRANULE, "submit", "job.toml"], cwd=d, check=True, capture_output=True)
    return env, out


def report(name, d, out, items, work, makespan, spin, kills=0):
    seen = recorded(out)
    s = status(d)["jobs"][0]["stages"][0]
    missing = items - len(seen)
    twice = {i: c - 1 for i, c in seen.items() if c > 1}
    twice_s = sum(spin.cost_us(i) * c for i, c in twice.items()) / 1e6
    line = (f"{name}: {items} items, work {work:.1f}s, ideal {work / 2:.1f}s, makespan {makespan:.1f}s, "
            f"ratio {makespan / (work / 2):.3f}; done {s['done']} (counted once: {s['done'] == items}), "
            f"missing {missing}, run twice {sum(twice.values())} items = {twice_s:.2f}s "
            f"({100 * twice_s / work:.2f}% of the work); yields {s['yields']}, splits {s['splits']}, lost {s['lost']}")
    if kills:
        line += f"; {kills} kills, {twice_s / kills * 1e3:.0f} ms of work run twice per kill"
    print(line, flush=True)


ITEMS = 640_000  # about 60 s of spin.py work at median 40 us, sigma 1.3


def succession(spin, work):
    with tempfile.TemporaryDirectory() as d:
        env, out = spin_job(d, ITEMS)
        makespan, _ = drive(d, env, 2, ["--lifespan", "5s"])
        report("succession (5 s lifespans)", d, out, ITEMS, work, makespan, spin)


def chaos_run(spin, work, sig, name):
    rng = random.Random(11)
    nxt = [time.perf_counter() + rng.uniform(0.5, 4)]

    def chaos(procs):
        if time.perf_counter() < nxt[0]:
            return 0
        nxt[0] = time.perf_counter() + rng.uniform(0.5, 4)
        victim = rng.choice([p for p in procs if p and p.poll() is None] or [None])
        if victim is None:
            return 0
        victim.send_signal(sig)
        return 1

    with tempfile.TemporaryDirectory() as d:
        env, out = spin_job(d, ITEMS)
        makespan, kills = drive(d, env, 2, ["--grace", "2s"], chaos)
        report(name, d, out, ITEMS, work, makespan, spin, kills)


def straggler():
    n, env_extra = 50_000, {"BASE_US": "200", "FACTOR": "20", "SLOW_FROM": "40000", "SLOW_TO": "41000"}
    work = float(subprocess.run([PYTHON, SLOW, "--total", str(n)], env=dict(os.environ, **env_extra),
                                capture_output=True, text=True, check=True).stdout)
    for args, label in ((["--idle-exit", "1s"], "straggler with splitting"), (["--idle-exit", "1s", "--no-steal"], "straggler without splitting")):
        with tempfile.TemporaryDirectory() as d:
            write_spec(d, [PYTHON, SLOW], n)
            subprocess.run([GRANULE, "submit", "job.toml"], cwd=d, check=True, capture_output=True)
            env = dict(os.environ, **env_extra)
            t0 = time.perf_counter()
            procs = [subprocess.Popen([GRANULE, "worker", "-q", "--slots", "1", *args], cwd=d, env=env) for _ in range(2)]
            while status(d)["jobs"][0]["state"] == "running":
                time.sleep(0.02)
            makespan = time.perf_counter() - t0
            for p in procs:
                p.wait()
            s = status(d)["jobs"][0]["stages"][0]
            print(f"{label}: work {work:.1f}s, ideal {work / 2:.2f}s, makespan {makespan:.2f}s, "
                  f"ratio {makespan / (work / 2):.3f} (bar <= 1.25 with splitting), splits {s['splits']}, "
                  f"done {s['done']}/{n}", flush=True)


def main():
    which = sys.argv[1:] or ["succession", "sigterm", "sigkill", "straggler"]
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "granule"], cwd=ROOT, check=True)
    spin = load_spin()
    work = sum(spin.cost_us(i) for i in range(ITEMS)) / 1e6 if set(which) - {"straggler"} else 0
    for w in which:
        if w == "succession":
            succession(spin, work)
        elif w == "sigterm":
            chaos_run(spin, work, signal.SIGTERM, "sigterm (grace 2 s)")
        elif w == "sigkill":
            chaos_run(spin, work, signal.SIGKILL, "sigkill")
        elif w == "straggler":
            straggler()
        else:
            sys.exit(f"unknown benchmark {w}")


if __name__ == "__main__":
    main()
