"""Delayed-unsubscribe timers at scale: lateness of 100,000 timers and Redis memory per pending timer.

Starts a redis-server (AOF on, appendfsync everysec, as in production) and real `python -m workers` processes,
stores --timers subscriptions (one profile each, with their first ledger event), then arms one delayed
unsubscribe per subscription with deadlines spread uniformly over --spread seconds starting --lead seconds
after arming (the pending-record writes of unsubscribe.arm_timer, pipelined, plus one RQ tick job per deadline
second through delayed.schedule_timer, as arm_timer's on_armed does). It waits until every timer has fired,
then prints:
- lateness = commit time of the timer's ledger event (its entry id in the events timeline stream, Redis
  clock, ms) minus the deadline: p50, p99, max, and min (never negative: a timer never fires early);
- Redis memory per pending timer = INFO used_memory after arming minus before, divided by --timers;
- CPU seconds the worker processes and Redis spent per 1,000 timers fired;
and checks the ledger: exactly one "timer" event per subscription, hash chains intact on a sample.

    .venv/bin/python bench/timers.py [--timers 100000] [--lead 60] [--spread 60] [--workers 1]
"""
import argparse
import json
import math
import os
import random
import statistics
import sys
import time

import redis

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, Services  # noqa: E402

sys.path.insert(0, ROOT)
from webapp import delayed, events, keys  # noqa: E402
from webapp.config import parse_signing_keys  # noqa: E402
from webapp.resources import add_resource  # noqa: E402
from webapp.store import connect  # noqa: E402
from webapp.subscriptions import Status, make_hash_id, state_of  # noqa: E402
from webapp.tokens import SigningKeys, Smid, issue_smid  # noqa: E402
from webapp.unsubscribe import Context, pending_fields, queue_pending_writes, resolve_scope  # noqa: E402
from webapp.validation import now_iso  # noqa: E402

BATCH = 1000
DB_ID = 1
EVIDENCE = {"ip": "203.0.113.7", "locale": "en",
            "user_agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 "
                          "Safari/537.36"}
RESOURCE = {
    "name": "Weekly news", "dbs_ids": [DB_ID], "channels": ["email"],
    "categories": [{"title": "News", "api_name": "news"}, {"title": "Receipts", "api_name": "receipts",
                                                           "required": True}],
    "channel_settings": {"email": {"from_email": "news@shop.example", "list_id": "weekly.shop.example"}},
    "unsubscribe": {"mode": "delayed", "timer_minutes": 1},
}


def cpu_seconds(pid):
    """User+system CPU of a process, its live descendants, and the children it has reaped (work horses)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except OSError:
                continue
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15]) / tick
        except OSError:
            pass
        todo.extend(parents.get(p, []))
    return total


def redis_cpu(r):
    info = r.info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


def store_subscriptions(r, ring, resource, n):
    """n profiles with one email subscription each, stored as subscriptions.set_subscription stores them."""
    contexts = []
    for start in range(0, n, BATCH):
        with r.pipeline(transaction=False) as pipe:
            for i in range(start, min(n, start + BATCH)):
                profile_id, email = f"bench-{i}", f"user{i}@example.com"
                hash_id = make_hash_id(resource["id"], "email", email)
                record = {"resource_id": resource["id"], "channel": "email", "address": {"email": email},
                          "status": int(Status.SUBSCRIBED), "priority": 0, "uncats": [], "custom_fields": {},
                          "reg_info": {"date": now_iso(), "ip": None, "url": None, "source": "api"},
                          "is_delete": False, "updated_at": now_iso()}
                event = events.new_event(None, db_id=DB_ID, profile_id=profile_id, resource_id=resource["id"],
                                         channel="email", hash_id=hash_id, method="api", before=None,
                                         after=state_of(resource, record))
                pipe.hset(keys.profile_subscriptions(DB_ID, profile_id), hash_id,
                          json.dumps(record, separators=(",", ":")))
                pipe.sadd(keys.db_profiles(DB_ID), profile_id)
                events.queue_append(pipe, event)
                token = issue_smid(ring, resource["id"], DB_ID, profile_id, hash_id, "news")
                smid = Smid(resource["id"], DB_ID, profile_id, hash_id, "news", int(time.time()))
                contexts.append(Context(token, smid, resource, record))
            pipe.execute()
    return contexts


def arm_all(r, queue, contexts, lead, spread, rng):
    """Arm every context's timer; return {profile_id: deadline}."""
    deadlines, seconds = {}, {}
    for start in range(0, len(contexts), BATCH):
        sec, usec = r.time()  # arm_timer's clock: the Redis server's
        now = sec + usec / 1e6
        with r.pipeline(transaction=False) as pipe:
            for ctx in contexts[start:start + BATCH]:
                deadline = now + lead + rng.uniform(0, spread)
                fields = pending_fields(ctx, resolve_scope(ctx), now, deadline, EVIDENCE)
                queue_pending_writes(pipe, *ctx.key, fields)
                deadlines[ctx.key[1]] = float(fields["deadline"])
                seconds.setdefault(math.ceil(float(fields["deadline"])), ctx.key)
            pipe.execute()
    for _second, key in seconds.items():  # what arm_timer's on_armed does; one tick job per second either way
        delayed.schedule_timer(queue, *key, deadlines[key[1]])
    return deadlines, len(seconds)


