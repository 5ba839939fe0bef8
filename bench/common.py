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
BENCH_TOKEN = "bench-token"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Services:
    """redis-server (unix socket, no persistence unless asked) and gunicorn apps, stopped on exit."""

    def __init__(self, appendonly=False):
        self.dir = tempfile.mkdtemp(prefix="us-bench-")
        self.procs = []
        sock = os.path.join(self.dir, "redis.sock")
        self.redis_proc = self._spawn(["redis-server", "--port", "0", "--unixsocket", sock, "--dir", self.dir,
                                       "--save", "", "--appendonly", "yes" if appendonly else "no"])
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

    def gunicorn(self, app_spec, workers=1, worker_class="sync"):
        """Start gunicorn for `app_spec`; return (base_url, process)."""
        port = free_port()
        proc = self._spawn([sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", "-w", str(workers),
                            "-k", worker_class, "--log-level", "error", app_spec], env=self.env, cwd=ROOT)
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


def post_json(conn, path, body):
    """POST JSON on a kept-alive http.client connection; return the decoded reply."""
    raw = json.dumps(body)
    conn.request("POST", path, body=raw, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"{path}: HTTP {resp.status} {data[:200]!r}")
    return json.loads(data)
