"""Helpers for the benchmarks: a throwaway redis-server and gunicorn on loopback, and CPU accounting."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import redis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_TOKEN = "bench-api-token"
sys.path.insert(0, ROOT)
from webapp.config import default_web_workers  # noqa: E402


def add_load_arguments(parser):
    """The arguments every wrk benchmark takes, with the same meaning for the service and its baseline."""
    parser.add_argument("--seconds", type=float, default=10,
                        help="seconds per app for the max-rate phase (split into rounds) and for the half-load phase")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds the two apps alternate in (a slow spell of a shared machine then hits both)")
    parser.add_argument("--subscriptions", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=default_web_workers(),
                        help="gunicorn workers, the same for both apps (default: what `python -m webapp run` starts, "
                             f"two per core: {default_web_workers()} here)")
    parser.add_argument("--worker-class", default="sync", help="gunicorn worker class, the same for both apps")
    parser.add_argument("--threads", type=int, default=1, help="threads per worker (gthread), the same for both")
    parser.add_argument("--connections", type=int, default=8, help="wrk connections for the max-rate runs")
    return parser


def start_service_and_baseline(services, args, mode):
    """The service and the bare baseline under the same gunicorn settings, and args.subscriptions links to a
    resource in unsubscribe `mode` (make_subscriptions): (base, proc, bare_base, bare_proc, paths, setup
    seconds)."""
    gconf = {"workers": args.workers, "worker_class": args.worker_class, "threads": args.threads}
    base, proc = services.gunicorn("webapp:create_app()", **gconf)
    bare_base, bare_proc = services.gunicorn("bench.baseline_app:app", **gconf)
    t0 = time.perf_counter()
    paths = make_subscriptions(base, args.subscriptions, mode)
    return base, proc, bare_base, bare_proc, paths, time.perf_counter() - t0


def run_title(what, args, paths):
    """The first line of bench/oneclick.py's and bench/page.py's table: what ran, and how."""
    return (f"{what}: {workers_label(args)} workers each, no access log; wrk -c{args.connections}, "
            f"{args.rounds} rounds of {args.seconds / args.rounds:.1f}s per app; {len(paths):,} distinct SMIDs")


def workers_label(args):
    return f"gunicorn {args.workers} " + args.worker_class + (f" x{args.threads} threads" if args.threads > 1 else "")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Services:
    """redis-server (unix socket, no persistence unless asked) and gunicorn apps, stopped on exit."""

    def __init__(self, appendonly=False, redis_args=()):
        self.dir = tempfile.mkdtemp(prefix="us-bench-")
        self.procs = []
        sock = os.path.join(self.dir, "redis.sock")
        self.redis_proc = self._spawn(["redis-server", "--port", "0", "--unixsocket", sock, "--dir", self.dir,
                                       "--save", "", "--appendonly", "yes" if appendonly else "no", *redis_args])
        self.redis_url = f"unix://{sock}"
        for _ in range(200):
            try:
                redis.Redis.from_url(self.redis_url).ping()
                break
            except (redis.ConnectionError, FileNotFoundError):
                time.sleep(0.02)
        self.env = {**os.environ, "REDIS_URL": self.redis_url, "API_TOKEN": BENCH_TOKEN,
                    "SIGNING_KEYS": "b1:bench-secret", "PUBLIC_BASE_URL": "https://unsub.example",
                    "VAR_DIR": self.dir, "PYTHONPATH": ROOT}

    def _spawn(self, args, **kw):
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
        self.procs.append(proc)
        return proc

    def gunicorn(self, app_spec, workers=1, worker_class="sync", threads=1, cwd=ROOT):
        """Start gunicorn for `app_spec` (imported from `cwd`: this repository, or another checkout of it);
        return (base_url, process)."""
        port = free_port()
        proc = self._spawn([sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", "-w", str(workers),
                            "-k", worker_class, "--threads", str(threads), "--log-level", "error", app_spec],
                           env=self.env, cwd=cwd)
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                urllib.request.urlopen(base + "/__nothing__", timeout=1)
            except urllib.error.HTTPError:
                return base, proc
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"gunicorn {app_spec} did not start")

    def close(self):
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def tree_cpu_seconds(pid):
    """User+system CPU seconds of a process and all its descendants (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry))
            except OSError:
                continue
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
        todo.extend(children.get(p, []))
    return total


