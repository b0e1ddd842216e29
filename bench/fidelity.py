#!/usr/bin/env python3
"""Does the simulator measure what ships? (issue 11's fidelity check.) Each case of
bench/adaptive.py runs for real (the oracle split and `granule run`, back to back,
2 slots) and in the simulator with what was measured here: the task's start cost (the
median of 5 runs with no items, under the case's load), the mean item cost (from the
oracle's time: (oracle - start) * slots / items), the case's spread, acks and drift.
The simulated oracle is the start plus an equal share of the work per slot (the
`static` policy's time where items are not banded, printed as a check of the cost
model); the simulator's per-fragment machine jitter is off (this machine's cores
are alike). Prints, per
case, granule / oracle for real and in the simulator, and the simulated oracle
against the real one.

    python3 bench/fidelity.py [CASE ...]
"""
import json, os, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import adaptive
from common import GRANULE, build

SLOTS = adaptive.SLOTS
# The spread (sigma of a log-normal) each case's task draws its item costs from;
# drift and loaded items cost the same but for the drift's band.
SPREAD = {"shim": 1.3, "sigma2": 2.0, "drift": 0.0, "noack": 1.0, "loaded": 0.0}


def fd3(fd):
    """In the child: `fd` as an inherited fd 3 (it may be 3 already, close-on-exec)."""
    os.dup2(fd, 3)
    os.set_inheritable(3, True)


def start_cost_ms(argv, env):
    """Median time of the task run on no items (fd 3 to /dev/null), ms."""
    sink = os.open(os.devnull, os.O_WRONLY)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       close_fds=False, preexec_fn=lambda: fd3(sink), check=True)
        times.append((time.perf_counter() - t0) * 1e3)
    os.close(sink)
    return statistics.median(times)


def scenario(name, items, item_ms, spread, start_ms, acks, drift):
    # The two cores of this machine are alike: no per-fragment machine jitter.
    text = (f'name = "fidelity-{name}"\nseed = 7\njitter = 0.0\n[[class]]\nname = "cpu"\ncount = 1\n'
            f'slots = {SLOTS}\n[[stage]]\nname = "work"\nitems = {items}\nitem_ms = {item_ms}\n'
            f'spread = {spread}\noverhead_ms = {start_ms}\nacks = {"true" if acks else "false"}\n')
    if drift:
        lo, hi, factor = drift
        text += f'drift_items = [{lo}, {hi}]\ndrift_factor = {factor}\n'
    return text


def simulate(text):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "case.toml")
        with open(path, "w") as f:
            f.write(text)
        out = subprocess.run([GRANULE, "sim", path, "--policy", "all", "--json"],
                             capture_output=True, text=True, check=True)
    return {r["policy"]: r["makespan_ms"] / 1e3 for r in json.loads(out.stdout)}


def case(name):
    argv, env, items, loops = adaptive.CASES[name]
    with adaptive.busy(loops):
        start = start_cost_ms(argv, env)
    base, ours, _ = adaptive.measure(argv, env, items, loops)
    work_ms = (base * 1e3 - start) * SLOTS  # all items' work, as the oracle ran it
    drift = None
    if name == "drift":
        # Items [SLOW_FROM, SLOW_TO) cost FACTOR times the others.
        lo, hi, factor = (int(env["SLOW_FROM"]), int(env["SLOW_TO"]), float(env["FACTOR"]))
        item_ms, drift = work_ms / (items - (hi - lo) + (hi - lo) * factor), (lo, hi, factor)
    else:
        item_ms = work_ms / items
    sim = simulate(scenario(name, items, item_ms, SPREAD[name], start, name != "noack", drift))
    # The oracle's makespan in the simulator: the start and an equal share of the
    # work per slot (what its interleaved split achieves; `static` hands out
    # contiguous chunks, which a band of costly items unbalances).
    sim_oracle = (start + work_ms / SLOTS) / 1e3
    real_ratio, sim_ratio = ours / base, sim["granule"] / sim_oracle
    gap = sim_ratio / real_ratio - 1
    print(f"{name}: start {start:.0f} ms, item {item_ms * 1e3:.0f} us; real granule/oracle {real_ratio:.3f}, "
          f"sim granule/oracle {sim_ratio:.3f} (gap {100 * gap:+.1f}%); sim static / real oracle "
          f"{sim['static'] / base:.3f}; sim factoring/static {sim['factoring'] / sim['static']:.3f}",
          flush=True)
    return gap


def main():
    which = sys.argv[1:] or list(adaptive.CASES)
    build()
    gaps = {name: case(name) for name in which}
    worst = max(gaps, key=lambda n: abs(gaps[n]))
    print(f"largest gap: {worst} {100 * gaps[worst]:+.1f}% (bar: within 5%)")


if __name__ == "__main__":
    main()
