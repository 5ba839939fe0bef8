"""A stock RQ worker with its scheduler (`rq worker --with-scheduler`, no Sweeper of ours) whose scheduler's clock runs
SKEW seconds ahead of the Redis host's and of the clock the worker runs its jobs by: the scheduler of a worker on
another host, releasing scheduled jobs by that host's clock. Optional POLL: seconds between the scheduler's looks
(RQ's default 1). Used by tests/test_delayed_workers.py; arguments: REDIS_URL QUEUE SKEW [POLL]."""
import math
import sys
import time

import redis
import rq.scheduler
import rq.worker.base
from rq import Worker
from rq.serializers import JSONSerializer

redis_url, queue_name, skew = sys.argv[1], sys.argv[2], float(sys.argv[3])
poll = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
rq.scheduler.current_timestamp = lambda: int(time.time() + skew)  # the clock RQ schedules by


class PollInterval(float):
    """The scheduler sleeps `interval` seconds between looks, and gives its locks `interval + 60` seconds, which
    Redis wants whole."""

    def __add__(self, other):
        return math.ceil(float(self) + other)


class PollingScheduler(rq.scheduler.RQScheduler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, interval=PollInterval(poll), **kwargs)


rq.worker.base.RQScheduler = PollingScheduler

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
from webapp.delayed import timer_queue  # noqa: E402

connection = redis.Redis.from_url(redis_url)
Worker([timer_queue(connection, queue_name)], connection=connection, serializer=JSONSerializer).work(
    with_scheduler=True)
