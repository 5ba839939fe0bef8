"""The worker's housekeeping thread: everything besides timers that must happen on time.

Every HOUSEKEEPING_INTERVAL seconds, in every worker process (each step is idempotent, so several workers
doing it at once is safe):
- suspensions that have run their course go back to `subscribed` (preferences.resume_due_suspensions);
- each webhook / call-URL target with undelivered events and no backoff pending gets one delivery job
  (`workers.jobs.deliver_target`), never two at once, so a slow target never piles up jobs. A job that spent
  its budget (webhooks.DELIVERY_BUDGET_*) with events left enqueues the target's next job itself
  (enqueue_delivery), at the back of the queue: targets take turns without waiting for this dispatcher.
"""
import logging
import threading

from webapp import keys, preferences, webhooks

log = logging.getLogger("workers.housekeeping")
HOUSEKEEPING_INTERVAL = 0.5  # seconds
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


class Housekeeper(threading.Thread):
    def __init__(self, connect, queue, interval=HOUSEKEEPING_INTERVAL):
        super().__init__(name="housekeeping", daemon=True)
        self.connect, self.queue, self.interval = connect, queue, interval
        self.stopped = threading.Event()

    def run(self):
        r = self.connect()
        duties = {"resuming suspensions": lambda: preferences.resume_due_suspensions(r),
                  "dispatching deliveries": lambda: enqueue_deliveries(r, self.queue)}
        failing = set()
        while not self.stopped.wait(self.interval):
            for name, duty in duties.items():  # each on its own: one failing must not hold up the other
                try:
                    duty()
                    failing.discard(name)
                except Exception:  # noqa: BLE001 - a Redis outage must not end housekeeping; it retries next tick
                    if name not in failing:
                        log.exception("housekeeping failed %s; retrying every %.1f s", name, self.interval)
                    failing.add(name)
