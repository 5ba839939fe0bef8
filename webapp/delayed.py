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
import os
import re
import threading
import time
import weakref
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
CHAIN_LOOK_BACK = 10  # seconds: a housekeeping tick queued this long ago (behind other jobs) still counts
CHAIN_LOOK_AHEAD = 5  # seconds: a tick scheduled this far ahead (by a host clock running ahead) still counts
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


def tick_second(job_id):
    """The second a tick's job id (tick_job_id) names, or None for any other job."""
    match = re.fullmatch(r"(?:timers|housekeeping)-.*-(\d+)", job_id or "")
    return int(match.group(1)) if match else None


def schedule_tick(queue, second, job=TICK_JOB, kind="timers"):
    """Make sure a tick (`job`: a timer tick, or a housekeeping tick with kind="housekeeping") runs at the whole
    epoch `second` (by the clock of the host whose RQ scheduler releases it); one job per kind and second.
    Returns True when it scheduled the job, False when a job with that id was there already."""
    try:
        queue.enqueue_at(datetime.fromtimestamp(second, tz=timezone.utc), job,
                         job_id=tick_job_id(queue.name, second, kind), unique=True, result_ttl=0,
                         failure_ttl=FAILED_JOB_TTL, ttl=None, job_timeout=TICK_TIMEOUT)
    except DuplicateJobError:
        return False  # this second's tick is already scheduled, queued, or running
    return True


def tick_waiting(queue, second, kind="timers"):
    """Whether the tick of `second` is still to run: in the scheduled registry or in the queue (one MULTI, so a
    tick the scheduler moves from the one to the other is seen in either)."""
    job_id = tick_job_id(queue.name, second, kind)
    with queue.connection.pipeline(transaction=True) as pipe:
        pipe.zscore(queue.scheduled_job_registry.key, job_id)
        pipe.lpos(queue.key, job_id)
        return any(found is not None for found in pipe.execute())


NEXT_TICK_TRIES = 5  # seconds a chain's next tick may move on past ticks that are running


def schedule_next_tick(queue, running=None, job=TICK_JOB, kind="timers", now=None, interval=1):
    """Schedule the next tick of a chain (a follow-up timer tick, the next housekeeping tick) `interval` seconds
    after this host's current second, and always after the second of the tick that runs now (`running`).
    Returns its second, or None. A tick's id is its second, and the job of a tick stays in Redis while it runs:
    scheduling a running tick's id is a duplicate that schedules nothing, and the chain ended there. That
    happens where the RQ scheduler's host clock is ahead of the one running the tick: it released the tick
    before this host's clock reached its second (CI met it: a timer that never fired). For the same reason a
    second taken by a tick that is running elsewhere (not waiting) is passed over for the next one."""
    first = max(math.floor(time.time() if now is None else now) + interval, (running or 0) + 1)
    for second in range(first, first + NEXT_TICK_TRIES):
        if schedule_tick(queue, second, job, kind) or tick_waiting(queue, second, kind):
            return second
    log.warning("no %s tick could be scheduled in the %d seconds from %d: each was running", kind,
                NEXT_TICK_TRIES, first)
    return None


UPGRADE_SCAN_COUNT = 1000  # pending_due members per ZSCAN step (and PERSISTs per round trip) at start-up


def persist_timer_records(r, count=UPGRADE_SCAN_COUNT):
    """Remove the expiry that older versions gave every pending record (a day past its deadline), so that a
    timer armed before an upgrade still fires however long the service is down (see queue_pending_writes).
    Run once by each `python -m workers` at start-up: one ZSCAN step of pending_due and one pipelined round of
    PERSIST (a no-op on a record without expiry, or one settled meanwhile) per `count` pending timers; a
    member that names no timer is left to due_timers. Returns how many records had an expiry."""
    persisted, cursor = 0, 0
    while True:
        cursor, members = r.zscan(keys.pending_due(), cursor, count=count)
        with r.pipeline(transaction=False) as pipe:
            for member, _deadline in members:
                parts = member.split("|")
                if len(parts) == 3:
                    pipe.persist(keys.pending_unsubscribe(*parts))
            persisted += sum(1 for done in pipe.execute() if done)
        if cursor == 0:
            return persisted


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


