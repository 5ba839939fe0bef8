"""Delayed work on RQ: scheduling the trigger of a delayed-unsubscribe timer, and the sweeper.

The pending record in Redis (see unsubscribe.py) is the truth; an RQ job is only a trigger. Facts this
design follows (shared/reference/standards.md §2):
- RQ's scheduler polls once a second and scores jobs in whole seconds, so a job is scheduled for the
  second *after* the deadline (never before it) and re-checks the deadline when it runs;
- job.cancel() races with the scheduler, so a cancel never touches RQ: it deletes the pending record and
  the job, whenever it runs, finds nothing to do;
- a job `ttl` shorter than its delay silently loses it, so jobs keep ttl=None;
- a standby scheduler may take many minutes to take over and jobs vanish with a Redis that lost writes,
  so every worker also runs `sweep_once` every SWEEP_INTERVAL seconds, firing overdue records directly.
The JSON serializer is used because RQ's default, pickle, must never load data an attacker can shape.
"""
import hashlib
import logging
import math
import threading
import time
from datetime import datetime, timezone

from rq import Queue
from rq.serializers import JSONSerializer

from .unsubscribe import due_timers, fire_timer

log = logging.getLogger("workers.sweeper")
FIRE_JOB = "workers.jobs.fire_delayed_unsubscribe"
SWEEP_INTERVAL = 0.5  # seconds between sweeps in each worker
SWEEP_GRACE = 1.0  # seconds a due timer is left to its RQ job before the sweeper fires it
FAILED_JOB_TTL = 86400  # seconds a failed trigger stays inspectable


def timer_queue(rq_redis, name):
    """The queue for timer jobs; `rq_redis` must be a client without decode_responses (RQ stores bytes)."""
    return Queue(name, connection=rq_redis, serializer=JSONSerializer)


def timer_job_id(db_id, profile_id, hash_id, deadline):
    """RQ job ids allow only [A-Za-z0-9_-]; profile ids may hold other characters, so hash the key."""
    digest = hashlib.sha256(f"{db_id}|{profile_id}|{hash_id}|{int(deadline * 1000)}".encode()).hexdigest()
    return f"timer-{digest[:32]}"


def schedule_timer(queue, db_id, profile_id, hash_id, deadline):
    """Enqueue the trigger for one armed timer at the first whole second not before its deadline."""
    run_at = datetime.fromtimestamp(math.ceil(deadline), tz=timezone.utc)
    queue.enqueue_at(run_at, FIRE_JOB, db_id, profile_id, hash_id,
                     job_id=timer_job_id(db_id, profile_id, hash_id, deadline),
                     result_ttl=0, failure_ttl=FAILED_JOB_TTL, ttl=None)


def sweep_once(r, now=None, grace=SWEEP_GRACE, limit=1000):
    """Fire every timer overdue by more than `grace` seconds; return how many fired."""
    now = time.time() if now is None else now
    return sum(1 for key in due_timers(r, now - grace, limit) if fire_timer(r, *key))


class Sweeper(threading.Thread):
    """Background thread of a worker process running sweep_once until stopped."""

    def __init__(self, connect, interval=SWEEP_INTERVAL, grace=SWEEP_GRACE):
        super().__init__(name="timer-sweeper", daemon=True)
        self.connect, self.interval, self.grace = connect, interval, grace
        self.stopped = threading.Event()

    def run(self):
        r = self.connect()
        while not self.stopped.wait(self.interval):
            try:
                sweep_once(r, grace=self.grace)
            except Exception:  # noqa: BLE001 - a Redis outage must not kill the sweeper; it retries next tick
                log.exception("sweep failed; retrying")
