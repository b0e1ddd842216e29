#!/usr/bin/env python3
"""Bars of `granule serve` (issue 13). Release build; `python3` from PATH in tasks.

  python3 bench/serve.py slurm     # a Slurm pool of 2 one-slot workers, 30 s walltime,
                                   # ~120 s of work: makespan / (work / 2), work run twice,
                                   # allocations left; then the same with serve killed -9
                                   # and restarted mid-job (most allocations alive at once)
  python3 bench/serve.py classes   # two local pools (one 3x slower, 4x cheaper) and a
                                   # deadline: which pools served, cost vs `granule sim`

`slurm` needs a cluster: SLURM_CONF set, or it starts one with scripts/slurm.sh."""
import json, os, sqlite3, subprocess, sys, tempfile, threading, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import GRANULE, ROOT, SPIN, build, recorded

SLEEP = os.path.join(ROOT, "bench", "sleep.py")


def job(d, command, items, deadline=None):
    with open(os.path.join(d, "job.toml"), "w") as f:
        f.write(f'name = "bench"\n[[stage]]\nname = "work"\ncommand = {json.dumps(command)}\n')
        f.write(f"items = {{ range = [0, {items}] }}\n")
        if deadline:
            f.write(f'deadline = "{deadline}"\n')
    subprocess.run([GRANULE, "submit", "job.toml"], cwd=d, check=True, capture_output=True)


def squeue(name):
    out = subprocess.run(["squeue", "-h", "-r", "-n", name, "-o", "%i"], capture_output=True, text=True)
    return [l for l in out.stdout.split() if l]


def slurm_run(kill_at=None):
    d = tempfile.mkdtemp(prefix="gserve-")
    out = os.path.join(d, "out"); os.mkdir(out)
    items, med = 2400, 50000  # ~120 s of spinning (sigma 0.5)
    total = float(subprocess.run(["python3", SPIN, "--total", str(items)], env={**os.environ, "MED_US": str(med), "SIGMA": "0.5"},
                                 capture_output=True, text=True, check=True).stdout)
    job(d, ["python3", SPIN], items)
    pool = f"b{os.getpid()}{'k' if kill_at else ''}"
    with open(os.path.join(d, "pools.toml"), "w") as f:
        f.write(f'[[pool]]\nname = "{pool}"\nprovider = "slurm"\nmax_workers = 2\nwalltime = "30s"\nmin_walltime = "30s"\n')
    env = {**os.environ, "MED_US": str(med), "SIGMA": "0.5", "OUT_DIR": out}
    cmd = [GRANULE, "serve", "--pools", "pools.toml", "--interval", "1s", "--until-done"]
    most, stop = [0], [False]
    def watch():
        while not stop[0]:
            n = len([j for j in squeue_all() if j[1].endswith("-" + pool)])
            most[0] = max(most[0], n)
            time.sleep(0.2)
    t = threading.Thread(target=watch); t.start()
    start = time.time()
    p = subprocess.Popen(cmd, cwd=d, env=env, stderr=subprocess.DEVNULL)
    if kill_at:
        time.sleep(kill_at)
        p.kill(); p.wait()
        p = subprocess.Popen(cmd, cwd=d, env=env, stderr=subprocess.DEVNULL)
    p.wait(timeout=900)
    makespan = time.time() - start
    stop[0] = True; t.join()
    seen = recorded(out)
    twice = sum(n - 1 for n in seen.values() if n > 1)
    con = sqlite3.connect(os.path.join(d, ".granule", "granule.db"))
    state = json.loads(con.execute("SELECT state FROM pools").fetchone()[0])
    left = [j for j in squeue_all() if j[1].endswith("-" + pool)]
    return {"makespan_s": round(makespan, 1), "work_s": round(total, 1), "ratio": round(makespan / (total / 2), 3),
            "items": len(seen), "runs_twice": twice, "twice_share": round(twice / items, 4),
            "allocations": state["launched"], "most_alive_at_once": most[0], "left_behind": len(left)}


def squeue_all():
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%j"], capture_output=True, text=True)
    return [tuple(l.split("|", 1)) for l in out.stdout.splitlines() if "|" in l]


