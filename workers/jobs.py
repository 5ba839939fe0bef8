"""Job functions, enqueued by dotted path with plain ids. Each re-reads Redis and acts only if still due."""
import os

from webapp.store import connect
from webapp.unsubscribe import fire_timer

_client = None


def _redis():
    global _client
    if _client is None:
        _client = connect(os.environ["REDIS_URL"])
    return _client


def fire_delayed_unsubscribe(db_id, profile_id, hash_id):
    """Settle a delayed unsubscribe if its pending record is still there and due (else a no-op)."""
    return fire_timer(_redis(), db_id, profile_id, hash_id)
