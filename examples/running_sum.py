#!/usr/bin/env python3
"""A stateful granule task: a running sum over its items that survives preemption.

granule feeds item values on stdin and closes stdin when the fragment must yield
(a preemption notice, the end of a worker's lifespan, a split). This task cannot
tell a finished fragment from a yielding one, and need not: at the end of its input
it always writes its state to a file and hands it over with the command
`$GRANULE_CMD checkpoint PATH` on fd 3 (protocol 2: GRANULE_CMD is a tag granule
makes for each fragment, so no item value can pass for a command).

- If every item of the fragment was acked, that checkpoint is the fragment's
  result (`granule results STAGE` lists them; the answer is the sum of results).
- Otherwise it is handed to whichever worker resumes the rest, as the file named
  by GRANULE_CHECKPOINT, and the sum continues from it.

Every CHECKPOINT_EVERY items it also checkpoints mid-way, writing the acks of the
items the state covers and the checkpoint line in one write: granule records
them together or not at all, so even a SIGKILL leaves state and acks in agreement.
"""
import json, os, sys, time

ack = os.fdopen(3, "w")  # not line-buffered: acks go out with their checkpoint
every = int(os.environ.get("CHECKPOINT_EVERY", "0"))
cost = float(os.environ.get("ITEM_SECONDS", "0"))
state_dir = os.environ.get("STATE_DIR", ".")
fragment = os.environ["GRANULE_FRAGMENT"]
command = os.environ["GRANULE_CMD"]

total, count = 0, 0
restored = os.environ.get("GRANULE_CHECKPOINT")
if restored:
    with open(restored) as f:
        total, count = json.load(f)


def checkpoint(pending_acks):
    path = os.path.join(state_dir, f"sum-{fragment}-{count}.json")
    with open(path + ".tmp", "w") as f:
        json.dump([total, count], f)
    os.rename(path + ".tmp", path)  # never hand over a half-written file
    ack.write("".join(pending_acks) + f"{command} checkpoint {path}\n")
    ack.flush()


pending = []
for line in sys.stdin:
    if cost:
        time.sleep(cost)
    total += int(line)
    count += 1
    pending.append(line)
    if every and len(pending) >= every:
        checkpoint(pending)
        pending = []
checkpoint(pending)
