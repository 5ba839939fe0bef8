"""Job functions, enqueued by dotted path with plain ids. Each re-reads Redis and acts only if still due."""
import os

from rq import get_current_job

from webapp import keys
from webapp.config import load_settings
from webapp.delayed import (ensure_housekeeping, fire_due, follow_up_tick, is_sweeper_process, tick_grace, tick_second,
                            timer_queue)
from webapp.store import connect
from webapp.unsubscribe import fire_timer, server_time
from webapp.webhooks import DELIVERY_BUDGET_EVENTS, DELIVERY_BUDGET_SECONDS, deliver, needs_delivery
from workers import housekeeping
from workers.housekeeping import enqueue_delivery


_client = None
_loaded_settings = None


def _settings():
    """The settings (environment and .env, checked), read once per process."""
    global _loaded_settings
    if _loaded_settings is None:
        _loaded_settings = load_settings(needs_secrets=False)
    return _loaded_settings


def _redis():
    global _client
    if _client is None:
        _client = connect(os.environ["REDIS_URL"])
    return _client


def fire_due_timers():
    """A timer tick (see webapp.delayed.schedule_timer): settle every delayed unsubscribe that is due.
    Returns how many fired; duplicate or late ticks find nothing left and change nothing. Under a plain
    `rq worker`, where ticks are the only trigger, it also makes sure a tick follows while a timer is about to
    be due (webapp.delayed.follow_up_tick), and that housekeeping runs (a fired timer is an event to deliver)."""
    r = _redis()
    job = get_current_job()
    only_trigger = not is_sweeper_process() and job is not None
    began = server_time(r) if only_trigger else None  # the Redis clock before firing: see follow_up_tick
    fired = fire_due(r, grace=tick_grace())
    if only_trigger:
        queue = timer_queue(job.connection, job.origin)
        follow_up_tick(r, queue, since=began, running=tick_second(job.id))
        ensure_housekeeping(r, queue)
    return fired


def housekeeping_tick():
    """A housekeeping tick (webapp.delayed.ensure_housekeeping): end the pauses that are due and dispatch webhook
    and call-URL deliveries, after scheduling the next tick a second later (workers.housekeeping.housekeeping_tick).
    Whichever process runs it, a plain `rq worker` or a `python -m workers` one, it keeps the chain going while
    there is anything to watch: a chain that stopped on a `python -m workers` process would be gone once that
    process left. Where a Housekeeper thread does the duties (this process's, or another's fresh mark) the tick
    only keeps the chain."""
    job = get_current_job()
    if job is None:
        return None
    return housekeeping.housekeeping_tick(_redis(), timer_queue(job.connection, job.origin),
                                          run=not is_sweeper_process(), running=tick_second(job.id))


def deliver_target(group):
    """Deliver a webhook or call-URL target's undelivered events in order (see webapp.webhooks). One run
    at a time per target: a lock refreshed before each event, so a killed run frees the target within
    seconds; a failure leaves the rest for the next attempt after backoff. A run sends for at most its budget
    (webhooks.DELIVERY_BUDGET_EVENTS / _SECONDS) and, with events left, enqueues the target's next run behind
    the jobs already queued: one slow target cannot hold the shared queue, and targets take turns."""
    r = _redis()
    r.delete(keys.delivery_queued(group))
    timeout = _settings()["WEBHOOK_TIMEOUT_SECONDS"]
    lock, token, ttl = keys.delivery_lock(group), os.urandom(8).hex(), int(timeout) + 5
    if not r.set(lock, token, nx=True, ex=ttl):
        return {"skipped": "another delivery of this target is running"}

    def heartbeat():
        if r.get(lock) != token or not r.expire(lock, ttl):
            raise RuntimeError("lost the delivery lock")

    try:
        result = deliver(r, group, timeout=timeout, heartbeat=heartbeat, max_events=DELIVERY_BUDGET_EVENTS,
                         max_seconds=DELIVERY_BUDGET_SECONDS)
    finally:
        if r.get(lock) == token:
            r.delete(lock)
    job = get_current_job()
    if result["error"] is None and job is not None and needs_delivery(r, group):
        enqueue_delivery(r, timer_queue(job.connection, job.origin), group)
    if job is not None and not is_sweeper_process():  # a target backing off needs a later dispatch
        ensure_housekeeping(r, timer_queue(job.connection, job.origin))
    return result


def fire_delayed_unsubscribe(db_id, profile_id, hash_id):
    """Settle a delayed unsubscribe if its pending record is still there and due (else a no-op)."""
    return fire_timer(_redis(), db_id, profile_id, hash_id)
