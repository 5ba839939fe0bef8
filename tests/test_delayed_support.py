"""Helpers for the delayed-mode tests (no tests here): delayed-mode subscriptions with their SMID contexts, real
`python -m workers` processes killed at teardown, and ledger checks."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import API_TOKEN, ROOT, SIGNING_KEYS, email_resource
from webapp import events, keys
from webapp.resources import add_resource
from webapp.subscriptions import Status, set_subscription
from webapp.tokens import issue_smid
from webapp.unsubscribe import open_smid


def delayed_contexts(app, r, n, timer_minutes=3, category=None, db_id=1, prefix="p", **resource_fields):
    """A delayed-mode resource (email_resource with `resource_fields`) and `n` subscriptions (one profile
    each); returns their unsubscribe Contexts."""
    resource = add_resource(r, email_resource(unsubscribe={"mode": "delayed", "timer_minutes": timer_minutes},
                                              **resource_fields))
    ring = app.extensions["signing_keys"]
    contexts = []
    for i in range(n):
        sub, _new = set_subscription(r, {"db_id": db_id, "profile_id": f"{prefix}-{i}", "resource_id": resource["id"],
                                   "channel": "email", "email": f"u{i}@example.com"})
        smid = issue_smid(ring, resource["id"], db_id, sub["profile_id"], sub["hash_id"], category)
        contexts.append(open_smid(r, ring, smid))
    return contexts


def message_context(app, r, ctx, category):
    """The Context of another message of ctx's subscription, sent for `category` (None: no category)."""
    ring = app.extensions["signing_keys"]
    return open_smid(r, ring, issue_smid(ring, ctx.resource["id"], *ctx.key, category))


def status_of(r, ctx):
    from webapp.subscriptions import decode_record
    db_id, profile_id, hash_id = ctx.key
    return Status(decode_record(r.hget(keys.profile_subscriptions(db_id, profile_id), hash_id))["status"])


def timer_events(r, ctx):
    db_id, profile_id, hash_id = ctx.key
    items, _next = events.list_events(r, db_id, profile_id, limit=1000)
    return [e for e in items if e["hash_id"] == hash_id and e["method"] == "timer"]


def fired_at(r, ctx):
    """Commit time (Redis clock, whole ms rounded down) of the subscription's timer event, from its entry id in
    the timeline stream."""
    db_id, profile_id, _hash_id = ctx.key
    (event,) = timer_events(r, ctx)
    ref = f"{db_id}|{profile_id}|{event['seq']}"
    for entry_id, fields in r.xrange(keys.events_timeline()):
        if fields["ref"] == ref:
            return int(entry_id.split("-")[0]) / 1000
    raise AssertionError(f"no timeline entry for {ref}")


def assert_fired_once(r, contexts):
    """Each subscription has exactly one timer event, no pending record, and an intact chain."""
    for ctx in contexts:
        assert len(timer_events(r, ctx)) == 1, ctx.key
        assert r.exists(keys.pending_unsubscribe(*ctx.key)) == 0
        assert events.verify_chain(r, ctx.key[0], ctx.key[1]) is None
    assert r.zcard(keys.pending_due()) == 0


def wait_until(predicate, timeout, interval=0.05):
    """Poll `predicate` until it is truthy; return its value, or raise after `timeout` seconds."""
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


