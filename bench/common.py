"""Helpers the benchmark scripts share: paths, the task interpreter, job specs,
`granule status`, and what spin.py recorded."""
import json, os, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPIN = os.path.normpath(os.path.join(ROOT, "..", "shared", "bench", "spin.py"))
# GRANULE_BIN runs another build (e.g. the previous release, for a same-run baseline).
GRANULE = os.environ.get("GRANULE_BIN") or os.path.join(ROOT, "target", "release", "granule")
# The system interpreter starts in ~10 ms; a version manager's (pyenv here) costs ~60 ms of
# CPU per start through its site hooks, which is the task's overhead, not granule's.
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else os.path.realpath(sys.executable)


def build():
    if os.environ.get("GRANULE_BIN"):
        return
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "granule"], cwd=ROOT, check=True)


def write_spec(d, command, items, per_item=False, name="bench"):
    path = os.path.join(d, "job.toml")
    with open(path, "w") as f:
        f.write(f'name = "{name}"\n[[stage]]\nname = "work"\ncommand = {json.dumps(command)}\n')
        f.write(f"items = {{ range = [0, {items}] }}\nper_item = {'true' if per_item else 'false'}\n")
    return path


def status(d, env=None):
    out = subprocess.run([GRANULE, "status", "--json"], cwd=d, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def recorded(out):
    """How often spin.py (or slow.py) recorded each item under OUT_DIR."""
    seen = {}
    for name in os.listdir(out):
        with open(os.path.join(out, name)) as f:
            for line in f:
                seen[int(line)] = seen.get(int(line), 0) + 1
    return seen