def follow_up_tick(r, queue, since=None, window=FOLLOW_UP_WINDOW, running=None):
    """Under a plain `rq worker` the ticks are the only trigger, and RQ releases each by the worker host's clock,
    while deadlines are on the Redis clock. A host clock running ahead makes a tick come before its timer is due
    and find nothing to fire. So a tick that leaves a timer due within `window` seconds (by the Redis clock)
    schedules one more tick for the host's next second, and that one does the same, until the timer fires.
    `since`: the Redis clock when the tick began firing. A timer that fell due after it, while the tick fired
    or before this look, was not fired and is not ahead either: it gets the follow-up too (it once got none and
    never fired). One due before it and still pending (a timer that cannot fire) does not keep ticks coming.
    `running`: the second of the tick that calls this (schedule_next_tick). Returns the follow-up's second, or
    None."""
    now = server_time(r)
    after = now if since is None else min(since, now)
    if not r.zrangebyscore(keys.pending_due(), f"({after}", now + window, start=0, num=1):
        return None
    return schedule_next_tick(queue, running)


def anything_to_watch(r):
    """Whether housekeeping has work to look for: a pause that will end, or a delivery target (every webhook
    and every resource's call URL has a consumer group on the timeline)."""
    if r.zcard(keys.suspensions_due()):
        return True
    try:
        return bool(r.xinfo_groups(keys.events_timeline()))
    except Exception:  # noqa: BLE001 - redis.ResponseError: no timeline yet, so no target either
        return False


def housekeeping_tick_waiting(r, queue, now=None, back=CHAIN_LOOK_BACK, ahead=CHAIN_LOOK_AHEAD):
    """Whether a housekeeping tick is in the queue's scheduled registry or in the queue itself, for a second near
    `now` (one pipelined round trip over the tick ids of those seconds). A chain that goes on always has one:
    each tick schedules its successor, for the next second, before anything else. A tick left in a dead
    worker's started registry (a kill, a Redis restart) does not count: it never runs again; nor does one whose
    job still says "queued" after a worker took it off the queue and died."""
    second = math.floor(time.time() if now is None else now)
    with r.pipeline(transaction=False) as pipe:
        for s in range(second - back, second + ahead + 1):
            job_id = tick_job_id(queue.name, s, "housekeeping")
            pipe.zscore(queue.scheduled_job_registry.key, job_id)
            pipe.lpos(queue.key, job_id)
        return any(found is not None for found in pipe.execute())


def ensure_housekeeping(r, queue):
    """Make sure someone does housekeeping (pauses that end, webhook and call-URL dispatch: see
    workers/housekeeping.py). A `python -m workers` process's Housekeeper thread keeps keys.housekeeping_alive
    fresh ("thread"); under a plain `rq worker` nothing runs without a job, so when no one has refreshed it for
    HOUSEKEEPING_ALIVE_SECONDS this starts a chain of housekeeping ticks (each schedules the next, a second
    later, while there is anything to watch). A "chain" mark with no tick scheduled or queued is stale (the
    chain died with a killed worker or a Redis that restarted from its AOF) and the chain is started again at
    once. Two chains started at once merge: a tick's id is its second, so they schedule the same successor.
    One SET NX when nobody does housekeeping; called where such work is created (a webhook, a call URL, a
    pause), by every timer tick and delivery job, and every HOUSEKEEPING_REARM_SECONDS by each web process
    while there is work (HousekeepingRearm). Returns True when it started a chain."""
    alive = keys.housekeeping_alive()
    if not r.set(alive, "chain", nx=True, ex=HOUSEKEEPING_ALIVE_SECONDS):
        if r.get(alive) != "chain" or housekeeping_tick_waiting(r, queue):
            return False
        r.set(alive, "chain", ex=HOUSEKEEPING_ALIVE_SECONDS)
    schedule_tick(queue, math.floor(time.time()) + 1, HOUSEKEEPING_TICK_JOB, kind="housekeeping")
    return True


