#!/usr/bin/env python3
"""Two worker classes, one three times slower for the stage (issue 5): granule
shards the stage across both, each class sizing its fragments by what it learned.

    python3 bench/classes.py [items] [base_us]

One worker of class `fast` and one of class `slow` (1 slot each) run slow.py over
`items` items of `base_us` µs each (3x on `slow`). The lower bound for that pool is
the fluid one: total work on `fast` / (1 + 1/3). Prints makespan / lower bound,
the share each class did, and the predictor's error (median and p90, after the
first 20 fragments)."""
import json, os, subprocess, sys, tempfile, time

from common import GRANULE, PYTHON, ROOT, build, recorded, status

SLOW = os.path.join(ROOT, "bench", "slow.py")


def main():
    items = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    base_us = float(sys.argv[2]) if len(sys.argv) > 2 else 2000
    build()
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out")
        os.mkdir(out)
        env = dict(os.environ, BASE_US=str(base_us), FACTOR="1", SLOW_CLASS="slow", CLASS_FACTOR="3", OUT_DIR=out)
        env.pop("GRANULE_STORE", None)
        with open(os.path.join(d, "job.toml"), "w") as f:
            f.write(f'name = "classes"\n[[stage]]\nname = "work"\ncommand = {json.dumps([PYTHON, SLOW])}\n')
            f.write(f"items = {{ range = [0, {items}] }}\n")
        subprocess.run([GRANULE, "submit", "job.toml"], cwd=d, env=env, check=True, capture_output=True)
        t0 = time.perf_counter()
        workers = [
            subprocess.Popen([GRANULE, "worker", "-q", "--class", c, "--slots", "1"], cwd=d, env=env)
            for c in ("fast", "slow")
        ]
        for w in workers:
            w.wait()
        makespan = time.perf_counter() - t0
        st = status(d)["jobs"][0]
        seen = recorded(out)
        work_fast = items * base_us / 1e6
        bound = work_fast / (1 + 1 / 3)
        stage = st["stages"][0]
        shares = {c["class"]: c["items"] for c in stage["classes"]}
        print(json.dumps({
            "items": items,
            "state": st["state"],
            "done": stage["done"],
            "missing": items - len(seen),
            "makespan_s": round(makespan, 2),
            "lower_bound_s": round(bound, 2),
            "ratio": round(makespan / bound, 3),
            "items_by_class": shares,
            "item_cost_us_by_class": {c["class"]: round(c["item_cost_us"], 1) for c in stage["classes"]},
            "prediction_error_median": stage["prediction_error_median"],
            "prediction_error_p90": stage["prediction_error_p90"],
        }, indent=1))


if __name__ == "__main__":
    main()
