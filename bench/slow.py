#!/usr/bin/env python3
"""Benchmark task with a slow band: each item costs BASE_US microseconds of busy
spinning, FACTOR times that for items in [SLOW_FROM, SLOW_TO), and CLASS_FACTOR
times that on a worker whose class (GRANULE_CLASS) is SLOW_CLASS. Acks on fd 3;
records items under OUT_DIR like spin.py. `slow.py --total N` prints the total
work of items 0..N in seconds (on a normal worker)."""
import os, sys, time

base = float(os.environ.get("BASE_US", "200")) / 1e6
factor = float(os.environ.get("FACTOR", "20"))
lo, hi = int(os.environ.get("SLOW_FROM", "0")), int(os.environ.get("SLOW_TO", "0"))
if os.environ.get("GRANULE_CLASS") and os.environ.get("GRANULE_CLASS") == os.environ.get("SLOW_CLASS"):
    base *= float(os.environ.get("CLASS_FACTOR", "3"))


def cost(i):
    return base * (factor if lo <= i < hi else 1)


if len(sys.argv) > 2 and sys.argv[1] == "--total":
    print(sum(cost(i) for i in range(int(sys.argv[2]))))
    sys.exit(0)
ack = os.fdopen(3, "w", buffering=1)
out = os.environ.get("OUT_DIR")
rec = open(os.path.join(out, f"{os.getpid()}.txt"), "a", buffering=1) if out else None
for line in sys.stdin:
    end = time.perf_counter() + cost(int(line))
    while time.perf_counter() < end:
        pass
    if rec:
        rec.write(line)
    ack.write(line)
