#!/usr/bin/env python3
"""Benchmarks of stages that feed stages (issue 12), measured in one run.

    python3 bench/pipeline.py [pipelined] [kill9] [blob]

pipelined  stage 1 emits one record per item after ~2 ms of work, stage 2 does ~2 ms
           per record; 20,000 items, 2 slots, the task started as `python3` (the
           version manager's shim, as a user would). Makespan / (total work / 2), and
           the same two stages run one after the other (`after`) for comparison.
kill9      the same pipeline on two `granule worker --slots 1`, one killed with
           SIGKILL every 2 s (and restarted): stage 2's outputs must be exactly the
           expected set (no loss, no duplicate).
blob       a 1 GiB file handed from stage 1 to a stage 2 fragment on this host (two
           items name it: the second is served by the host cache): granule's store +
           fetch time against `zstd -3 -T1` compressing the same file, same run.
"""
import json, os, shutil, signal, subprocess, sys, tempfile, time

from common import GRANULE, ROOT, build

EMIT = os.path.join(ROOT, "bench", "emit.py")
ITEMS = int(os.environ.get("ITEMS", "20000"))
COST_MS = 2.0


def spec(d, after):
    path = os.path.join(d, "job.toml")
    with open(path, "w") as f:
        f.write('name = "pipe"\n')
        f.write(f'[[stage]]\nname = "s1"\ncommand = ["python3", "{EMIT}", "f-"]\n')
        f.write(f"items = {{ range = [0, {ITEMS}] }}\n")
        f.write(f'[[stage]]\nname = "s2"\ncommand = ["python3", "{EMIT}", "g-"]\n')
        f.write('items = { from = "s1" }\n')
        if after:
            f.write('after = ["s1"]\n')
    return path


def outputs(d, stage):
    out = subprocess.run([GRANULE, "outputs", stage, "--json"], cwd=d, capture_output=True,
                         text=True, check=True)
    return [json.loads(l)["value"] for l in out.stdout.splitlines()]


def check_exact(d):
    got = outputs(d, "s2")
    expected = {f"g-f-{i}" for i in range(ITEMS)}
    dupes = len(got) - len(set(got))
    missing = len(expected - set(got))
    extra = len(set(got) - expected)
    return dupes, missing, extra


def run_pipeline(after):
    d = tempfile.mkdtemp(prefix="gpipe-")
    path = spec(d, after)
    t = time.monotonic()
    subprocess.run([GRANULE, "run", "-q", path, "--slots", "2"], cwd=d, check=True,
                   env={**os.environ, "COST_MS": str(COST_MS)})
    elapsed = time.monotonic() - t
    status = json.loads(subprocess.run([GRANULE, "status", "--json"], cwd=d,
                                       capture_output=True, text=True, check=True).stdout)
    frags = [s["fragments"] for s in status["jobs"][0]["stages"]]
    exact = check_exact(d)
    shutil.rmtree(d)
    return elapsed, frags, exact


def pipelined():
    ideal = 2 * ITEMS * COST_MS / 1e3 / 2
    streamed, frags, exact = run_pipeline(False)
    staged, sfrags, _ = run_pipeline(True)
    print(f"pipelined: {ITEMS} items, 2 slots, ideal (total work / 2) {ideal:.1f} s")
    print(f"  streamed: makespan {streamed:.1f} s = {streamed / ideal:.3f} x ideal; fragments {frags}; "
          f"duplicates/missing/extra {exact}")
    print(f"  after (stage after stage): {staged:.1f} s = {staged / ideal:.3f} x ideal; fragments {sfrags}")
    return streamed / ideal


