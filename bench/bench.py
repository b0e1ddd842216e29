#!/usr/bin/env python3
"""granule's benchmarks (not tests). Each figure is reported with the baseline it is
compared against, measured in the same run, because this machine is noisy.

    python3 bench/bench.py [hetero] [per_item] [kill9] [submit] [rss] [--slots 2]

hetero    150,000 spin.py items (median 40 us, sigma 1.3): makespan / (total work / slots)
per_item  3,000 x `true` in per-item mode: rate against `xargs -P<slots> -n1 true`
kill9     the hetero job killed with SIGKILL at a random moment, then rerun: items
          missing, counted twice, run twice
submit    seconds to submit a 100,000,000-item range (against a 1-item job)
rss       peak RSS of `granule run` on a 10,000,000-item job (`cat >/dev/null`)
"""
import argparse, json, os, random, signal, subprocess, sys, tempfile, time

from common import GRANULE, PYTHON, ROOT, SPIN, build, recorded, status, write_spec


def granule(d, *args, env=None, check=True):
    return subprocess.run([GRANULE, *args], cwd=d, env=env, check=check, capture_output=True, text=True)


def timed(argv, **kw):
    t = time.perf_counter()
    subprocess.run(argv, check=True, **kw)
    return time.perf_counter() - t


def spin_env(extra=None):
    env = dict(os.environ, MED_US="40", SIGMA="1.3", SEED="7")
    env.update(extra or {})
    return env


def total_work(n, env):
    return float(subprocess.run([PYTHON, SPIN, "--total", str(n)], env=env, check=True, capture_output=True, text=True).stdout)


def hetero(slots, n=150_000):
    env = spin_env()
    work = total_work(n, env)
    with tempfile.TemporaryDirectory() as d:
        write_spec(d, [PYTHON, SPIN], n)
        makespan = timed([GRANULE, "run", "job.toml", "--slots", str(slots), "-q"], cwd=d, env=env)
        s = status(d)["jobs"][0]["stages"][0]
        assert s["done"] == n, s
    ideal = work / slots
    print(f"hetero: {n} items, total work {work:.2f}s, {slots} slots, ideal {ideal:.2f}s, "
          f"makespan {makespan:.2f}s, ratio {makespan / ideal:.3f} (bar <= 1.15), "
          f"{s['fragments']} fragments, model {s['item_cost_us']:.1f} us/item")
    return makespan / ideal


def per_item(slots, n=3000):
    with tempfile.TemporaryDirectory() as d:
        write_spec(d, ["true"], n, per_item=True)
        ours = timed([GRANULE, "run", "job.toml", "--slots", str(slots), "-q"], cwd=d)
        assert status(d)["jobs"][0]["stages"][0]["done"] == n
    seq = subprocess.run(["seq", "0", str(n - 1)], capture_output=True).stdout
    xargs = timed(["xargs", f"-P{slots}", "-n1", "true"], input=seq)
    ratio = (n / ours) / (n / xargs)
    print(f"per_item: {n} x true, {slots} slots: granule {n / ours:.0f} items/s, "
          f"xargs {n / xargs:.0f} items/s, ratio {ratio:.2f} (bar >= 0.7)")
    return ratio


def kill9(slots, n=150_000, seed=None):
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out")
        os.mkdir(out)
        env = spin_env({"OUT_DIR": out})
        expected = total_work(n, env) / slots
        write_spec(d, [PYTHON, SPIN], n)
        at = rng.uniform(1.0, 0.8 * expected)
        p = subprocess.Popen([GRANULE, "run", "job.toml", "--slots", str(slots), "-q"], cwd=d, env=env)
        time.sleep(at)
        p.send_signal(signal.SIGKILL)
        p.wait()
        before = status(d)["jobs"][0]["stages"][0]["done"]
        granule(d, "run", "job.toml", "--slots", str(slots), "-q", env=env)
        s = status(d)["jobs"][0]["stages"][0]
        seen = recorded(out)
    missing = n - len(seen)
    twice = sum(c - 1 for c in seen.values())
    print(f"kill9: killed at {at:.1f}s with {before} of {n} done; after rerun: done {s['done']}, "
          f"missing {missing}, run twice {twice} ({100 * twice / n:.2f}% of the job; bar <= 2%), "
          f"counted once: {s['done'] == n}")
    return twice / n


def submit():
    times = {}
    for items in (1, 100_000_000):
        with tempfile.TemporaryDirectory() as d:
            write_spec(d, ["true"], items)
            times[items] = timed([GRANULE, "submit", "job.toml"], cwd=d, capture_output=True)
            db = os.path.getsize(os.path.join(d, ".granule", "granule.db"))
    print(f"submit: 100,000,000 items in {times[100_000_000]:.3f}s (1 item: {times[1]:.3f}s; bar < 1s), "
          f"store {db} bytes")
    return times[100_000_000]


def peak_rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None


def rss(slots, n=10_000_000):
    with tempfile.TemporaryDirectory() as d:
        write_spec(d, ["sh", "-c", "cat >/dev/null"], n)
        t = time.perf_counter()
        p = subprocess.Popen([GRANULE, "run", "job.toml", "--slots", str(slots), "-q"], cwd=d)
        peak = 0
        while p.poll() is None:
            peak = max(peak, peak_rss_kb(p.pid) or 0)
            time.sleep(0.02)
        elapsed = time.perf_counter() - t
        assert p.returncode == 0
        s = status(d)["jobs"][0]["stages"][0]
        assert s["done"] == n, s
    print(f"rss: {n} items ({s['fragments']} fragments) in {elapsed:.1f}s, peak RSS of granule run "
          f"{peak / 1024:.1f} MB (bar < 100 MB)")
    return peak


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", nargs="*", default=["hetero", "per_item", "kill9", "submit", "rss"])
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--seed", type=int)
    args = ap.parse_args()
    if not os.path.exists(SPIN):
        sys.exit(f"missing {SPIN}")
    build()
    for _ in range(args.repeat):
        for which in args.which:
            if which == "hetero":
                hetero(args.slots)
            elif which == "per_item":
                per_item(args.slots)
            elif which == "kill9":
                kill9(args.slots, seed=args.seed)
            elif which == "submit":
                submit()
            elif which == "rss":
                rss(args.slots)
            else:
                sys.exit(f"unknown benchmark {which}")


if __name__ == "__main__":
    main()
