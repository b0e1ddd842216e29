#!/usr/bin/env python3
"""Benchmark task that waits instead of spinning: each item sleeps ITEM_MS (so many
workers share 2 cores without slowing each other; a pool's `env` makes one class
slower), acks on fd 3 and records the item under OUT_DIR like spin.py."""
import os, sys, time

wait = float(os.environ.get("ITEM_MS", "100")) / 1e3
ack = os.fdopen(3, "w", buffering=1)
out = os.environ.get("OUT_DIR")
rec = open(os.path.join(out, f"{os.getpid()}.txt"), "a", buffering=1) if out else None
for line in sys.stdin:
    time.sleep(wait)
    if rec:
        rec.write(line)
    ack.write(line)