def kill9():
    d = tempfile.mkdtemp(prefix="gkill-")
    path = spec(d, False)
    env = {**os.environ, "COST_MS": str(COST_MS)}
    subprocess.run([GRANULE, "submit", path], cwd=d, check=True, capture_output=True)
    cmd = [GRANULE, "worker", "-q", "--slots", "1", "--lease", "3s"]
    spawn = lambda: subprocess.Popen(cmd, cwd=d, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
    workers = [spawn(), spawn()]
    kills, t = 0, time.monotonic()
    next_kill = t + 2.0

    def state():
        out = subprocess.run([GRANULE, "status", "--json"], cwd=d, capture_output=True, text=True)
        return json.loads(out.stdout)["jobs"][0]["state"]

    while state() == "running":
        for i, w in enumerate(workers):
            if w.poll() is not None:
                workers[i] = spawn()
        if time.monotonic() >= next_kill:
            victim = workers[kills % 2]
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
            kills += 1
            next_kill = time.monotonic() + 2.0
        time.sleep(0.05)
    elapsed = time.monotonic() - t
    for w in workers:
        w.wait()
    dupes, missing, extra = check_exact(d)
    print(f"kill9: {kills} kill -9 in {elapsed:.1f} s; stage 2 outputs: {ITEMS} expected, "
          f"{dupes} duplicates, {missing} missing, {extra} unexpected")
    shutil.rmtree(d)
    return dupes + missing + extra


def make_file(path, size):
    """1 GiB of what a host holds: its libraries and binaries, concatenated, repeated."""
    sources = []
    for root in ["/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/share/doc"]:
        for dirpath, _, names in os.walk(root):
            for n in names:
                p = os.path.join(dirpath, n)
                if os.path.isfile(p) and not os.path.islink(p):
                    sources.append(p)
    sources.sort()
    written = 0
    with open(path, "wb") as out:
        while written < size:
            for p in sources:
                try:
                    data = open(p, "rb").read(size - written)
                except OSError:
                    continue
                out.write(data)
                written += len(data)
                if written >= size:
                    break


def blob():
    d = tempfile.mkdtemp(prefix="gblob-", dir=os.environ.get("BLOB_DIR", ROOT + "/target"))
    big = os.path.join(d, "big.bin")
    make_file(big, 1 << 30)
    subprocess.run(["sync"])
    subprocess.run(["cat", big], stdout=subprocess.DEVNULL)  # both start from the page cache
    t = time.monotonic()
    subprocess.run(["zstd", "-3", "-T1", "-q", "-f", big, "-o", os.path.join(d, "big.zst")], check=True)
    zstd_s = time.monotonic() - t
    os.remove(os.path.join(d, "big.zst"))
    path = os.path.join(d, "job.toml")
    with open(path, "w") as f:
        f.write('name = "blob"\n[[stage]]\nname = "make"\n')
        # Hands the file over twice (two outputs of one item): one blob, two items downstream.
        f.write(f'command = ["sh", "-c", \'read -r x; echo "$GRANULE_CMD output {big}" >&3; '
                f'echo "$GRANULE_CMD output {big}" >&3; echo "$x" >&3\']\n')
        f.write("items = { range = [0, 1] }\n")
        f.write('[[stage]]\nname = "use"\ncommand = ["stat", "-c", "%s", "{}"]\nper_item = true\n')
        f.write('outputs = "stdout"\nitems = { from = "make" }\n')
    t = time.monotonic()
    out = subprocess.run([GRANULE, "run", path, "--slots", "1", "--zstd-level", "3"], cwd=d,
                         capture_output=True, text=True, check=True)
    job_s = time.monotonic() - t
    fetch_notes = [l for l in out.stderr.splitlines() if "fetched" in l]
    sizes = outputs(d, "use")
    # The same job with a 1-byte file: what a job costs besides the bytes.
    with open(big, "wb") as f:
        f.write(b"x")
    path2 = os.path.join(d, "job2.toml")
    with open(path) as f:
        text = f.read().replace('name = "blob"', 'name = "blob2"')
    with open(path2, "w") as f:
        f.write(text)
    t = time.monotonic()
    subprocess.run([GRANULE, "run", "-q", path2, "--slots", "1"], cwd=d, check=True)
    base_s = time.monotonic() - t
    data_s = job_s - base_s
    ratio = zstd_s / data_s
    print(f"blob: 1 GiB; zstd -3 -T1 {zstd_s:.2f} s ({1024 / zstd_s:.0f} MiB/s); granule store + fetch "
          f"{data_s:.2f} s ({1024 / data_s:.0f} MiB/s; job {job_s:.2f} s less {base_s:.2f} s for a 1-byte file) "
          f"= {ratio:.2f} x zstd's throughput; downstream saw sizes {sizes}")
    for note in fetch_notes:
        print("  " + note.strip())
    shutil.rmtree(d)
    return ratio


if __name__ == "__main__":
    build()
    which = sys.argv[1:] or ["pipelined", "kill9", "blob"]
    for w in which:
        {"pipelined": pipelined, "kill9": kill9, "blob": blob}[w]()
