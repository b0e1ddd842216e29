#!/usr/bin/env python3
"""Benchmark tasks of bench/adaptive.py, one per mode (first argument):

    noack   spin.py's items (same costs) without acks: an all-or-nothing task
    iowait  each item waits WAIT_MS on a timer (I/O-like, no CPU), then acks

Items on stdin, acks on fd 3 where the mode acks (fd 3 may be absent)."""
import os, sys, time

mode = sys.argv[1]
if mode == "noack":
    # spin.py itself, without fd 3: it then never acks. (Loading it as a module ran
    # its loop, acks included, so this case measured an acking task.)
    spin_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "bench", "spin.py")
    try:
        os.close(3)
    except OSError:
        pass
    os.execv(sys.executable, [sys.executable, spin_path])
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
