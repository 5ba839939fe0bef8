"""Delayed work on RQ: the triggers of delayed-unsubscribe timers, and the sweeper.

The pending record in Redis (see unsubscribe.py, "delayed mode") is the truth and `pending_due` indexes it by
deadline; RQ jobs and sweepers are only triggers, and every trigger goes through `unsubscribe.fire_timers`,
which settles a timer atomically (Lua compare-and-set) only if it is still pending and due. Facts this design
follows (shared/reference/standards.md §2):
- RQ's scheduler polls once a second, scores jobs in whole seconds and moves at most 1000 due jobs per queue
  per poll, so one job per timer could not keep up with bursts of deadlines and would cost a job hash per
  pending timer. A timer's trigger is instead a *tick*: one job per deadline second (unique job id, RQ >= 3.0
  honours `unique` for enqueue_at), scheduled for the second *after* the deadline, that fires every timer due
  by then. Arming many timers ending in the same second schedules one job;
- job.cancel() races with the scheduler, so a cancel never touches RQ: it deletes the pending record and
  the tick, whenever it runs, finds nothing to do;
- a job `ttl` shorter than its delay silently loses it, so jobs keep ttl=None;
- a standby scheduler takes over only after the dead one's lock expires (61 s) and RQ jobs vanish with a
  Redis that lost writes, so every worker process also runs a `Sweeper` thread that fires due timers from
  `pending_due` every SWEEP_INTERVAL seconds. The sweepers are what makes deadlines accurate (a tick runs
  0-2 s after its deadline, and in such a worker only backs the sweeper up, see tick_grace); ticks keep
  timers firing under a plain `rq worker --with-scheduler`.
The JSON serializer is used because RQ's default, pickle, must never load data an attacker can shape.
"""
import logging
import math
import random
import re
import threading
import time
from datetime import datetime, timezone

from rq import Queue
from rq.exceptions import DuplicateJobError
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer

from . import keys, scripts
from .unsubscribe import FIRE_BATCH, due_timers, fire_timers, server_time

log = logging.getLogger("workers.sweeper")
FIRE_JOB = "workers.jobs.fire_delayed_unsubscribe"  # fires one named timer (kept for jobs already queued)
TICK_JOB = "workers.jobs.fire_due_timers"  # fires every due timer
HOUSEKEEPING_TICK_JOB = "workers.jobs.housekeeping_tick"  # pause ends and webhook dispatch, under a plain rq worker
HOUSEKEEPING_ALIVE_SECONDS = 10  # housekeeping not refreshed for this long is started again by the next trigger
SWEEP_INTERVAL = 0.1  # seconds between sweeps in each worker process
SWEEP_GRACE = 0.0  # seconds past its deadline before a sweeper fires a timer
TICK_GRACE = 1.0  # in a worker process that runs a sweeper, ticks fire only timers this overdue (a back-up)
TICK_BUDGET = 60.0  # seconds a tick job may spend on a backlog before it leaves the rest to the next one
TICK_TIMEOUT = 180  # RQ job timeout of a tick, seconds
FAILED_JOB_TTL = 86400  # seconds a failed trigger stays inspectable
FOLLOW_UP_WINDOW = 10.0  # seconds: a tick under a plain rq worker checks this far ahead (clock skew it covers)
SCHEDULER_STALE = 5  # seconds without a refresh (RQ refreshes every second) after which a lock's holder is dead
SCHEDULER_CHECK_INTERVAL = 2.0  # seconds between a sweeper's looks at the scheduler locks


def timer_queue(rq_redis, name):
    """The queue for timer jobs; `rq_redis` must be a client without decode_responses (RQ stores bytes)."""
    return Queue(name, connection=rq_redis, serializer=JSONSerializer)


def tick_job_id(queue_name, second, kind="timers"):
    """RQ job ids allow only [A-Za-z0-9_-]: one id per kind of tick, queue and whole epoch second."""
    return f"{kind}-{re.sub(r'[^A-Za-z0-9_-]', '_', queue_name)}-{int(second)}"


def schedule_timer(queue, db_id, profile_id, hash_id, deadline):
    """Make sure a tick runs at the first whole second not before `deadline` (the timer db_id/profile_id/
    hash_id is fired by it with every other timer due by then). Idempotent: one job per second."""
    schedule_tick(queue, math.ceil(deadline))


def schedule_tick(queue, second, job=TICK_JOB, kind="timers"):
    """Make sure a tick (`job`: a timer tick, or a housekeeping tick with kind="housekeeping") runs at the whole
    epoch `second` (by the RQ worker host's clock); one job per kind and second."""
    try:
        queue.enqueue_at(datetime.fromtimestamp(second, tz=timezone.utc), job,
                         job_id=tick_job_id(queue.name, second, kind), unique=True, result_ttl=0,
                         failure_ttl=FAILED_JOB_TTL, ttl=None, job_timeout=TICK_TIMEOUT)
    except DuplicateJobError:
        pass  # this second's tick is already scheduled (or running: the sweepers catch what it misses)


def sweep_once(r, now=None, grace=SWEEP_GRACE, limit=FIRE_BATCH):
    """Fire up to `limit` timers due by `now` - `grace` (now: the Redis clock); return how many fired."""
    due = due_timers(r, now, limit, grace)
    if not due:
        return 0
    return sum(1 for code in fire_timers(r, due, now).values() if code in ("fired", "dropped"))


_sweeper_process = False


def mark_sweeper_process():
    """Called by a worker process that runs a Sweeper (`python -m workers`), before it forks work horses."""
    global _sweeper_process
    _sweeper_process = True


def is_sweeper_process():
    return _sweeper_process


