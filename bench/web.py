"""Benchmarks of `granule serve`'s HTTP side (issue 14's bars).

  python3 bench/web.py dashboard   # a 100,000-item job on 4 workers: the dashboard's
                                   # render time in headless Chromium, and live updates
  python3 bench/web.py metrics     # /metrics with 1,000 stages' history: scrape cost,
                                   # promtool check
  python3 bench/web.py             # both

Tasks run as users run them: `python3` from PATH (spin.py). Every figure is measured
beside a baseline from the same run: a static file from the same server (the floor of
an HTTP round trip here), and for the dashboard a page of a few lines loaded the same
way between its loads (the floor of a page render in this browser, on this machine now).
"""
import http.client, json, os, re, shutil, socket, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import GRANULE, SPIN, build  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(d):
    port = free_port()
    proc = subprocess.Popen([GRANULE, "serve", "--listen", f"127.0.0.1:{port}"], cwd=d,
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "serve.log"), "w"),
                            start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    raise SystemExit("serve did not listen")


def timed_gets(port, path, n):
    """Milliseconds per GET of `path` over one kept-alive connection, n times."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read()
        out.append((time.perf_counter() - t0) * 1e3)
        assert r.status == 200, (path, r.status, body[:200])
    conn.close()
    return out, body


def summary(ms):
    ms = sorted(ms)
    return f"median {statistics.median(ms):.2f} ms, p99 {ms[int(len(ms) * 0.99) - 1]:.2f} ms"


# The floor of a page render in this browser, loaded as the dashboard is: a page of a
# few lines that times its first paint the way the dashboard does.
FLOOR_HTML = """<!doctype html><html><head><meta charset="utf-8"><title>floor</title>
<style>body { font: 14px/1.4 system-ui, sans-serif; }</style></head><body><h1>granule</h1>
<p>one paragraph of text</p><footer id="f"></footer><script>
const start = performance.now();
requestAnimationFrame(() => setTimeout(() => {
  const now = performance.now();
  document.getElementById('f').textContent = `rendered in ${Math.round(now)} ms (${Math.round(now - start)} ms after the script started)`;
  document.body.dataset.rendered = '1';
}, 0));
setTimeout(() => {}, 3000); // a pending task: headless virtual time runs on until the paint
</script></body></html>"""


def serve_floor(d):
    """FLOOR_HTML over HTTP from this process, as the dashboard comes over HTTP; the URL."""
    import functools, http.server, threading
    with open(os.path.join(d, "floor.html"), "w") as f:
        f.write(FLOOR_HTML)
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=d))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/floor.html"


def chromium_render(port, shot=None, url=None):
    """The page's own render time (ms from navigation to the paint of its first full render)."""
    args = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
            f"--user-data-dir={tempfile.mkdtemp()}"]
    url = url or f"http://127.0.0.1:{port}/?poll=1"
    t0 = time.perf_counter()
    dom = subprocess.run(args + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    wall = (time.perf_counter() - t0) * 1e3
    m = re.search(r"rendered in (\d+) ms \((\d+) ms after", dom)
    frags = dom.count('class="frag')
    if shot:
        subprocess.run(args + ["--window-size=1400,1500", f"--screenshot={shot}", url],
                       capture_output=True, timeout=120)
    return (int(m.group(1)) if m else None), wall, frags, 'data-rendered="1"' in dom, (int(m.group(2)) if m else None)


def events(port, seconds):
    """The `status` events seen in `seconds`, as (time, done of the first stage)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    f = sock.makefile("rb")
    seen, end = [], time.time() + seconds
    while time.time() < end:
        line = f.readline()
        if line.startswith(b"data: "):
            v = json.loads(line[6:])
            jobs = v.get("jobs") or []
            if jobs:
                seen.append((time.time(), jobs[0]["stages"][0]["done"]))
    sock.close()
    return seen


def dashboard():
    d = tempfile.mkdtemp(prefix="granule-web-")
    try:
        with open(os.path.join(d, "job.toml"), "w") as f:
            f.write('name = "thumbs"\n[[stage]]\nname = "resize"\n'
                    f'command = ["python3", "{SPIN}"]\nitems = {{ range = [0, 100000] }}\n')
        env = dict(os.environ, MED_US="2000", SIGMA="0.5")
        subprocess.run([GRANULE, "submit", "job.toml"], cwd=d, check=True, capture_output=True)
        workers = [subprocess.Popen([GRANULE, "worker", "--slots", "1"], cwd=d, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True) for _ in range(4)]
        serve, port = start_serve(d)
        try:
            time.sleep(20)  # some history: fragments of every worker in the timeline
            static, _ = timed_gets(port, "/style.css", 50)
            api, body = timed_gets(port, "/api/status", 50)
            frags, fbody = timed_gets(port, "/api/fragments?job=thumbs&since_ms=0&limit=5000", 10)
            seen = events(port, 10)  # while the job runs
            floor_url = serve_floor(d)
            renders, floors = [], []
            for i in range(int(os.environ.get("LOADS", "3"))):  # interleaved: the same load for both
                renders.append(chromium_render(port, os.path.join(d, "shot.png") if i == 0 else None))
                floors.append(chromium_render(port, url=floor_url))
            _, after = timed_gets(port, "/api/status", 1)
            after = json.loads(after)["jobs"][0]["stages"][0]["done"]
            shot = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "dashboard-100k.png")
            shutil.copy(os.path.join(d, "shot.png"), shot)
            st = json.loads(body)["jobs"][0]["stages"][0]
            print(f"dashboard: job of {st['items']} items, {st['done']} done, "
                  f"{len(json.loads(fbody)['fragments'])} fragments in the timeline's query")
            print(f"  GET /style.css (baseline)  {summary(static)}")
            print(f"  GET /api/status            {summary(api)} ({len(body)} bytes)")
            print(f"  GET /api/fragments         {summary(frags)}")
            for ms, wall, n, ok, own in renders:
                print(f"  chromium: rendered {'yes' if ok else 'NO'} in {ms} ms (page's own clock; "
                      f"{own} ms of it after the dashboard's script started, the rest the browser "
                      f"loading), {n} fragment rects, whole headless run {wall:.0f} ms")
            floor = [ms for ms, *_ in floors if ms is not None]
            print(f"  chromium floor (a page of a few lines over HTTP): render ms {sorted(floor)}, "
                  f"median {statistics.median(floor):.0f} ms")
            mine = [r[0] for r in renders if r[0] is not None]
            print(f"  dashboard / floor, medians: {statistics.median(mine) / statistics.median(floor):.2f}")
            print(f"  the job ran through every load: {'yes' if after < st['items'] else 'NO'} "
                  f"({after} items done after the last)")
            gaps = [b[0] - a[0] for a, b in zip(seen, seen[1:])]
            rising = sum(1 for a, b in zip(seen, seen[1:]) if b[1] > a[1])
            print(f"  live: {len(seen)} status events in 10 s (gap median {statistics.median(gaps):.2f} s), "
                  f"done rose in {rising} of {len(gaps)}: {seen[0][1]} -> {seen[-1][1]}")
            print(f"  screenshot: {os.path.normpath(shot)}")
            worst = max(r[0] or 10**9 for r in renders)
            print(f"  bar: render <= 1000 ms: {'met' if worst <= 1000 else 'NOT met'} (worst {worst} ms)")
        finally:
            for p in workers + [serve]:
                try:
                    os.killpg(p.pid, 9)
                except ProcessLookupError:
                    pass
    finally:
        shutil.rmtree(d, ignore_errors=True)


def metrics():
    d = tempfile.mkdtemp(prefix="granule-metrics-")
    try:
        # 1,000 stages' history: 10 jobs of 100 stages, 200 items each in fragments of
        # at most 20 (10,000 fragments), acked one by one.
        for j in range(10):
            spec = os.path.join(d, f"job{j}.toml")
            with open(spec, "w") as f:
                f.write(f'name = "job{j}"\n')
                for s in range(100):
                    f.write(f'[[stage]]\nname = "stage{s}"\ncommand = ["sh", "-c", "while read -r x; do echo $x >&3; done"]\n'
                            'items = { range = [0, 200] }\nsizer = { max_items = 20 }\n')
            t0 = time.time()
            subprocess.run([GRANULE, "run", "-q", "--slots", "2", spec], cwd=d, check=True)
            print(f"  history: job{j} (100 stages) in {time.time() - t0:.1f}s", flush=True)
        serve, port = start_serve(d)
        try:
            time.sleep(3)  # the first snapshots and the fragments counted
            static, _ = timed_gets(port, "/style.css", 300)
            scrape, text = timed_gets(port, "/metrics", 300)
            api, _ = timed_gets(port, "/api/jobs", 50)
            # What the snapshot thread does once a second, and a scrape does not.
            reads = []
            for _ in range(5):
                t0 = time.perf_counter()
                subprocess.run([GRANULE, "status", "--json"], cwd=d, check=True, capture_output=True)
                reads.append((time.perf_counter() - t0) * 1e3)
            text = text.decode()
            series = sum(1 for l in text.splitlines() if l and not l.startswith("#"))
            path = os.path.join(d, "metrics.txt")
            with open(path, "w") as f:
                f.write(text)
            check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
            print(f"metrics: 1,000 stages, {series} series, {len(text)} bytes")
            print(f"  GET /style.css (baseline)  {summary(static)}")
            print(f"  GET /metrics               {summary(scrape)}  ratio to baseline {statistics.median(scrape) / statistics.median(static):.2f}")
            print(f"  GET /api/jobs              {summary(api)}")
            print(f"  granule status --json (a snapshot's read of the store) median {statistics.median(reads):.0f} ms")
            verdict = "passes" if check.returncode == 0 and not (check.stdout + check.stderr).strip() else f"FAILS: {check.stdout}{check.stderr}"
            print(f"  promtool check metrics: {verdict}")
            print(f"  bar: scrape <= 5 ms: {'met' if statistics.median(scrape) <= 5 else 'NOT met'}")
        finally:
            os.killpg(serve.pid, 9)
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    build()
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    if which in ("dashboard", "all"):
        dashboard()
    if which in ("metrics", "all"):
        metrics()
