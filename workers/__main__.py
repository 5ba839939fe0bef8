"""`python -m workers`: one RQ worker with its scheduler and the timer sweeper.

Settings come from the environment like the web app's (REDIS_URL, RQ_QUEUE). What a dead worker leaves
behind, and who takes it over:
- due timers: every worker process runs a Sweeper thread (webapp/delayed.py) that fires them from Redis every
  0.1 s, so a surviving (or restarted) worker fires them at once; no RQ machinery is waited for. Timers a
  killed sweeper had just claimed are left to it for unsubscribe.FIRE_LEASE (1 s), then fired by the others
  at their next sweep, still within 2 s of the deadline;
- the RQ scheduler (moves scheduled jobs, e.g. timer ticks, into the queue): its holder refreshes its lock
  every second; the sweepers release a lock not refreshed for SCHEDULER_STALE (5 s; they look every 2 s), and
  a live worker's next maintenance run (every MAINTENANCE_INTERVAL, checked at least every WORKER_TTL - 15 s)
  starts a scheduler: about 7-17 s after the death (10 s measured), instead of RQ's 61 s lock expiry plus its
  default 600 s maintenance interval;
- suspensions ending and webhook deliveries: every worker's Housekeeper thread (workers/housekeeping.py;
  under a plain `rq worker`, a chain of RQ housekeeping ticks does the same);
  a delivery cut off by the kill left its events unacknowledged, and the next delivery job re-sends them;
- at start-up it removes the expiry that older versions gave pending timer records (a day past the deadline),
  so that a timer armed before the upgrade survives a long stop (webapp.delayed.persist_timer_records);
- a job the dead worker was running is failed as abandoned by the others' maintenance once its heartbeat
  expires (about 90 s); a lost tick is harmless, the sweepers have fired its timers.
"""
import logging
import os
import sys

import redis
from rq import Worker
from rq.serializers import JSONSerializer

from webapp.config import settings_or_exit
from webapp.delayed import Sweeper, mark_sweeper_process, persist_timer_records, timer_queue
from webapp.store import settings_advice, unreachable
from workers.housekeeping import Housekeeper

WORKER_TTL = 20  # seconds; RQ's default is 420. The idle worker wakes every WORKER_TTL - 15 s for maintenance
MAINTENANCE_INTERVAL = 5  # seconds; RQ's default is 600. Also how often an idle worker tries to be the scheduler


def routine_maintenance_hidden(record):
    """A logging filter for RQ's worker log: each maintenance run logs two INFO lines ("cleaning registries for
    queue ...", "cleaning group registries"), which at MAINTENANCE_INTERVAL (5 s, not RQ's 600 s) would be
    most of an idle worker's log. Warnings and errors of the same runs still show."""
    return not (record.levelno == logging.INFO and "registries" in str(record.msg))


def main():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    logging.getLogger("rq.worker").addFilter(routine_maintenance_hidden)
    settings = settings_or_exit(needs_secrets=False)  # a worker signs and checks no link: it needs no keys
    url = settings["REDIS_URL"] or os.environ.get("REDIS_URL")
    if not url:
        sys.exit("REDIS_URL is not set: run `python -m webapp run`, or set REDIS_URL")
    os.environ["REDIS_URL"] = url
    problem = unreachable(url, settings["REDIS_TIMEOUT_SECONDS"])
    if problem:
        sys.exit(problem)  # one line, not redis-py's traceback; a supervisor starts the worker again
    rq_redis = redis.Redis.from_url(url)
    with redis.Redis.from_url(url, decode_responses=True) as client:
        for advice in settings_advice(client):
            logging.warning(advice)
        try:  # timers an older version armed with an expiry must not be lost to a long stop
            persisted = persist_timer_records(client)
            if persisted:
                logging.info("kept %d pending timers armed by an older version from expiring", persisted)
        except redis.RedisError:
            logging.exception("could not remove the expiry of older versions' pending timers; the next start "
                              "tries again")
    queue = timer_queue(rq_redis, settings["RQ_QUEUE"])
    # Timeouts, so that a half-open connection cannot stall the sweeper for good (it reconnects and retries).
    sweeper = Sweeper(lambda: redis.Redis.from_url(url, decode_responses=True, socket_timeout=30,
                                                   socket_connect_timeout=5, health_check_interval=30),
                      queue_names=[queue.name])
    sweeper.start()
    mark_sweeper_process()
    housekeeper = Housekeeper(lambda: redis.Redis.from_url(url, decode_responses=True, socket_timeout=30,
                                                           socket_connect_timeout=5), queue)
    housekeeper.start()
    worker = Worker([queue], connection=rq_redis, serializer=JSONSerializer, worker_ttl=WORKER_TTL,
                    maintenance_interval=MAINTENANCE_INTERVAL)
    try:
        worker.work(with_scheduler=True, logging_level="INFO")
    finally:
        sweeper.stopped.set()
        housekeeper.stop()


if __name__ == "__main__":
    main()
