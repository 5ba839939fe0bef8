"""Job functions, enqueued by dotted path with plain ids. Each re-reads Redis and acts only if still due."""
import os

from webapp.delayed import fire_due, tick_grace
from webapp.store import connect
from webapp.unsubscribe import fire_timer

_client = None


def _redis():
    global _client
    if _client is None:
        _client = connect(os.environ["REDIS_URL"])
    return _client


def fire_due_timers():
    """A timer tick (see webapp.delayed.schedule_timer): settle every delayed unsubscribe that is due.
    Returns how many fired; duplicate or late ticks find nothing left and change nothing."""
    return fire_due(_redis(), grace=tick_grace())


def fire_delayed_unsubscribe(db_id, profile_id, hash_id):
    """Settle a delayed unsubscribe if its pending record is still there and due (else a no-op)."""
    return fire_timer(_redis(), db_id, profile_id, hash_id)
