#!/usr/bin/env python3
"""Store writes per heartbeat as a worker runs more fragments at once (issue 10).

    python3 bench/writes.py [--seconds 10] [--slots 4,32]

One `granule run` on SQLite per slot count: 1-item fragments of `true` for
`--seconds`, then Ctrl-C. The worker prints the rows its store connection wrote per
claim, flush (heartbeat with acks) and finish (`--write-counts`). Writes per flush and
per finish must not grow with the number of running fragments: the ratio of 32 slots
to 4 is printed, and should be about 1.
"""
import argparse, json, os, re, signal, subprocess, tempfile, time

from common import GRANULE, build


def run(slots, seconds):
    with tempfile.TemporaryDirectory() as d:
        spec = os.path.join(d, "job.toml")
        with open(spec, "w") as f:
            f.write('name = "writes"\n[[stage]]\nname = "s"\ncommand = ["true"]\n')
            f.write("items = { range = [0, 100000000] }\n[stage.sizer]\nmax_items = 1\n")
        p = subprocess.Popen([GRANULE, "run", spec, "--slots", str(slots), "--quiet", "--write-counts"],
                             cwd=d, stderr=subprocess.PIPE, text=True)
        time.sleep(seconds)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        m = re.search(r"store writes (\{.*\})", err)
        if not m:
            raise SystemExit(f"no write counts from granule (exit {p.returncode}):\n{err}")
        return json.loads(m.group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--slots", default="4,32")
    args = ap.parse_args()
    build()
    rows = {}
    for slots in [int(s) for s in args.slots.split(",")]:
        w = run(slots, args.seconds)
        calls = {"claim": "claims", "flush": "flushes", "finish": "finishes"}
        per = {k: w[f"{k}_rows"] / max(w[n], 1) for k, n in calls.items()}
        rows[slots] = per
        print(json.dumps({"slots": slots, **w, **{f"rows_per_{k}": round(v, 2) for k, v in per.items()}}))
    lo, hi = min(rows), max(rows)
    for k in ("flush", "finish"):
        print(f"rows per {k}: {rows[lo][k]:.2f} at {lo} slots, {rows[hi][k]:.2f} at {hi} slots "
              f"(ratio {rows[hi][k] / max(rows[lo][k], 1e-9):.2f})")


if __name__ == "__main__":
    main()
