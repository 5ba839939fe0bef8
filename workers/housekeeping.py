"""Housekeeping: everything besides timers that must happen on time.

Every HOUSEKEEPING_INTERVAL seconds, in every `python -m workers` process (a Housekeeper thread), and once a
second under a plain `rq worker --with-scheduler` (a chain of RQ housekeeping ticks, `housekeeping_tick`,
started by webapp.delayed.ensure_housekeeping like the timers' ticks), the same duties run (each is
idempotent, so several workers doing them at once is safe):
- suspensions that have run their course go back to `subscribed` (preferences.resume_due_suspensions);
- each webhook / call-URL target with undelivered events and no backoff pending gets one delivery job
  (`workers.jobs.deliver_target`), never two at once, so a slow target never piles up jobs. A job that spent
  its budget (webhooks.DELIVERY_BUDGET_*) with events left enqueues the target's next job itself
  (enqueue_delivery), at the back of the queue: targets take turns without waiting for this dispatcher.
"""
import logging
import threading

from webapp import keys, preferences, scripts, webhooks
from webapp.delayed import HOUSEKEEPING_ALIVE_SECONDS, HOUSEKEEPING_TICK_JOB, anything_to_watch, schedule_next_tick

log = logging.getLogger("workers.housekeeping")
HOUSEKEEPING_INTERVAL = 0.5  # seconds
HOUSEKEEPING_TICK_INTERVAL = 1  # seconds between housekeeping ticks under a plain rq worker (RQ: whole seconds)
DELIVERY_JOB = "workers.jobs.deliver_target"
DELIVERY_TIMEOUT = 600  # seconds an RQ delivery job may run (its budget, plus one POST, is far less)
QUEUED_MARKER_SECONDS = 60  # a lost delivery job is replaced after this long


def enqueue_deliveries(r, queue):
    """One delivery job per target that has work and none queued or running; returns the targets enqueued.

    A target's `queued` marker (set here, cleared when the job starts, expiring on its own if the job is
    lost) and its delivery lock (held while a job runs, refreshed per event, expiring soon after a killed
    job) keep it to one job at a time without waiting for RQ to notice a dead worker."""
    return [group for group in webhooks.due_targets(r) if enqueue_delivery(r, queue, group)]


def enqueue_delivery(r, queue, group):
    """Enqueue one delivery job for `group` unless one is queued or running; True if it did."""
    if r.exists(keys.delivery_lock(group)):
        return False
    if not r.set(keys.delivery_queued(group), "1", nx=True, ex=QUEUED_MARKER_SECONDS):
        return False
    queue.enqueue(DELIVERY_JOB, group, result_ttl=0, failure_ttl=86400, job_timeout=DELIVERY_TIMEOUT)
    return True


def duties(r, queue):
    """The duties, by name, each run on its own: one failing must not hold up the other."""
    return {"resuming suspensions": lambda: preferences.resume_due_suspensions(r),
            "dispatching deliveries": lambda: enqueue_deliveries(r, queue)}


def run_duties(r, queue, failing, retry_text):
    """Run every duty once; log a duty's failure once until it succeeds again (`failing`: names, updated)."""
    for name, duty in duties(r, queue).items():
        try:
            duty()
            failing.discard(name)
        except Exception:  # noqa: BLE001 - a Redis outage must not end housekeeping; it retries next time
            if name not in failing:
                log.exception("housekeeping failed %s; retrying %s", name, retry_text)
            failing.add(name)


def housekeeping_tick(r, queue, now=None, run=True, running=None):
    """One housekeeping tick (the chain that does housekeeping under a plain `rq worker`): schedule the next one
    first (a tick cut off by a killed worker still has a successor; after `running`, this tick's second: see
    webapp.delayed.schedule_next_tick), then run the duties, unless a Housekeeper thread does them (`run` False:
    this process has one; or keys.housekeeping_alive says "thread"), so they do not run twice as often. The
    chain goes on in any process while there is anything to watch, and stops when there is nothing; the next
    ensure_housekeeping starts it again. Returns the next tick's second, or None."""
    alive = keys.housekeeping_alive()
    try:
        watching = anything_to_watch(r)
    except Exception:  # noqa: BLE001 - Redis trouble: keep the chain, the next tick looks again
        watching = True
    if not watching:
        if scripts.release_lock(r, alive, "chain") and anything_to_watch(r):  # work came meanwhile
            r.set(alive, "chain", ex=HOUSEKEEPING_ALIVE_SECONDS)
        else:
            return None
    second = schedule_next_tick(queue, running, HOUSEKEEPING_TICK_JOB, "housekeeping", now,
                                HOUSEKEEPING_TICK_INTERVAL)
    if r.get(alive) == "thread":  # a Housekeeper thread's mark is left to it, and so are the duties
        return second
    r.set(alive, "chain", ex=HOUSEKEEPING_ALIVE_SECONDS)
    if run:
        run_duties(r, queue, set(), "at the next tick")
    return second


class Housekeeper(threading.Thread):
    def __init__(self, connect, queue, interval=HOUSEKEEPING_INTERVAL):
        super().__init__(name="housekeeping", daemon=True)
        self.connect, self.queue, self.interval = connect, queue, interval
        self.stopped = threading.Event()

    def run(self):
        r = self.connect()
        failing = set()
        while not self.stopped.wait(self.interval):
            try:  # tells ensure_housekeeping that no chain of ticks is needed while this thread runs
                r.set(keys.housekeeping_alive(), "thread", ex=HOUSEKEEPING_ALIVE_SECONDS)
            except Exception:  # noqa: BLE001 - a Redis outage: the duties below log it
                pass
            run_duties(r, self.queue, failing, f"every {self.interval:.1f} s")

    def stop(self):
        """Stop, and take this process's "thread" mark back (if no other Housekeeper has refreshed it since it
        is theirs for 0.5 s at most): the ticks of plain `rq worker`s then do the duties at once instead of
        waiting HOUSEKEEPING_ALIVE_SECONDS for the mark to expire."""
        self.stopped.set()
        try:
            with self.connect() as r:
                scripts.release_lock(r, keys.housekeeping_alive(), "thread")
        except Exception:  # noqa: BLE001 - Redis is down: the mark expires on its own
            pass
