#!/usr/bin/env python3
"""A batch task for the pipeline benchmark: spins COST_MS of CPU per item, then emits
one output record (argv[1] + the value) and acks the item, flushing each: outputs
reach the next stage as soon as their item's ack commits."""
import os, sys, time

cost = float(os.environ.get("COST_MS", "2")) / 1e3
prefix = sys.argv[1] if len(sys.argv) > 1 else ""
cmd = os.environ["GRANULE_CMD"]
fd3 = os.fdopen(3, "w")
for line in sys.stdin:
    v = line.rstrip("\n")
    end = time.perf_counter() + cost
    while time.perf_counter() < end:
        pass
    fd3.write(f"{cmd} emit {prefix}{v}\n{v}\n")
    fd3.flush()