class WorkerProcesses:
    """Real worker processes (`python -m workers`, or any command) in their own process groups."""

    def __init__(self, redis_url, log_dir):
        self.redis_url, self.log_dir = redis_url, log_dir
        self.procs = []

    def env(self, **extra):
        return {**os.environ, "REDIS_URL": self.redis_url, "API_TOKEN": API_TOKEN, "SIGNING_KEYS": SIGNING_KEYS,
                "VAR_DIR": str(self.log_dir), "PYTHONPATH": ROOT, "TIME_UNIT_SECONDS": "1", **extra}

    def start(self, args=None, ready=True, **extra_env):
        """Start a worker (default `python -m workers`); wait until it has registered with RQ."""
        import redis
        n = len(self.procs)
        log = open(os.path.join(self.log_dir, f"worker-{n}.log"), "wb")
        proc = subprocess.Popen(args or [sys.executable, "-m", "workers"], cwd=ROOT, env=self.env(**extra_env),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append(proc)
        if ready:
            client = redis.Redis.from_url(self.redis_url)
            try:
                wait_until(lambda: proc.poll() is not None or any(
                    int(client.hget(k, "pid") or 0) == proc.pid for k in client.smembers("rq:workers")), 20)
            finally:
                client.close()
            assert proc.poll() is None, self.log(n)
        return proc

    def kill(self, proc):
        """SIGKILL the worker and everything it forked (its RQ scheduler and work horse)."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)

    def log(self, n):
        with open(os.path.join(self.log_dir, f"worker-{n}.log"), errors="replace") as f:
            return f.read()

    def close(self):
        for proc in self.procs:
            self.kill(proc)


@pytest.fixture
def workers(redis_url, tmp_path):
    procs = WorkerProcesses(redis_url, tmp_path)
    yield procs
    procs.close()


# An LD_PRELOAD library that puts a process's wall clock (gettimeofday, clock_gettime of CLOCK_REALTIME, time)
# ahead by the number of seconds (a float, negative for behind) written in the file $CLOCK_OFFSET_FILE, read
# again at most every 20 ms: a redis-server whose host clock is skewed, or steps, while the test runs. The
# monotonic clocks are left alone, as a clock step leaves them.
CLOCK_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

typedef int (*clock_gettime_fn)(clockid_t, struct timespec *);

static int real_clock_gettime(clockid_t id, struct timespec *ts) {
    static clock_gettime_fn real;
    if (!real) real = (clock_gettime_fn)dlsym(RTLD_NEXT, "clock_gettime");
    return real(id, ts);
}

static long long offset_ns(void) {
    static long long offset, read_at = -1000000000LL;
    struct timespec now;
    real_clock_gettime(CLOCK_MONOTONIC, &now);
    long long mono = now.tv_sec * 1000000000LL + now.tv_nsec;
    if (mono - read_at >= 20000000LL) {
        const char *path = getenv("CLOCK_OFFSET_FILE");
        int fd = path ? open(path, O_RDONLY) : -1;
        if (fd >= 0) {
            char buf[64];
            ssize_t n = read(fd, buf, sizeof buf - 1);
            close(fd);
            if (n > 0) { buf[n] = 0; offset = (long long)(strtod(buf, NULL) * 1e9); }
        }
        read_at = mono;
    }
    return offset;
}

static void shift(struct timespec *ts) {
    long long ns = ts->tv_sec * 1000000000LL + ts->tv_nsec + offset_ns();
    ts->tv_sec = ns / 1000000000LL;
    ts->tv_nsec = ns % 1000000000LL;
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    int rc = real_clock_gettime(id, ts);
    if (rc == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) shift(ts);
    return rc;
}

int gettimeofday(struct timeval *restrict tv, void *restrict tz) {
    struct timespec ts;
    int rc = clock_gettime(CLOCK_REALTIME, &ts);
    if (rc == 0 && tv) { tv->tv_sec = ts.tv_sec; tv->tv_usec = ts.tv_nsec / 1000; }
    (void)tz;
    return rc;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}
"""


class SkewedClock:
    """A redis-server (with AOF) whose wall clock runs `offset` seconds off the test's, set and stepped with
    `set`: CLOCK_SHIM preloaded into it. restart() stops it (SHUTDOWN, which syncs the AOF) and starts it again
    on the same files, with the clock as set then."""

    def __init__(self, workdir, offset=0.0):
        import shutil as _shutil
        cc = _shutil.which("cc") or _shutil.which("gcc")
        if cc is None:
            pytest.fail("a C compiler is needed to skew redis-server's clock (apt-get install gcc)")
        self.workdir = str(workdir)
        source, self.library = os.path.join(self.workdir, "clock.c"), os.path.join(self.workdir, "clock.so")
        with open(source, "w") as f:
            f.write(CLOCK_SHIM)
        subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", self.library, source, "-ldl"], check=True,
                       capture_output=True)
        self.offset_file = os.path.join(self.workdir, "clock-offset")
        self.set(offset)
        self.proc = self.url = None

    def set(self, offset):
        with open(self.offset_file + ".new", "w") as f:
            f.write(repr(float(offset)))
        os.replace(self.offset_file + ".new", self.offset_file)
        time.sleep(0.05)  # the shim reads it again within 20 ms

    def start(self):
        from conftest import start_redis_server
        saved = {k: os.environ.get(k) for k in ("LD_PRELOAD", "CLOCK_OFFSET_FILE")}
        os.environ.update(LD_PRELOAD=self.library, CLOCK_OFFSET_FILE=self.offset_file)
        try:
            self.proc, self.url = start_redis_server(self.workdir, appendonly=True)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return self.url

    def stop(self):
        import redis
        if self.proc is None:
            return
        try:
            redis.Redis.from_url(self.url).shutdown(save=False)
        except redis.ConnectionError:
            pass
        self.proc.wait(timeout=20)
        self.proc = None

    def restart(self):
        self.stop()
        return self.start()
