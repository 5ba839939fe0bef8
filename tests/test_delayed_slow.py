"""Delayed mode with real minutes: one timer of timer_minutes=1 and the real 60-second unit, a real worker."""
import time

import pytest
import redis

from conftest import API_TOKEN, SIGNING_KEYS
from test_delayed_support import (assert_fired_once, delayed_contexts, fired_at, status_of, timer_events,
                                  wait_until, workers)  # noqa: F401 - the fixture
from webapp import create_app, delayed
from webapp import unsubscribe as u
from webapp.subscriptions import Status


@pytest.mark.slow
def test_one_real_minute(r, redis_url, workers, tmp_path):
    app = create_app({"TESTING": True, "REDIS_URL": redis_url, "API_TOKEN": API_TOKEN, "SIGNING_KEYS": SIGNING_KEYS,
                      "PUBLIC_BASE_URL": "https://unsub.example", "VAR_DIR": str(tmp_path)})
    assert app.config["TIME_UNIT_SECONDS"] == 60
    queue = delayed.timer_queue(redis.Redis.from_url(redis_url), app.config["RQ_QUEUE"])
    workers.start(TIME_UNIT_SECONDS="60")
    kept, stopped = delayed_contexts(app, r, 2, timer_minutes=1, category="news")
    deadlines = [u.arm_timer(r, ctx, u.resolve_scope(ctx), app.config["TIME_UNIT_SECONDS"],
                             on_armed=lambda *key: delayed.schedule_timer(queue, *key))["deadline"]
                 for ctx in (kept, stopped)]
    assert all(59 < d - time.time() <= 60 for d in deadlines)
    time.sleep(max(0.0, deadlines[0] - 1.0 - time.time()))
    assert u.cancel_timer(r, kept) == "cancelled"  # a second before its deadline
    assert timer_events(r, stopped) == [] and status_of(r, stopped) == Status.SUBSCRIBED
    wait_until(lambda: timer_events(r, stopped), timeout=deadlines[1] + 2.0 - time.time(), interval=0.02)
    assert deadlines[1] - 0.001 <= fired_at(r, stopped) <= deadlines[1] + 2.0
    (event,) = timer_events(r, stopped)
    assert event["after"] == {"status": "subscribed", "cats": ["receipts"]}  # the message's category stopped
    assert u.cancel_timer(r, stopped) == "unsubscribed"
    time.sleep(2.0)
    assert timer_events(r, kept) == [] and u.read_pending(r, kept) is None
    assert_fired_once(r, [stopped])