class HousekeepingRearm(threading.Thread):
    """One daemon thread per web process that, every HOUSEKEEPING_REARM_SECONDS (a setting; 0: off), looks
    whether housekeeping has work (anything_to_watch) and if so calls ensure_housekeeping: under a plain
    `rq worker` a chain of ticks lost to a killed worker or a Redis restart is started again within that period
    even when no webhook, call URL or pause is added and no timer fires. The one-click and page paths pay
    nothing: they never touch Redis for it.

    Apps are watched from their first request on (`watch`, called by the app's WSGI entry): under gunicorn
    that is in each forked worker, whose thread starts there (a thread does not survive a fork). The thread
    holds only weak references to the apps, and its own Redis clients, one per (REDIS_URL, RQ_QUEUE) that a
    live app uses, closed when no live app uses it any more; it ends when no app is left.
    """

    lock = threading.Lock()
    apps = weakref.WeakKeyDictionary()  # app -> (REDIS_URL, RQ_QUEUE, period, timeout)
    current = None  # this process's thread
    process = object()  # replaced in a forked child: its apps are watched again there
    wake = threading.Event()

    def __init__(self):
        super().__init__(name="housekeeping-rearm", daemon=True)
        self.clients = {}  # (url, queue name) -> (decoded client, timer queue)
        self.next_at = {}  # (url, queue name) -> monotonic time of its next look
        self.failing = set()

    @classmethod
    def watch(cls, app):
        period = float(app.config.get("HOUSEKEEPING_REARM_SECONDS") or 0)
        if period <= 0:
            return
        with cls.lock:
            cls.apps[app] = (app.config["REDIS_URL"], app.config["RQ_QUEUE"], period,
                             app.config.get("REDIS_TIMEOUT_SECONDS") or 5)
            if cls.current is None or not cls.current.is_alive():
                cls.current = cls()
                cls.current.start()
            cls.wake.set()

    @classmethod
    def after_fork(cls):
        cls.lock = threading.Lock()
        cls.current = None
        cls.wake = threading.Event()
        cls.process = object()

    @classmethod
    def entry(cls, app, wsgi_app):
        """WSGI middleware: `watch` the app at its first request in each process (a dict-free identity check
        per request after that)."""
        seen = [None]

        def watched_app(environ, start_response):
            if seen[0] is not cls.process:
                seen[0] = cls.process
                cls.watch(app)
            return wsgi_app(environ, start_response)
        return watched_app

    def targets(self):
        """{(url, queue name): (period, timeout)} of the live apps; None (and the thread ends) when none is left."""
        with self.lock:
            found = {}
            for url, name, period, timeout in list(self.apps.values()):
                old = found.get((url, name))
                found[(url, name)] = (min(period, old[0]) if old else period, timeout)
            if not found and HousekeepingRearm.current is self:
                HousekeepingRearm.current = None
                return None
            return found

    def run(self):
        while True:
            self.wake.clear()
            targets = self.targets()
            if targets is None:
                break
            for key in [k for k in self.clients if k not in targets]:
                self.close(key)
            now = time.monotonic()
            for key, (period, timeout) in targets.items():
                if now >= self.next_at.get(key, 0.0):
                    self.next_at[key] = now + period
                    self.look(key, timeout)
            waits = [self.next_at[key] - time.monotonic() for key in targets]
            self.wake.wait(max(0.05, min(waits)))
        for key in list(self.clients):
            self.close(key)

    def look(self, key, timeout):
        import redis
        try:
            if key not in self.clients:
                url, name = key
                raw = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
                self.clients[key] = (redis.Redis.from_url(url, decode_responses=True, socket_timeout=timeout,
                                                          socket_connect_timeout=timeout), timer_queue(raw, name))
            r, queue = self.clients[key]
            if anything_to_watch(r) and ensure_housekeeping(r, queue):
                log.info("housekeeping re-armed: its chain of ticks was gone")
            self.failing.discard(key)
        except Exception:  # noqa: BLE001 - Redis down or restarting: look again next period
            if key not in self.failing:
                log.debug("housekeeping re-arm could not reach Redis; retrying", exc_info=True)
            self.failing.add(key)

    def close(self, key):
        r, queue = self.clients.pop(key)
        self.next_at.pop(key, None)
        for client in (r, queue.connection):
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass


os.register_at_fork(after_in_child=HousekeepingRearm.after_fork)


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