def machine_busy_seconds():
    """CPU seconds all cores spent running this machine's work since boot (/proc/stat: user, nice, system, irq
    and softirq; not idle, iowait, the hypervisor's steal, or guest time, which user already counts)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def post_json(conn, path, body):
    """POST JSON on a kept-alive http.client connection; return the decoded reply."""
    raw = json.dumps(body)
    conn.request("POST", path, body=raw, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"{path}: HTTP {resp.status} {data[:200]!r}")
    return json.loads(data)


# -- HTTP load helpers shared by bench/oneclick.py and bench/page.py -------------------------------------

def split_base(base):
    host, port = base.removeprefix("http://").split(":")
    return host, int(port)


def make_subscriptions(base, count, mode, category="news", threads=8):
    """Create a resource in unsubscribe `mode` and `count` subscriptions (one profile each) through the API,
    then issue one message link per subscription through messages/links_bulk. Returns the URL paths
    (/unsubscribe/<smid>) in creation order."""
    import http.client
    from concurrent.futures import ThreadPoolExecutor

    host, port = split_base(base)
    auth = {"token": BENCH_TOKEN}
    conn = http.client.HTTPConnection(host, port, timeout=60)
    res = post_json(conn, "/api/v1.1/resources/add", {
        **auth, "name": f"Bench {mode}", "channels": ["email"], "dbs_ids": [1],
        "categories": [{"title": "News", "api_name": "news"}, {"title": "Offers", "api_name": "offers"},
                       {"title": "Receipts", "api_name": "receipts", "required": True}],
        "channel_settings": {"email": {"from_email": "news@shop.example", "list_id": "bench.shop.example"}},
        "unsubscribe": {"mode": mode}})
    rid = res["data"]["id"]

    def add(chunk):
        c = http.client.HTTPConnection(host, port, timeout=60)
        for i in chunk:
            # gunicorn sync workers close the connection after each reply; http.client reconnects.
            post_json(c, "/api/v1.1/subscriptions/set", {
                **auth, "db_id": 1, "profile_id": f"{mode[:2]}{i}", "resource_id": rid, "channel": "email",
                "email": f"user{i}@example.com", "status": "subscribed"})
        return len(chunk)

    with ThreadPoolExecutor(threads) as pool:
        assert sum(pool.map(add, [range(t, count, threads) for t in range(threads)])) == count
    # A new connection: a gthread worker closes an idle keep-alive one (2 s) while the subscriptions are made.
    conn = http.client.HTTPConnection(host, port, timeout=60)
    paths = []
    for start in range(0, count, 1000):
        msgs = [{"resource_id": rid, "db_id": 1, "profile_id": f"{mode[:2]}{i}", "channel": "email",
                 "email": f"user{i}@example.com", "category": category}
                for i in range(start, min(count, start + 1000))]
        for link in post_json(conn, "/api/v1.1/messages/links_bulk", {**auth, "messages": msgs})["data"]:
            paths.append("/unsubscribe/" + link["unsubscribe_url"].rsplit("/unsubscribe/", 1)[1])
    return paths


WRK_THREAD_STRIDE = 7919  # wrk thread i of a write_wrk_script script starts at path (i * this) % len(paths)


def wrk_requested(paths, requests):
    """The paths a one-thread wrk run of a write_wrk_script script requested, in order, for its first
    `requests` requests (it starts at its offset and cycles)."""
    start = WRK_THREAD_STRIDE % len(paths)
    return [paths[(start + k) % len(paths)] for k in range(min(requests, len(paths)))]


def write_wrk_script(directory, name, method, paths, body=None, headers=None, rate=None):
    """A wrk Lua script that cycles through `paths` (each wrk thread starts at its own offset).

    With `rate` (requests per second per wrk thread) it paces instead of going flat out: wrk calls delay()
    before each request on a connection, and delay() hands out evenly spaced send times from one schedule
    per thread (LuaJIT's ffi reads CLOCK_MONOTONIC). With many more connections than requests in flight the
    schedule never waits for a reply, so this is an open-loop load at `rate`; a slot that finds no idle
    connection is sent as soon as one frees up and counted in `late`."""
    path = os.path.join(directory, name)
    lua_paths = ",\n".join(json.dumps(p) for p in paths)  # JSON strings of ASCII are valid Lua strings
    hdrs = "".join(f'wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n' for k, v in (headers or {}).items())
    pacing = "" if rate is None else f"""
local ffi = require("ffi")
ffi.cdef[[
typedef struct {{ long tv_sec; long tv_nsec; }} bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end
local interval = 1000 / {float(rate)!r}
local next_due = nil
late = 0
function delay()
  local t = now_ms()
  if next_due == nil then next_due = t end
  local wait = next_due - t
  next_due = next_due + interval
  if wait < -1 then late = late + 1 end
  if wait < 0 then return 0 end
  return math.floor(wait + 0.5)
end
"""
    with open(path, "w") as f:
        f.write(f"""paths = {{
{lua_paths}
}}
wrk.method = {json.dumps(method)}
{f"wrk.body = {json.dumps(body)}" if body is not None else ""}
{hdrs}{pacing}
local counter = 1
local nthreads = 0
local threads = {{}}
function setup(thread)
  nthreads = nthreads + 1
  thread:set("offset", nthreads * {WRK_THREAD_STRIDE})
  table.insert(threads, thread)
end
function init(args)
  counter = (offset or 0) % #paths + 1
end
function request()
  local p = paths[counter]
  counter = counter % #paths + 1
  return wrk.format(nil, p)
end
function done(summary, latency, requests)
  local late_total = 0
  for _, t in ipairs(threads) do late_total = late_total + (t:get("late") or 0) end
  io.write(string.format("BENCH errors=%d non2xx=%d late=%d\\n",
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, late_total))
end
""")
    return path


def _wrk_ms(text):
    value, unit = float(text[:-2] if text.endswith(("us", "ms")) else text[:-1]), text.lstrip("0123456789.")
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(url, script, seconds, connections, threads=1):
    """Run wrk with `script` (see write_wrk_script) and return its figures:
    {"rps", "p50", "p99" (ms, from sending a request to the end of its reply), "requests", "errors" (socket
    errors and timeouts), "non2xx", "late" (paced scripts: sends more than 1 ms behind schedule)}."""
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
                          "--timeout", "10s", "--latency", "-s", script, url],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    fig = {}
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            fig["rps"] = float(parts[1])
        elif len(parts) == 2 and parts[0] in ("50%", "99%"):
            fig["p" + parts[0][:-1]] = _wrk_ms(parts[1])
        elif "requests in" in line:
            fig["requests"] = int(parts[0])
        elif line.startswith("BENCH"):
            fig.update({k: int(v) for k, v in (p.split("=") for p in parts[1:])})
    if "rps" not in fig:
        raise RuntimeError(f"wrk gave no figures:\n{out}")
    return fig


def of_round(script, index):
    """A run's wrk script for round `index`: one script for every round, or a list of one per round."""
    return script[index] if isinstance(script, list) else script


def compare_max(runs, seconds, rounds, connections, redis_pid=None):
    """Max-rate wrk runs of several apps, interleaved: `rounds` rounds of seconds/rounds each per app, in turn,
    so that a slow spell of a shared machine hits every app rather than one. `runs` is
    {name: (base_url, wrk_script, pid_for_cpu)}; the script may be a list, one per round (fresh links).
    Returns {name: figures}: the median round's wrk figures plus "rps_rounds" and "requests_rounds" (every
    round's rate and completed requests), and per request over all rounds: "cpu_ms" (server CPU ms),
    "redis_ms" (redis-server's CPU ms, with `redis_pid`) and "machine_ms" (all cores' busy ms: gunicorn,
    redis-server, wrk and the kernel; at max rate this is what bounds the rate)."""
    per_round = max(1.0, seconds / rounds)
    results = {name: [] for name in runs}
    cpu = {name: [0.0, 0.0, 0.0] for name in runs}  # server, redis-server, machine
    for _ in range(rounds):
        for name, (base, script, pid) in runs.items():
            before = (tree_cpu_seconds(pid), tree_cpu_seconds(redis_pid) if redis_pid else 0.0,
                      machine_busy_seconds())
            results[name].append(run_wrk(base, of_round(script, len(results[name])), per_round, connections))
            after = (tree_cpu_seconds(pid), tree_cpu_seconds(redis_pid) if redis_pid else 0.0,
                     machine_busy_seconds())
            cpu[name] = [total + b - a for total, a, b in zip(cpu[name], before, after)]
    out = {}
    for name, figs in results.items():
        ordered = sorted(figs, key=lambda f: f["rps"])
        fig = dict(ordered[len(ordered) // 2])
        fig["rps_rounds"] = [f["rps"] for f in figs]
        fig["requests_rounds"] = [f["requests"] for f in figs]
        requests = max(1, sum(f["requests"] for f in figs))
        fig["cpu_ms"], fig["redis_ms"], fig["machine_ms"] = (x * 1000 / requests for x in cpu[name])
        fig["errors"] = sum(f.get("errors", 0) for f in figs)
        fig["non2xx"] = sum(f.get("non2xx", 0) for f in figs)
        out[name] = fig
    return out


def compare_paced(runs, seconds, rounds, connections):
    """Paced (half-load) wrk runs of several apps, interleaved like compare_max: `runs` is
    {name: (base_url, paced_wrk_script or a list of one per round)}. Returns {name: figures of the round with
    the median p99, plus "p99_rounds", "requests_rounds" and the achieved rate, late sends and errors summed
    over the rounds}."""
    per_round = max(1.0, seconds / rounds)
    results = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (base, script) in runs.items():
            results[name].append(run_wrk(base, of_round(script, len(results[name])), per_round, connections))
    out = {}
    for name, figs in results.items():
        ordered = sorted(figs, key=lambda f: f["p99"])
        fig = dict(ordered[len(ordered) // 2])
        fig["p99_rounds"] = [f["p99"] for f in figs]
        fig["rps"] = sum(f["rps"] for f in figs) / len(figs)
        fig["requests_rounds"] = [f["requests"] for f in figs]
        for k in ("late", "errors", "non2xx"):
            fig[k] = sum(f.get(k, 0) for f in figs)
        out[name] = fig
    return out


PACED_CONNECTIONS = 32  # far more than the requests in flight at half load: a send never waits for a reply


def compare_half_load(services, args, method, svc, bare, body=None, headers=None):
    """compare_paced of the service and its baseline, each at half of its own median max rate. `svc` and
    `bare` are (name, base_url, paths, compare_max figures); paths may be a list of path lists, one per
    round. Returns (svc_half, bare_half)."""
    runs = {}
    for name, base, paths, max_figures in (svc, bare):
        rounds = paths if isinstance(paths[0], list) else [paths]
        scripts = [write_wrk_script(services.dir, f"{name}_half{i}.lua", method, round_paths, body, headers,
                                    rate=max_figures["rps"] / 2) for i, round_paths in enumerate(rounds)]
        runs[name] = (base, scripts if len(scripts) > 1 else scripts[0])
    half = compare_paced(runs, args.seconds, args.rounds, PACED_CONNECTIONS)
    return half[svc[0]], half[bare[0]]


def setup_note(paths, setup_seconds, started):
    """The last note line of bench/oneclick.py's and bench/page.py's table."""
    return (f"setup: {len(paths):,} subscriptions + links through the API in {setup_seconds:.0f}s; "
            f"whole run {time.perf_counter() - started:.0f}s")


def round_ratios(a, b):
    """Per-round ratios of two compare_max results (rounds ran back to back, so each pair saw the same machine)."""
    return sorted(x / y for x, y in zip(a["rps_rounds"], b["rps_rounds"]))


def median_ratio(a, b):
    """The median of round_ratios(a, b): the ratio the benchmarks report."""
    ratios = round_ratios(a, b)
    return ratios[len(ratios) // 2]


def print_comparison(title, phases, svc_half, bare_half, goal_ratio, notes=()):
    """The table bench/oneclick.py and bench/page.py print: max rate, latency at half load, ratio, goals.
    `phases` is [(label or None, service figures, baseline figures)] of compare_max, one max-rate section each;
    the half-load figures are those of the first phase's requests."""
    def pair(a, b, fmt):
        return f"{format(a, fmt):>12}{format(b, fmt):>12}"

    def errors(a, b):
        return f"{a.get('errors', 0):>8}/{a.get('non2xx', 0):<3}{b.get('errors', 0):>8}/{b.get('non2xx', 0):<3}"

    print(f"\n{title}")
    print(f"{'':30}{'service':>12}{'baseline':>12}")
    for label, svc, bare in phases:
        if label:
            print(f"{label}:")
        print(f"{'max rate, median round (req/s)':30}{pair(svc['rps'], bare['rps'], ',.0f')}")
        for i, (a, b) in enumerate(zip(svc["rps_rounds"], bare["rps_rounds"])):
            print(f"{f'  round {i + 1} (req/s)':30}{pair(a, b, ',.0f')}   ratio {a / b:.2f}")
        print(f"{'  p50 at max (ms)':30}{pair(svc['p50'], bare['p50'], '.2f')}")
        print(f"{'  p99 at max (ms)':30}{pair(svc['p99'], bare['p99'], '.2f')}")
        print(f"{'  server CPU per request (ms)':30}{pair(svc['cpu_ms'], bare['cpu_ms'], '.2f')}")
        print(f"{'  redis-server CPU (ms)':30}{pair(svc['redis_ms'], bare['redis_ms'], '.3f')}")
        print(f"{'  machine CPU, all cores (ms)':30}{pair(svc['machine_ms'], bare['machine_ms'], '.2f')}")
        print(f"{'  socket errors / non-2xx':30}{errors(svc, bare)}")
    first_svc, first_bare = phases[0][1], phases[0][2]
    if len(phases) > 1:
        print(f"{phases[0][0]}, again:")
    print(f"{'half load: offered (req/s)':30}{pair(first_svc['rps'] / 2, first_bare['rps'] / 2, ',.0f')}")
    print(f"{'  achieved (req/s)':30}{pair(svc_half['rps'], bare_half['rps'], ',.0f')}")
    print(f"{'  p50, median-p99 round (ms)':30}{pair(svc_half['p50'], bare_half['p50'], '.2f')}")
    print(f"{'  p99, median round (ms)':30}{pair(svc_half['p99'], bare_half['p99'], '.2f')}")
    # a space before each column: three rounds of two-digit p99s are wider than the column
    print(f"{'  p99, every round (ms)':30}{'/'.join(f'{x:.1f}' for x in svc_half['p99_rounds']):>12} "
          f"{'/'.join(f'{x:.1f}' for x in bare_half['p99_rounds']):>11}")
    print(f"{'  sends >1 ms behind schedule':30}{pair(svc_half.get('late', 0), bare_half.get('late', 0), 'd')}")
    print(f"{'  socket errors / non-2xx':30}{errors(svc_half, bare_half)}")
    for note in notes:
        print(note)
    print()
    verdicts = []
    for label, svc, bare in phases:
        ratio = median_ratio(svc, bare)
        print(f"ratio service/baseline{f', {label}' if label else ''} (median of the per-round ratios): {ratio:.2f}")
        verdicts.append(f"{f'{label} ' if label else ''}{'MET' if ratio >= goal_ratio else 'NOT MET'}")
    print(f"goal ratio >= {goal_ratio:.2f}: {', '.join(verdicts)};   "
          f"goal p99 at half load < 10 ms: {svc_half['p99']:.2f} ms, {'MET' if svc_half['p99'] < 10 else 'NOT MET'}")
