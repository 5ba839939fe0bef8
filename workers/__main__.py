"""`python -m workers`: one RQ worker with its scheduler and the timer sweeper.

Settings come from the environment like the web app's (REDIS_URL, RQ_QUEUE). Worker TTL and maintenance
interval are short so a dead worker is noticed and its scheduler duties retried within about a minute
(RQ's defaults: 420 s and 600 s); timers never wait for that, because every worker's sweeper fires them.
"""
import logging
import os
import sys

import redis
from rq import Worker
from rq.serializers import JSONSerializer

from webapp.config import load_settings
from webapp.delayed import Sweeper, timer_queue
from webapp.store import connect

WORKER_TTL = 30  # seconds; RQ's default is 420
MAINTENANCE_INTERVAL = 15  # seconds; RQ's default is 600


def main():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    settings = load_settings()
    url = settings["REDIS_URL"] or os.environ.get("REDIS_URL")
    if not url:
        sys.exit("REDIS_URL is not set: run `python -m webapp run`, or set REDIS_URL")
    os.environ["REDIS_URL"] = url
    rq_redis = redis.Redis.from_url(url)
    queue = timer_queue(rq_redis, settings["RQ_QUEUE"])
    sweeper = Sweeper(lambda: connect(url))
    sweeper.start()
    worker = Worker([queue], connection=rq_redis, serializer=JSONSerializer, worker_ttl=WORKER_TTL,
                    maintenance_interval=MAINTENANCE_INTERVAL)
    try:
        worker.work(with_scheduler=True, logging_level="INFO")
    finally:
        sweeper.stopped.set()


if __name__ == "__main__":
    main()
