"""A stock RQ worker with its scheduler (`rq worker --with-scheduler`, no Sweeper of ours) on a host whose clock runs
SKEW seconds ahead of the Redis host's: RQ's scheduler releases scheduled jobs by this clock. Used by
tests/test_delayed_workers.py; arguments: REDIS_URL QUEUE SKEW."""
import sys
import time

import redis
import rq.scheduler
from rq import Worker
from rq.serializers import JSONSerializer

redis_url, queue_name, skew = sys.argv[1], sys.argv[2], float(sys.argv[3])
rq.scheduler.current_timestamp = lambda: int(time.time() + skew)  # the clock RQ schedules by

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
from webapp.delayed import timer_queue  # noqa: E402

connection = redis.Redis.from_url(redis_url)
Worker([timer_queue(connection, queue_name)], connection=connection, serializer=JSONSerializer).work(
    with_scheduler=True)
