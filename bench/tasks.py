#!/usr/bin/env python3
"""Benchmark tasks of bench/adaptive.py, one per mode (first argument):

    noack   spin.py's items (same costs) without acks: an all-or-nothing task
    iowait  each item waits WAIT_MS on a timer (I/O-like, no CPU), then acks

Items on stdin, acks on fd 3 where the mode acks (fd 3 may be absent)."""
import importlib.util, os, sys, time

mode = sys.argv[1]
if mode == "noack":
    spin_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "bench", "spin.py")
    spec = importlib.util.spec_from_file_location("spin", spin_path)
    spin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(spin)
    for line in sys.stdin:
        end = time.perf_counter() + spin.cost_us(int(line)) / 1e6
        while time.perf_counter() < end:
            pass
elif mode == "iowait":
    wait = float(os.environ.get("WAIT_MS", "5")) / 1e3
    try:
        ack = os.fdopen(3, "w", buffering=1)
    except OSError:
        ack = None
    for line in sys.stdin:
        time.sleep(wait)
        if ack:
            ack.write(line)
else:
    sys.exit(f"tasks.py: unknown mode {mode!r} (noack, iowait)")
