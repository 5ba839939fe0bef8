"""Probes for a load balancer or an orchestrator: `/healthz` (liveness) and `/readyz` (readiness).

- `GET /healthz`: 200 while the process serves HTTP. It reads nothing, so a Redis outage does not make an
  orchestrator restart web processes that will serve again by themselves once Redis is back.
- `GET /readyz`: 200 when Redis answers a PING within REDIS_TIMEOUT_SECONDS, else 503 with `Retry-After`: take
  the instance out of rotation meanwhile (every page and API call would answer 503). It holds no address and
  shows no REDIS_URL.

Both answer JSON, `Cache-Control: no-store`, also to HEAD, and need no token."""
import redis
from flask import Blueprint, jsonify

from . import store

bp = Blueprint("health", __name__)


def _answer(body, status, **headers):
    resp = jsonify(body)
    resp.status_code = status
    resp.headers["Cache-Control"] = "no-store"
    resp.headers.update(headers)
    return resp


@bp.get("/healthz")
def healthz():
    return _answer({"status": "ok"}, 200)


@bp.get("/readyz")
def readyz():
    try:
        store.get_redis().ping()
    except (redis.ConnectionError, redis.TimeoutError) as exc:  # down, restarting, loading, stalled, bad password
        return _answer({"status": "unavailable", "redis": type(exc).__name__}, 503, **{"Retry-After": "5"})
    except redis.ResponseError as exc:
        if not store.unavailable_reply(exc):
            raise
        return _answer({"status": "unavailable", "redis": str(exc).split(" ", 1)[0]}, 503, **{"Retry-After": "5"})
    return _answer({"status": "ready"}, 200)
