"""The Redis connection, owned here as flaskr's db.py owns its database: one client per app, made lazily."""
import re

import redis
from flask import current_app
from redis.exceptions import MasterDownError, OutOfMemoryError, ReadOnlyError, ResponseError

from .config import DEFAULTS


def timeouts(seconds=DEFAULTS["REDIS_TIMEOUT_SECONDS"]):
    """redis-py client options: redis-py's TimeoutError when Redis takes over `seconds` to accept a connection
    or to answer (REDIS_TIMEOUT_SECONDS for the web app's clients, the SDK rate limiter's included)."""
    return {"socket_timeout": seconds, "socket_connect_timeout": seconds}


def connect(url, timeout=DEFAULTS["REDIS_TIMEOUT_SECONDS"]):
    """A client for `url` (redis://, rediss:// or unix://) that returns str values (see timeouts)."""
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30, **timeouts(timeout))


# Error replies by which Redis says it cannot serve for a while, rather than that a request was wrong: out of
# memory under noeviction (OOM), a replica (READONLY), a replica whose link to its primary is down with
# replica-serve-stale-data no (MASTERDOWN, during a failover), a failed snapshot with stop-writes-on-bgsave-error
# (MISCONF), too few replicas (NOREPLICAS), a script running too long (BUSY). redis-py raises the first three as
# their own classes (and LOADING, a restart still reading its data, as a ConnectionError); the others keep their
# code in the message, after "Command # n (...) of pipeline caused error: " in a redis-py pipeline.
_UNAVAILABLE_CODES = re.compile(r"(?:Command # \d+ \(.*\) of pipeline caused error: )?(?:MISCONF|NOREPLICAS|BUSY) ",
                                re.DOTALL)


def unavailable_reply(exc):
    """True when `exc` is Redis saying it cannot serve for a while: the service is unavailable, not broken."""
    return isinstance(exc, (OutOfMemoryError, ReadOnlyError, MasterDownError)) or (
        isinstance(exc, ResponseError) and _UNAVAILABLE_CODES.match(str(exc)) is not None)


# Of those, the replies by which Redis refuses a write while it still serves reads: out of memory under
# noeviction, a replica, a failed snapshot, too few replicas (MASTERDOWN and BUSY refuse reads too).
_WRITE_REFUSAL_CODES = re.compile(r"(?:Command # \d+ \(.*\) of pipeline caused error: )?(?:MISCONF|NOREPLICAS) ",
                                  re.DOTALL)


def writes_refused(exc):
    """True when `exc` is Redis refusing a write for a while, reads still being served."""
    return isinstance(exc, (OutOfMemoryError, ReadOnlyError)) or (
        isinstance(exc, ResponseError) and _WRITE_REFUSAL_CODES.match(str(exc)) is not None)


def get_redis():
    """The app's shared client (thread-safe; it pools connections)."""
    return client_of(current_app)


def client_of(app):
    """get_redis for code that runs outside a request context (front.py)."""
    client = app.extensions.get("redis")
    if client is None:
        client = app.extensions["redis"] = connect(app.config["REDIS_URL"], app.config["REDIS_TIMEOUT_SECONDS"])
    return client


# A stored subscription record is 85-200 bytes (subscriptions.encode_record); Redis keeps a profile's hash as
# a compact listpack only while every value is within hash-max-listpack-value (default 64), else a hashtable:
# 257 instead of 385 bytes per subscription at a million (bench/memory.py).
MIN_HASH_LISTPACK_VALUE = 256


def settings_advice(client):
    """Warnings about the Redis server's settings, for the logs at start-up (none when CONFIG is refused)."""
    try:
        config = client.config_get("hash-max-listpack-value")
        config.update(client.config_get("appendonly"))
    except redis.ResponseError:  # managed Redis services often disable CONFIG
        return []
    advice = []
    if int(config.get("hash-max-listpack-value", MIN_HASH_LISTPACK_VALUE)) < MIN_HASH_LISTPACK_VALUE:
        advice.append(f"Redis hash-max-listpack-value is {config['hash-max-listpack-value']}: set it to 512 "
                      f"(subscriptions then take about a third less memory; see README, Production Redis)")
    if config.get("appendonly") == "no":
        advice.append("Redis appendonly is off: a restart loses every change since the last snapshot; "
                      "set appendonly yes with appendfsync everysec (or always)")
    return advice


def unreachable(url, timeout=DEFAULTS["REDIS_TIMEOUT_SECONDS"]):
    """None when the Redis at `url` answers a PING within `timeout` seconds, else one line saying why not (for a
    command's start: `python -m webapp run` with REDIS_URL set, `python -m workers`)."""
    try:
        with redis.Redis.from_url(url, **timeouts(timeout)) as client:
            client.ping()
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as exc:
        from .config import shown_url
        detail = str(exc).strip() or type(exc).__name__
        return f"Redis at {shown_url(url)} does not answer ({detail}): start it, or correct REDIS_URL"
    return None


def init_app(app):
    app.extensions.pop("redis", None)
    app.extensions.pop("timer_queue", None)


def ensure_housekeeping():
    """After creating work for housekeeping (a webhook, a call URL, a pause that will end): make sure someone
    does it, also under a plain `rq worker` (delayed.ensure_housekeeping: one SET NX when it is running)."""
    from .delayed import ensure_housekeeping as ensure
    ensure(get_redis(), get_timer_queue())


def get_timer_queue():
    """The RQ queue that carries delayed-timer triggers (RQ needs a client without decode_responses)."""
    queue = current_app.extensions.get("timer_queue")
    if queue is None:
        from .delayed import timer_queue
        raw = redis.Redis.from_url(current_app.config["REDIS_URL"],
                                   **timeouts(current_app.config["REDIS_TIMEOUT_SECONDS"]))
        queue = current_app.extensions["timer_queue"] = timer_queue(raw, current_app.config["RQ_QUEUE"])
    return queue