def percentile(sorted_values, p):
    return sorted_values[min(len(sorted_values) - 1, int(math.ceil(p / 100 * len(sorted_values))) - 1)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timers", type=int, default=100_000)
    parser.add_argument("--lead", type=float, default=60.0, help="seconds from arming to the first deadline")
    parser.add_argument("--spread", type=float, default=60.0, help="deadlines spread over this many seconds")
    parser.add_argument("--workers", type=int, default=1, help="`python -m workers` processes")
    args = parser.parse_args()
    rng = random.Random(5)

    with Services(appendonly=True) as services:
        r = connect(services.redis_url)
        ring = SigningKeys(parse_signing_keys(services.env["SIGNING_KEYS"]))
        resource = add_resource(r, RESOURCE)
        t0 = time.time()
        contexts = store_subscriptions(r, ring, resource, args.timers)
        print(f"stored {len(contexts)} subscriptions in {time.time() - t0:.1f} s")
        cmd = os.environ.get("BENCH_WORKER_CMD", f"{sys.executable} -m workers").split()
        procs = [services._spawn(cmd, env=services.env, cwd=ROOT) for _ in range(args.workers)]
        time.sleep(3)  # workers up and idle
        queue = delayed.timer_queue(redis.Redis.from_url(services.redis_url), "unsubscribe")
        time.sleep(1)
        mem_before = r.info("memory")["used_memory"]
        t0 = time.time()
        deadlines, ticks = arm_all(r, queue, contexts, args.lead, args.spread, rng)
        armed_in = time.time() - t0
        mem_after = r.info("memory")["used_memory"]
        assert r.zcard(keys.pending_due()) == len(contexts)
        print(f"armed {len(contexts)} timers in {armed_in:.1f} s ({len(contexts) / armed_in:,.0f}/s), "
              f"{ticks} RQ tick jobs; deadlines from +{args.lead:.0f} s to +{args.lead + args.spread:.0f} s")
        cpu0 = sum(cpu_seconds(p.pid) for p in procs)
        rcpu0 = redis_cpu(r)
        last_deadline = max(deadlines.values())
        while True:
            left = r.zcard(keys.pending_due())
            if left == 0:
                break
            if time.time() > last_deadline + 60:
                sys.exit(f"{left} timers still pending a minute after the last deadline")
            time.sleep(5)
            print(f"  {time.strftime('%H:%M:%S')} pending {r.zcard(keys.pending_due()):>7}", flush=True)
        worker_cpu = sum(cpu_seconds(p.pid) for p in procs) - cpu0
        rcpu = redis_cpu(r) - rcpu0

        lateness, fired = [], {}
        start = "-"
        while True:
            entries = r.xrange(keys.events_timeline(), min=start, count=10_000)
            if not entries:
                break
            for entry_id, fields in entries:
                _db, profile_id, seq = fields["ref"].split("|")
                if seq == "1":
                    continue
                fired[profile_id] = fired.get(profile_id, 0) + 1
                lateness.append(int(entry_id.split("-")[0]) / 1000 - deadlines[profile_id])
            start = "(" + entries[-1][0]
        assert len(fired) == len(contexts) and set(fired.values()) == {1}, "a timer fired twice or never"
        for ctx in rng.sample(contexts, 200):
            assert events.verify_chain(r, DB_ID, ctx.key[1]) is None
            assert r.llen(keys.profile_events(DB_ID, ctx.key[1])) == 2

    lateness.sort()
    print(f"\n{len(contexts)} timers, {args.workers} worker process(es), {os.cpu_count()} cores; each fired once")
    print(f"lateness (event committed - deadline): p50 {statistics.median(lateness) * 1000:.0f} ms, "
          f"p99 {percentile(lateness, 99) * 1000:.0f} ms, max {lateness[-1] * 1000:.0f} ms, "
          f"min {lateness[0] * 1000:.0f} ms")
    print(f"Redis memory per pending timer: {(mem_after - mem_before) / len(contexts):.0f} bytes "
          f"({(mem_after - mem_before) / 2 ** 20:.1f} MiB for {len(contexts)})")
    print(f"CPU per 1,000 timers fired: workers {worker_cpu / len(contexts) * 1000:.3f} s, "
          f"Redis {rcpu / len(contexts) * 1000:.3f} s")


if __name__ == "__main__":
    main()
