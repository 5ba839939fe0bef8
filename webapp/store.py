"""The Redis connection, owned here as flaskr's db.py owns its database: one client per app, made lazily."""
import redis
from flask import current_app


def connect(url):
    """A client for `url` (redis://, rediss:// or unix://) that returns str values."""
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30)


def get_redis():
    """The app's shared client (thread-safe; it pools connections)."""
    return client_of(current_app)


def client_of(app):
    """get_redis for code that runs outside a request context (one_click_wsgi.py)."""
    client = app.extensions.get("redis")
    if client is None:
        client = app.extensions["redis"] = connect(app.config["REDIS_URL"])
    return client


def init_app(app):
    app.extensions.pop("redis", None)
    app.extensions.pop("timer_queue", None)


def get_timer_queue():
    """The RQ queue that carries delayed-timer triggers (RQ needs a client without decode_responses)."""
    queue = current_app.extensions.get("timer_queue")
    if queue is None:
        from .delayed import timer_queue
        raw = redis.Redis.from_url(current_app.config["REDIS_URL"])
        queue = current_app.extensions["timer_queue"] = timer_queue(raw, current_app.config["RQ_QUEUE"])
    return queue
