"""Fair share across jobs and owners on PostgreSQL (issue 15's bars).

  python3 bench/fair.py equal      # ada and bob, equal shares, one job each 5 s apart,
                                   # 2 workers x 2 slots: bob's share of busy slot-seconds
                                   # in every 10 s window from his submission on
  python3 bench/fair.py shares     # the same with shares ada=3 bob=1: ada's share
  python3 bench/fair.py priority   # carol's job at priority 10 comes 10 s after both:
                                   # which claims went to others while she had work
  python3 bench/fair.py            # all three

Tasks run as users run them: `python3` from PATH (spin.py, 20 ms per item median), so
every fragment pays the interpreter's start. Shares are computed from the store's own
fragment rows (claim to end: the time each held a slot); the entitlement they are held
to is computed apart, from the shares alone. SECONDS sets how long each is measured
after the last submission (default 60); STAGE_EXTRA adds lines to every stage (e.g.
'target = "60s"\n': fragments long enough that only a fairness split frees a slot).
"""
import json, os, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import GRANULE, SPIN, build  # noqa: E402

PG = os.environ.get("GRANULE_BENCH_POSTGRES", "postgres://postgres@127.0.0.1:5432/postgres")
DB = "granule_fair_bench"
URL = PG.rsplit("/", 1)[0] + "/" + DB
SECONDS = float(os.environ.get("SECONDS", "60"))


def psql(sql, url=PG):
    return subprocess.run(["psql", "-qAt", "-F", "\t", "-d", url, "-c", sql], check=True,
                          capture_output=True, text=True).stdout


def fresh_db():
    psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    psql(f"CREATE DATABASE {DB}")


def granule(d, *args):
    env = dict(os.environ, GRANULE_STORE=URL)
    return subprocess.run([GRANULE, *args], cwd=d, env=env, check=True, capture_output=True, text=True)


def spec(d, name, owner, items, priority=0):
    path = os.path.join(d, f"{name}.toml")
    with open(path, "w") as f:
        f.write(f'name = "{name}"\nowner = "{owner}"\npriority = {priority}\n[[stage]]\nname = "work"\n'
                f'command = ["python3", "{SPIN}"]\nitems = {{ range = [0, {items}] }}\n'
                + os.environ.get("STAGE_EXTRA", "").replace("\\n", "\n"))
    return path


def slot_time(now_ms):
    """Every fragment as (owner, claimed ms, ended ms): the span it held a slot."""
    rows = psql("SELECT s.needs::json->>'owner', f.claimed_ms, coalesce(f.finished_ms, -1), f.state "
                "FROM fragments f JOIN stages s ON s.id = f.stage_id ORDER BY f.claimed_ms", URL)
    out = []
    for line in rows.splitlines():
        owner, a, b, state = line.split("\t")
        b = int(b)
        out.append((owner, int(a), now_ms if b < 0 else b, state))
    return out


def windows(frags, start_ms, end_ms, width_ms=10_000, step_ms=1000):
    """Each owner's share of busy slot-ms in every window [t, t + width) from start_ms."""
    res = []
    t = start_ms
    while t + width_ms <= end_ms:
        busy = {}
        for owner, a, b, _ in frags:
            o = max(0, min(b, t + width_ms) - max(a, t))
            if o:
                busy[owner] = busy.get(owner, 0) + o
        total = sum(busy.values())
        res.append((t, {k: v / total for k, v in busy.items()} if total else {}))
        t += step_ms
    return res


def scenario(kind):
    fresh_db()
    d = tempfile.mkdtemp(prefix="granule-fair-")
    env = dict(os.environ, GRANULE_STORE=URL, MED_US="20000", SIGMA="0.5")
    workers = []
    try:
        if kind == "shares":
            granule(d, "shares", "ada=3", "bob=1")
        granule(d, "submit", spec(d, "ada-job", "ada", 20000))
        t_ada = time.time()
        workers = [subprocess.Popen([GRANULE, "worker", "--slots", "2"], cwd=d, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True) for _ in range(2)]
        time.sleep(5)
        t_bob = time.time()
        granule(d, "submit", spec(d, "bob-job", "bob", 20000))
        t_carol = None
        if kind == "priority":
            time.sleep(10)
            t_carol = time.time()
            granule(d, "submit", spec(d, "carol-job", "carol", 20000, priority=10))
        time.sleep(SECONDS)
        now = int(time.time() * 1000)
        frags = slot_time(now)
        fair = json.loads(granule(d, "shares", "--json").stdout)
    finally:
        for w in workers:
            try:
                os.killpg(w.pid, 9)
            except ProcessLookupError:
                pass
    start = int(t_bob * 1000)
    print(f"{kind}: ada's job at 0 s, bob's at +{t_bob - t_ada:.1f} s"
          + (f", carol's (priority 10) at +{t_carol - t_ada:.1f} s" if t_carol else "")
          + f"; {len(frags)} fragments, measured {SECONDS:.0f} s after the last submission")
    print("  standing at the end (granule shares): " + "; ".join(
        f"{o['owner']}: {o['shares']:g} shares, {o['usage_s']:.0f} slot-s lately, {o['slots']} slots"
        for o in fair["owners"]))
    if kind in ("equal", "shares"):
        target = 0.5 if kind == "equal" else 0.75  # computed from the shares alone
        ws = windows(frags, start, now)
        ada = [w.get("ada", 0.0) for _, w in ws]
        inside = sum(1 for a in ada if abs(a - target) <= 0.10 + 1e-9)
        print(f"  ada's share of busy slot-seconds over {len(ws)} sliding 10 s windows from bob's "
              f"submission: min {min(ada):.1%}, median {sorted(ada)[len(ada) // 2]:.1%}, max {max(ada):.1%}")
        print(f"  bar: {target:.0%} +/- 10% in every window: {'met' if inside == len(ws) else 'NOT met'} "
              f"({inside} of {len(ws)} windows inside)")
        firsts = [f for f in frags if f[0] == "bob"]
        if firsts:
            print(f"  bob's first fragment claimed {(firsts[0][1] - start) / 1000:.2f} s after his submission")
    else:
        c = int(t_carol * 1000)
        after = [f for f in frags if f[1] >= c]
        carol = [f for f in after if f[0] == "carol"]
        others = [f for f in after if f[0] != "carol"]
        held = windows(frags, c + 5000, now, width_ms=5000, step_ms=5000)
        print(f"  claims after carol's submission: {len(carol)} hers, {len(others)} others'"
              + (f" (first other at +{(others[0][1] - c) / 1000:.2f} s)" if others else ""))
        print("  carol's share of busy slot-seconds per 5 s window from +5 s: "
              + " ".join(f"{w.get('carol', 0.0):.0%}" for _, w in held))
        ok = not others
        print(f"  bar: priority 10 takes every free slot before either: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    build()
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    for kind in ("equal", "shares", "priority"):
        if which in (kind, "all"):
            scenario(kind)