def slurm():
    started = None
    if not os.environ.get("SLURM_CONF"):
        started = os.path.join(tempfile.gettempdir(), f"gserve-slurm-{os.getpid()}")
        line = subprocess.run(["bash", os.path.join(ROOT, "scripts", "slurm.sh"), "start", started],
                              capture_output=True, text=True, check=True).stdout.strip()
        os.environ["SLURM_CONF"] = line.split("=", 1)[1]
    try:
        print("slurm pool, 2 x 1 slot, 30 s walltime:", json.dumps(slurm_run()), flush=True)
        print("same, serve killed -9 at 25 s and restarted:", json.dumps(slurm_run(kill_at=25)), flush=True)
    finally:
        if started:
            subprocess.run(["bash", os.path.join(ROOT, "scripts", "slurm.sh"), "stop", started])


def classes_run(deadline_s, items=2400, slow_ms=150):
    d = tempfile.mkdtemp(prefix="gserve-")
    out = os.path.join(d, "out"); os.mkdir(out)
    job(d, ["python3", SLEEP], items, deadline=f"{deadline_s}s")
    with open(os.path.join(d, "pools.toml"), "w") as f:
        f.write(f'[[pool]]\nname = "cheap"\nprovider = "local"\nmax_workers = 4\ncost_per_hour = 1.0\n'
                f'env = {{ ITEM_MS = "{slow_ms}" }}\n\n'
                f'[[pool]]\nname = "dear"\nprovider = "local"\nmax_workers = 4\ncost_per_hour = 4.0\n'
                f'env = {{ ITEM_MS = "{slow_ms / 3}" }}\n')
    env = {**os.environ, "OUT_DIR": out}
    start = time.time()
    subprocess.run([GRANULE, "serve", "--pools", "pools.toml", "--interval", "1s", "--until-done"],
                   cwd=d, env=env, stderr=subprocess.DEVNULL, check=True, timeout=900)
    makespan = time.time() - start
    con = sqlite3.connect(os.path.join(d, ".granule", "granule.db"))
    cost, workers, by_class = 0.0, {}, {}
    created = con.execute("SELECT created_ms FROM jobs").fetchone()[0]
    lives = []
    for cls, started, last, price in con.execute("SELECT class, started_ms, heartbeat_ms, cost FROM workers ORDER BY started_ms"):
        cost += (last - started) / 3.6e6 * price
        workers[cls] = workers.get(cls, 0) + 1
        by_class[cls] = round(by_class.get(cls, 0) + (last - started) / 3.6e6 * price, 5)
        lives.append((cls, round((started - created) / 1e3, 1), round((last - created) / 1e3, 1)))
    if os.environ.get("VERBOSE"):
        print("worker lives (class, from s, to s after submit):", lives, flush=True)
    # The simulator on the same pools and work: autoscaled classes, a launch of 0.2 s,
    # idle workers retired as serve retires them (--retire-after 3 s, seen at a round
    # of 1 s, from an idle worker's heartbeat of 1 s).
    scenario = os.path.join(d, "sim.toml")
    with open(scenario, "w") as f:
        f.write(f'name = "serve"\nidle_exit = "5s"\nheartbeat = "100ms"\nplan_every = "1s"\n'
                f'[[class]]\nname = "cheap"\ncount = 4\ncost = 1.0\nautoscale = true\nreplace_after = "200ms"\n'
                f'[[class]]\nname = "dear"\ncount = 4\ncost = 4.0\nspeed = 3.0\nautoscale = true\nreplace_after = "200ms"\n'
                f'[[stage]]\nname = "work"\nitems = {items}\nitem_ms = {slow_ms}\nspread = 0.0\noverhead_ms = 300\ndeadline = "{deadline_s}s"\n')
    sim = json.loads(subprocess.run([GRANULE, "sim", scenario, "--json"], capture_output=True, text=True, check=True).stdout)
    return {"deadline_s": deadline_s, "makespan_s": round(makespan, 1), "workers_by_class": workers,
            "cost": round(cost, 5), "cost_by_class": by_class, "sim": sim_summary(sim)}


def sim_summary(sim):
    r = sim[0] if isinstance(sim, list) else sim
    r = r.get("granule", r) if isinstance(r, dict) else r
    keep = {"makespan_s": round(r["makespan_ms"] / 1e3, 1), "cost": round(r["cost"], 5)}
    if "classes" in r:
        keep["classes"] = {c["name"]: round(c.get("cost", 0), 5) for c in r["classes"]}
    return keep


def classes():
    for deadline in [int(a) for a in sys.argv[2:]] or (200, 60):
        print("two local pools, 2,400 items of 150 ms on cheap (50 ms on dear):", json.dumps(classes_run(deadline)), flush=True)


if __name__ == "__main__":
    build()
    {"slurm": slurm, "classes": classes}[sys.argv[1] if len(sys.argv) > 1 else "slurm"]()