def tick_grace():
    """Grace of a tick job: in a worker that also runs a Sweeper (its work horse inherits this module's state)
    the sweeper fires timers on time and the tick only backs it up, firing what is more than TICK_GRACE
    overdue, so the two seldom do the same work. Under a plain `rq worker` the tick is the only trigger and
    fires everything due."""
    return TICK_GRACE if _sweeper_process else 0.0


def follow_up_tick(r, queue, window=FOLLOW_UP_WINDOW):
    """Under a plain `rq worker` the ticks are the only trigger, and RQ releases each by the worker host's clock,
    while deadlines are on the Redis clock. A host clock running ahead makes a tick come before its timer is due
    and find nothing to fire. So a tick that leaves a timer due within `window` seconds (by the Redis clock)
    schedules one more tick for the host's next second, and that one does the same, until the timer fires.
    Returns the follow-up's second, or None."""
    now = server_time(r)
    if not r.zrangebyscore(keys.pending_due(), f"({now}", now + window, start=0, num=1):
        return None
    second = math.floor(time.time()) + 1
    schedule_tick(queue, second)
    return second


def ensure_housekeeping(r, queue):
    """Make sure someone does housekeeping (pauses that end, webhook and call-URL dispatch: see
    workers/housekeeping.py). A `python -m workers` process's Housekeeper thread keeps keys.housekeeping_alive
    fresh; under a plain `rq worker` nothing runs without a job, so when no one has refreshed it for
    HOUSEKEEPING_ALIVE_SECONDS this starts a chain of housekeeping ticks (each schedules the next, a second
    later, while there is anything to watch). One SET NX; called where such work is created (a webhook, a
    call URL, a pause) and by every timer tick and delivery job. Returns True when it started a chain."""
    if not r.set(keys.housekeeping_alive(), "chain", nx=True, ex=HOUSEKEEPING_ALIVE_SECONDS):
        return False
    schedule_tick(queue, math.floor(time.time()) + 1, HOUSEKEEPING_TICK_JOB, kind="housekeeping")
    return True


def fire_due(r, budget=TICK_BUDGET, grace=SWEEP_GRACE, limit=FIRE_BATCH):
    """Sweep until fewer than a full batch fire (or `budget` seconds pass); return how many fired."""
    started, total = time.monotonic(), 0
    while True:
        fired = sweep_once(r, grace=grace, limit=limit)
        total += fired
        if fired < limit or time.monotonic() - started > budget:
            return total


class SchedulerLockWatch:
    """Releases RQ scheduler locks whose holder has died.

    A scheduler killed with its worker (kill -9, a lost machine) keeps its lock until the lock expires (RQ sets
    61 s), and only then can another worker's scheduler take the queue over. A live scheduler refreshes its lock
    every second, pushing its expiry forward; `check` notes each lock's owner and expiry time, and deletes a
    lock (if it still has the same owner) whose expiry has not moved for `stale` seconds. The next maintenance
    run of a live worker (every MAINTENANCE_INTERVAL seconds, workers/__main__.py) then starts a scheduler.
    Should a slow but live holder lose its lock, RQ (>= 2.11) notices at its next heartbeat and leaves the
    queue to the new holder.
    """

    def __init__(self, queue_names, stale=SCHEDULER_STALE):
        self.queue_names, self.stale = list(queue_names), stale
        self.seen = {}  # queue name -> (owner, expiry as epoch seconds, monotonic time it was first seen)

    def check(self, r):
        """Look at every lock once; return the queue names whose lock was released."""
        released = []
        for name in self.queue_names:
            key = RQScheduler.get_locking_key(name)
            with r.pipeline(transaction=False) as pipe:
                owner, left = pipe.get(key).pttl(key).execute()
            if owner is None or left < 0:
                self.seen.pop(name, None)
                continue
            expiry = time.time() + left / 1000
            previous = self.seen.get(name)
            if previous is None or previous[0] != owner or expiry > previous[1] + 0.5:
                self.seen[name] = (owner, expiry, time.monotonic())  # new, or refreshed since last seen
            elif time.monotonic() - previous[2] >= self.stale and scripts.release_lock(r, key, owner):
                self.seen.pop(name, None)
                released.append(name)
                log.warning("released the RQ scheduler lock of queue %s: its holder %s stopped refreshing it",
                            name, owner)
        return released


class Sweeper(threading.Thread):
    """Background thread of a worker process firing due timers every `interval` seconds until stopped, and
    releasing the RQ scheduler lock of `queue_names` when its holder has died."""

    def __init__(self, connect, interval=SWEEP_INTERVAL, grace=SWEEP_GRACE, queue_names=()):
        super().__init__(name="timer-sweeper", daemon=True)
        self.connect, self.interval, self.grace = connect, interval, grace
        self.locks = SchedulerLockWatch(queue_names)
        self.stopped = threading.Event()

    def run(self):
        r = self.connect()
        failing = False
        next_lock_check = 0.0
        # Workers started together would sweep in lockstep and race for the same timers: start at a random phase.
        self.stopped.wait(random.uniform(0, self.interval))
        while not self.stopped.is_set():
            fired = 0
            try:
                fired = fire_due(r, budget=self.interval * 4, grace=self.grace)
                if time.monotonic() >= next_lock_check:
                    next_lock_check = time.monotonic() + SCHEDULER_CHECK_INTERVAL
                    self.locks.check(r)
                if failing:
                    log.warning("sweeper reconnected")
                    failing = False
                if fired:
                    log.debug("sweeper fired %d timers", fired)
            except Exception:  # noqa: BLE001 - a Redis outage must not kill the sweeper; it retries next tick
                if not failing:
                    log.exception("sweep failed; retrying every %.2f s", self.interval)
                failing = True
            if fired < FIRE_BATCH:  # else a backlog is left: go on without pausing
                self.stopped.wait(self.interval)
