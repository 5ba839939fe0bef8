"""Delayed mode's state machine against a real redis-server: arming, cancelling, firing (Lua compare-and-set),
duplicate and late runs of the worker's jobs, and the RQ triggers (one tick job per deadline second)."""
import time

import pytest
from rq.registry import ScheduledJobRegistry

from conftest import DAMAGED_ENTRIES, chained_past, damage_newest_entry, email_resource

from test_delayed_support import (assert_fired_once, delayed_contexts, message_context, status_of, timer_events,
                                  wait_until, workers)  # noqa: F401 - the fixture
from webapp import delayed, events, keys, scripts
from webapp import unsubscribe as u
from webapp.resources import add_resource, delete_resource, update_resource
from webapp.subscriptions import Status, decode_record, set_subscription
from webapp.tokens import issue_smid
from workers import jobs

UNIT = 0.2  # seconds per timer "minute" in these tests


@pytest.fixture
def job_env(redis_url, monkeypatch):
    """Let workers.jobs talk to the test Redis in this process, as the worker process would."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setattr(jobs, "_client", None)


def app_state(r):
    """The service's keys and contents (RQ's own keys, which hold binary data, left out)."""
    readers = {"string": r.get, "hash": r.hgetall, "list": lambda k: r.lrange(k, 0, -1), "set": r.smembers,
               "zset": lambda k: r.zrange(k, 0, -1, withscores=True), "stream": r.xrange}
    return {k: readers[r.type(k)](k) for k in r.scan_iter(match=keys.PREFIX + ":*", count=1000)}


def arm(r, ctx, unit=UNIT, **kw):
    return u.arm_timer(r, ctx, u.resolve_scope(ctx), unit, **kw)


def sleep_past(result, extra=0.05):
    time.sleep(max(0.0, result["deadline"] - time.time() + extra))


def test_arm_is_idempotent_and_uses_the_redis_clock(app, r):
    (ctx,) = delayed_contexts(app, r, 1, timer_minutes=3)
    before = time.time()
    first = arm(r, ctx, unit=10)
    again = arm(r, ctx, unit=10)
    assert first["state"] == "pending" and again == first
    assert before + 29 < first["deadline"] < time.time() + 31
    pending = u.read_pending(r, ctx)
    assert pending["deadline"] == first["deadline"] and pending["scope"] == {"cats": None}
    assert r.zscore(keys.pending_due(), f"{ctx.key[0]}|{ctx.key[1]}|{ctx.key[2]}") == first["deadline"]
    assert r.ttl(keys.pending_unsubscribe(*ctx.key)) == -1       # kept until settled, however late


def test_timer_fires_at_deadline_with_the_ledger_format_of_other_changes(app, r):
    timed, now_ctx = delayed_contexts(app, r, 2, timer_minutes=1)
    result = arm(r, timed)
    assert u.fire_timer(r, *timed.key) is False                   # not due yet: nothing changes
    assert status_of(r, timed) == Status.SUBSCRIBED
    sleep_past(result)
    assert u.fire_timer(r, *timed.key) is True
    u.unsubscribe(r, now_ctx, u.resolve_scope(now_ctx), "page_now")  # the WATCH/MULTI path, for comparison
    (event,) = timer_events(r, timed)
    now_event = events.list_events(r, 1, now_ctx.key[1])[0][0]
    assert set(event) == set(now_event) and event["seq"] == 2
    assert event["before"] == {"status": "subscribed", "cats": ["news", "receipts"]}
    assert event["after"] == {"status": "unsubscribed", "cats": ["news", "receipts"]}
    assert event["smid"] == timed.token and event["evidence"]["seconds_since_send"] is not None
    assert status_of(r, timed) == Status.UNSUBSCRIBED
    assert_fired_once(r, [timed])
    timeline = [f for _id, f in r.xrange(keys.events_timeline())]  # entries as every other change writes them
    rid = str(timed.resource["id"])
    assert {"ref": f"1|{timed.key[1]}|2", "rid": rid, "method": "timer"} in timeline
    assert {"ref": f"1|{now_ctx.key[1]}|2", "rid": rid, "method": "page_now"} in timeline
    sub = decode_record(r.hget(keys.profile_subscriptions(1, timed.key[1]), timed.key[2]))
    assert sub["status"] == Status.UNSUBSCRIBED and sub["updated_at"]


def test_category_timer_stops_only_that_category_and_a_late_cancel_says_unsubscribed(app, r):
    (ctx,) = delayed_contexts(app, r, 1, timer_minutes=1, category="news")
    sleep_past(arm(r, ctx))
    assert u.fire_timer(r, *ctx.key) is True
    (event,) = timer_events(r, ctx)
    assert event["after"] == {"status": "subscribed", "cats": ["receipts"]}
    assert u.cancel_timer(r, ctx) == "unsubscribed"               # fired already, though still subscribed
    assert u.arm_timer(r, ctx, u.resolve_scope(ctx), UNIT) == {"state": "unsubscribed"}  # nothing left to stop


THREE_CATS = [{"title": "News", "api_name": "news", "in_manager": True, "required": False},
              {"title": "Promo", "api_name": "promo", "in_manager": True, "required": False},
              {"title": "Receipts", "api_name": "receipts", "in_manager": True, "required": False}]


def subscribed(r, ctx):
    db_id, profile_id, hash_id = ctx.key
    record = decode_record(r.hget(keys.profile_subscriptions(db_id, profile_id), hash_id))
    return Status(record["status"]).word, sorted(set(c["api_name"] for c in THREE_CATS) - set(record["uncats"]))


def test_an_unsubscribe_of_another_scope_leaves_the_pending_timer_to_stop_its_own(app, r):
    """One pending timer per subscription, for the scope of the message it was started from. An unsubscribe
    (API, one-click, a page's "now") that leaves that timer something to do must not drop it: nobody cancelled
    it, so its scope stops at the deadline. One that leaves it nothing to do settles it."""
    other_cat, part_of_whole, covered = delayed_contexts(app, r, 3, timer_minutes=1, category="news",
                                                         categories=THREE_CATS)
    whole = message_context(app, r, part_of_whole, None)
    arm(r, other_cat)                                              # "News will stop"
    arm(r, whole)                                                  # "All messages will stop"
    result = arm(r, covered)                                       # "News will stop"
    for ctx, cats in ((other_cat, ["promo"]), (part_of_whole, ["news"]), (covered, ["news", "promo"])):
        promo = message_context(app, r, ctx, "promo")
        assert u.unsubscribe(r, promo, {"cats": cats}, "api")["changed"] is True
    assert u.read_pending(r, other_cat) and u.read_pending(r, whole)
    assert not u.read_pending(r, covered)                          # firing it would change nothing any more
    assert r.zscore(keys.pending_due(), keys.pending_due_member(*covered.key)) is None
    sleep_past(result)
    assert u.fire_timers(r, [other_cat.key, whole.key, covered.key]) == {
        other_cat.key: "fired", whole.key: "fired", covered.key: "gone"}
    assert subscribed(r, other_cat) == ("subscribed", ["receipts"])
    assert subscribed(r, whole)[0] == "unsubscribed"
    assert subscribed(r, covered) == ("subscribed", ["receipts"]) and timer_events(r, covered) == []
    for ctx in (other_cat, whole, covered):
        assert events.verify_chain(r, 1, ctx.key[1]) is None


def test_cancel_before_deadline_wins_and_cancel_after_fire_says_unsubscribed(app, r):
    cancelled, fired = delayed_contexts(app, r, 2, timer_minutes=1)
    arm(r, cancelled)
    result = arm(r, fired)
    assert u.cancel_timer(r, cancelled) == "cancelled"
    assert u.cancel_timer(r, cancelled) == "none"
    sleep_past(result)
    codes = u.fire_timers(r, [cancelled.key, fired.key])
    assert codes == {cancelled.key: "gone", fired.key: "fired"}
    assert status_of(r, cancelled) == Status.SUBSCRIBED and timer_events(r, cancelled) == []
    assert u.cancel_timer(r, fired) == "unsubscribed"
    assert r.zcard(keys.pending_due()) == 0


def test_duplicate_and_late_job_runs_are_noops(app, r, job_env):
    fired, cancelled = delayed_contexts(app, r, 2, timer_minutes=1)
    result = arm(r, fired)
    arm(r, cancelled)
    assert u.cancel_timer(r, cancelled) == "cancelled"
    sleep_past(result)
    assert jobs.fire_delayed_unsubscribe(*fired.key) is True
    state = app_state(r)
    assert jobs.fire_delayed_unsubscribe(*fired.key) is False     # duplicate run
    assert jobs.fire_delayed_unsubscribe(*cancelled.key) is False  # run after the cancel
    assert jobs.fire_due_timers() == 0                            # a late tick
    assert app_state(r) == state
    assert_fired_once(r, [fired])
    assert status_of(r, cancelled) == Status.SUBSCRIBED and timer_events(r, cancelled) == []


def test_duplicate_and_late_jobs_run_by_a_real_worker_are_noops(app, r, redis_url, workers):
    fired, cancelled = delayed_contexts(app, r, 2, timer_minutes=1)
    result = arm(r, fired)
    arm(r, cancelled)
    u.cancel_timer(r, cancelled)
    sleep_past(result)
    assert u.fire_timer(r, *fired.key)
    state = app_state(r)
    import redis as redis_py
    queue = delayed.timer_queue(redis_py.Redis.from_url(redis_url), "unsubscribe")
    ids = [queue.enqueue(delayed.FIRE_JOB, *fired.key, result_ttl=60).id,
           queue.enqueue(delayed.FIRE_JOB, *fired.key, result_ttl=60).id,
           queue.enqueue(delayed.FIRE_JOB, *cancelled.key, result_ttl=60).id,
           queue.enqueue(delayed.TICK_JOB, result_ttl=60).id]
    workers.start()
    jobs_done = wait_until(lambda: all(j.get_status() == "finished" for j in queue.job_class.fetch_many(
        ids, connection=queue.connection, serializer=queue.serializer)) and queue.job_class.fetch_many(
        ids, connection=queue.connection, serializer=queue.serializer), 15)
    assert [j.return_value() for j in jobs_done] == [False, False, False, 0]
    assert app_state(r) == state


def test_fire_is_a_compare_and_set_against_what_it_read(app, r):
    """The Lua step refuses to apply a settlement computed from a state that changed meanwhile."""
    a, b, c = delayed_contexts(app, r, 3, timer_minutes=1)
    result = [arm(r, ctx) for ctx in (a, b, c)][-1]
    sleep_past(result)

    def settle(ctx):
        db_id, profile_id, hash_id = ctx.key
        (row,) = scripts.claim_timers(r, [(keys.pending_unsubscribe(*ctx.key), keys.profile_subscriptions(
            db_id, profile_id), keys.profile_events(db_id, profile_id), hash_id)], "test", 0.0)
        item_keys, values, _has = u._settlement(r, db_id, profile_id, hash_id, row,
                                                {ctx.resource["id"]: ctx.resource}, "2026-01-01T00:00:00.000Z")
        return lambda: scripts.fire_timers(r, keys.pending_due(), keys.events_timeline(), [(item_keys, values)])

    apply_a, apply_b, apply_c = settle(a), settle(b), settle(c)
    assert u.cancel_timer(r, a) == "cancelled"                    # cancelled after the read
    set_subscription(r, {"db_id": 1, "profile_id": b.key[1], "resource_id": b.resource["id"], "channel": "email",
                         "email": "u1@example.com", "priority": 7})  # changed after the read (not its status)
    assert apply_a() == ["gone"] and apply_b() == ["changed"] and apply_c() == ["fired"]
    assert apply_c() == ["gone"]                                  # replaying the same settlement
    assert timer_events(r, a) == [] and timer_events(r, b) == [] and len(timer_events(r, c)) == 1
    assert u.fire_timer(r, *b.key) is True                        # re-read: settled from what it is now
    assert status_of(r, b) == Status.UNSUBSCRIBED and not u.read_pending(r, b)
    assert decode_record(r.hget(keys.profile_subscriptions(1, b.key[1]), b.key[2]))["priority"] == 7
    for ctx in (a, b, c):
        assert events.verify_chain(r, 1, ctx.key[1]) is None


def test_rearmed_timer_is_not_fired_by_a_stale_trigger(app, r):
    (ctx,) = delayed_contexts(app, r, 1, timer_minutes=1)
    sleep_past(arm(r, ctx))
    u.cancel_timer(r, ctx)
    second = arm(r, ctx, unit=30)                                  # a new timer, 30 s away
    assert u.fire_timer(r, *ctx.key) is False
    assert delayed.sweep_once(r) == 0
    assert u.read_pending(r, ctx)["deadline"] == second["deadline"]
    assert u.fire_timer(r, *ctx.key, now=second["deadline"] + 0.001) is True


def category_contexts(app, r, timer_minutes=1):
    """One subscription of a resource with News, Promo and (required) Receipts: the contexts of a News message's,
    a Promo message's and a category-less message's link."""
    cats = [{"title": t, "api_name": t.lower(), "in_manager": True, "required": t == "Receipts"}
            for t in ("News", "Promo", "Receipts")]
    res = add_resource(r, email_resource(categories=cats,
                                         unsubscribe={"mode": "delayed", "timer_minutes": timer_minutes}))
    sub, _new = set_subscription(r, {"db_id": 1, "profile_id": "p-1", "resource_id": res["id"], "channel": "email",
                                     "email": "ann@example.com"})
    ring = app.extensions["signing_keys"]
    return [u.open_smid(r, ring, issue_smid(ring, res["id"], 1, "p-1", sub["hash_id"], cat))
            for cat in ("news", "promo", None)]


def cats_of(r, ctx):
    return decode_record(r.hget(keys.profile_subscriptions(1, "p-1"), ctx.key[2])).get("uncats", [])


def test_a_start_from_another_categorys_link_widens_the_pending_timer_and_keeps_its_deadline(app, r):
    """One timer per subscription: the Promo message's page, opened while a News timer runs, shows that timer
    with "News, Promo will stop"; so the timer stops both at the deadline the person was shown."""
    news, promo, whole = category_contexts(app, r)
    first = arm(r, news)
    assert arm(r, promo) == first                                      # the same timer, the same deadline
    assert u.read_pending(r, news)["scope"] == {"cats": ["news", "promo"]}
    assert arm(r, news) == first and u.read_pending(r, news)["scope"] == {"cats": ["news", "promo"]}
    widened = u.read_pending(r, news)["evidence"]["widened"]
    assert [w["smid"] for w in widened] == [promo.token] and widened[0]["scope"] == {"cats": ["promo"]}
    assert r.zscore(keys.pending_due(), keys.pending_due_member(*news.key)) == first["deadline"]
    sleep_past(first)
    assert u.fire_timer(r, *news.key) is True
    assert cats_of(r, news) == ["news", "promo"] and status_of(r, news) == Status.SUBSCRIBED  # Receipts go on
    (event,) = timer_events(r, news)
    assert event["after"] == {"status": "subscribed", "cats": ["receipts"]}
    assert events.verify_chain(r, 1, "p-1") is None


def test_a_start_for_the_whole_subscription_widens_a_category_timer_to_the_whole(app, r):
    news, promo, whole = category_contexts(app, r)
    first = arm(r, promo)
    assert arm(r, whole) == first and u.read_pending(r, promo)["scope"] == {"cats": None}
    assert arm(r, news) == first and u.read_pending(r, promo)["scope"] == {"cats": None}   # stays whole
    sleep_past(first)
    assert u.fire_timer(r, *news.key) is True and status_of(r, news) == Status.UNSUBSCRIBED


def test_a_firer_that_read_the_narrower_scope_does_not_apply_it_after_a_widening(app, r):
    """The widening changes armed_at, which scripts.FIRE_TIMERS compares: a settlement computed from the scope
    before it is refused ("changed") and the next read fires the widened scope."""
    news, promo, _whole = category_contexts(app, r)
    sleep_past(arm(r, news))
    db_id, profile_id, hash_id = news.key
    (row,) = scripts.claim_timers(r, [(keys.pending_unsubscribe(*news.key), keys.profile_subscriptions(
        db_id, profile_id), keys.profile_events(db_id, profile_id), hash_id)], "test", 0.0)
    item_keys, values, _has = u._settlement(r, db_id, profile_id, hash_id, row,
                                            {news.resource["id"]: news.resource}, "2026-01-01T00:00:00.000Z")
    assert arm(r, promo)["state"] == "pending"                         # due, not fired yet: still widened
    assert scripts.fire_timers(r, keys.pending_due(), keys.events_timeline(), [(item_keys, values)]) == ["changed"]
    assert cats_of(r, news) == [] and timer_events(r, news) == []
    assert u.fire_timer(r, *news.key) is True and cats_of(r, news) == ["news", "promo"]


def test_a_timer_of_a_resource_blocked_since_it_started_is_dropped_at_its_deadline_not_fired(app, r):
    """Nobody can unsubscribe from a blocked resource (one-click answers 403, the page shows only its text): a
    timer started before the block is settled without a change, and unblocking the resource does not bring
    it back."""
    (blocked,) = delayed_contexts(app, r, 1, timer_minutes=1)
    result = arm(r, blocked)
    update_resource(r, blocked.resource["id"], {"unsubscribe": {"mode": "blocked"}})
    sleep_past(result)
    assert u.fire_timers(r, [blocked.key]) == {blocked.key: "dropped"}
    assert status_of(r, blocked) == Status.SUBSCRIBED and timer_events(r, blocked) == []
    assert r.zcard(keys.pending_due()) == 0 and not r.keys("us:*:pending:*")
    assert events.verify_chain(r, 1, blocked.key[1]) is None
    update_resource(r, blocked.resource["id"], {"unsubscribe": {"mode": "delayed"}})
    assert delayed.sweep_once(r) == 0 and status_of(r, blocked) == Status.SUBSCRIBED
    assert u.cancel_timer(r, blocked) == "none"                        # its page: nothing was stopped


def test_a_resource_blocked_between_a_timers_claim_and_its_fire_drops_the_timer(app, r, api, monkeypatch):
    """The firer claims a timer and reads its resource (still delayed) before it writes: a block that comes in
    between wins, as the fire step itself (scripts.FIRE_TIMERS) looks at the resource's mode when it writes."""
    (ctx,) = delayed_contexts(app, r, 1, timer_minutes=1)
    sleep_past(arm(r, ctx))
    ledger = r.llen(keys.profile_events(1, ctx.key[1]))

    def block_then_fire(*a, **kw):  # claimed, and its settlement built from the resource as it was
        assert r.hget(keys.pending_unsubscribe(*ctx.key), "lease")
        api.ok("resources/update", id=ctx.resource["id"], unsubscribe={"mode": "blocked"})
        return real_fire(*a, **kw)

    real_fire = scripts.fire_timers
    monkeypatch.setattr(scripts, "fire_timers", block_then_fire)
    assert u.fire_timers(r, [ctx.key]) == {ctx.key: "dropped"}
    assert status_of(r, ctx) == Status.SUBSCRIBED and r.llen(keys.profile_events(1, ctx.key[1])) == ledger
    assert r.zcard(keys.pending_due()) == 0 and not r.exists(keys.pending_unsubscribe(*ctx.key))


def test_timer_of_a_deleted_subscription_or_resource(app, r):
    gone_sub, gone_res = delayed_contexts(app, r, 2, timer_minutes=1, category="news")
    arm(r, gone_sub)
    result = arm(r, gone_res)
    r.hdel(keys.profile_subscriptions(1, gone_sub.key[1]), gone_sub.key[2])
    delete_resource(r, gone_res.resource["id"])
    sleep_past(result)
    assert u.fire_timers(r, [gone_sub.key, gone_res.key]) == {gone_sub.key: "dropped", gone_res.key: "fired"}
    assert status_of(r, gone_res) == Status.UNSUBSCRIBED           # categories unknown: the whole subscription
    assert r.zcard(keys.pending_due()) == 0 and not r.keys("us:*:pending:*")


def test_timer_of_a_category_the_sender_deleted_stops_the_whole_subscription(app, r):
    """The link a timer was started from now stands for the whole subscription (its one-click would stop it),
    so its timer does too; a timer for several categories still stops those the resource kept."""
    news, news_and_promo = delayed_contexts(app, r, 2, timer_minutes=1, category="news", categories=THREE_CATS)
    arm(r, news)
    result = u.arm_timer(r, news_and_promo, {"cats": ["news", "promo"]}, UNIT)
    update_resource(r, news.resource["id"], {"delete_categories": ["news"]})
    sleep_past(result)
    assert u.fire_timers(r, [news.key, news_and_promo.key]) == {news.key: "fired", news_and_promo.key: "fired"}
    assert status_of(r, news) == Status.UNSUBSCRIBED
    assert [e["after"] for e in timer_events(r, news)] == [{"status": "unsubscribed", "cats": ["promo", "receipts"]}]
    assert status_of(r, news_and_promo) == Status.SUBSCRIBED
    assert [e["after"] for e in timer_events(r, news_and_promo)] == [{"status": "subscribed", "cats": ["receipts"]}]
    assert_fired_once(r, [news, news_and_promo])


def test_sweep_fires_in_batches_and_several_timers_of_one_profile(app, r):
    contexts = delayed_contexts(app, r, 30, timer_minutes=1)
    contexts += delayed_contexts(app, r, 1, timer_minutes=1, prefix="p")  # a 2nd subscription of profile p-0
    [arm(r, ctx) for ctx in contexts]
    wait_until(lambda: r.zcount(keys.pending_due(), "-inf", time.time() - 0.01) == len(contexts), 5)
    assert delayed.fire_due(r, limit=7) == len(contexts)
    assert_fired_once(r, contexts)
    assert len(events.list_events(r, 1, "p-0")[0]) == 4            # two api events, two timer events


def test_one_tick_job_per_deadline_second(app, r, redis_url):
    import redis as redis_py
    queue = delayed.timer_queue(redis_py.Redis.from_url(redis_url), "unsubscribe")
    contexts = delayed_contexts(app, r, 40, timer_minutes=1)
    results = [arm(r, ctx, unit=5, on_armed=lambda *key: delayed.schedule_timer(queue, *key)) for ctx in contexts]
    seconds = {int(-(-res["deadline"] // 1)) for res in results}
    registry = ScheduledJobRegistry(queue=queue)
    assert len(registry) == len(seconds) <= 2
    for job_id in registry.get_job_ids():
        job = queue.fetch_job(job_id)
        assert job.func_name == delayed.TICK_JOB and job.ttl is None and job.result_ttl == 0
        assert registry.get_expiration_time(job).timestamp() in seconds
    delayed.schedule_timer(queue, *contexts[0].key, results[0]["deadline"])  # scheduling again adds nothing
    assert len(registry) == len(seconds)


def test_a_failing_trigger_leaves_the_timer_armed(app, r, caplog):
    (ctx,) = delayed_contexts(app, r, 1, timer_minutes=1)

    def broken(*_key):
        raise ConnectionError("RQ unavailable")

    result = arm(r, ctx, on_armed=broken)
    assert result["state"] == "pending" and u.read_pending(r, ctx)
    assert "sweeper will fire it" in caplog.text
    sleep_past(result)
    assert delayed.sweep_once(r) == 1


def test_a_tick_in_a_sweeper_worker_only_backs_the_sweeper_up(app, r, job_env, monkeypatch):
    fresh, stale = delayed_contexts(app, r, 2, timer_minutes=1)
    arm(r, stale, unit=0.1)
    time.sleep(1.2)
    sleep_past(arm(r, fresh, unit=0.1))
    monkeypatch.setattr(delayed, "_sweeper_process", True)    # as in `python -m workers` (mark_sweeper_process)
    assert delayed.tick_grace() == delayed.TICK_GRACE
    assert jobs.fire_due_timers() == 1                        # only the one overdue by more than TICK_GRACE
    assert len(timer_events(r, stale)) == 1 and u.read_pending(r, fresh)
    monkeypatch.setattr(delayed, "_sweeper_process", False)   # a plain `rq worker`: the tick fires all that is due
    assert jobs.fire_due_timers() == 1
    assert_fired_once(r, [fresh, stale])


def break_ledger(r, ctx):
    """Make the profile's ledger unreadable: a key of the wrong type (a damaged entry in it is chained past)."""
    key = keys.profile_events(1, ctx.key[1])
    r.delete(key)
    r.set(key, "oops")


def test_a_broken_record_does_not_hold_up_the_other_timers(app, r, caplog, monkeypatch):
    bad_ledger, bad_subs, good = delayed_contexts(app, r, 3, timer_minutes=1)
    result = [arm(r, ctx) for ctx in (bad_ledger, bad_subs, good)][-1]
    break_ledger(r, bad_ledger)
    sleep_past(result)
    subs_key = keys.profile_subscriptions(1, bad_subs.key[1])
    saved = r.hgetall(subs_key)

    def break_subs_after_read(*a, **kw):  # the subscriptions key turns into a string between read and settle
        r.delete(subs_key)
        r.set(subs_key, "oops")
        return real_fire(*a, **kw)

    real_fire = scripts.fire_timers
    monkeypatch.setattr(scripts, "fire_timers", break_subs_after_read)
    codes = u.fire_timers(r, [bad_ledger.key, bad_subs.key, good.key])
    monkeypatch.setattr(scripts, "fire_timers", real_fire)
    assert codes == {bad_ledger.key: "broken", bad_subs.key: "broken", good.key: "fired"}
    assert "cannot be fired" in caplog.text
    for ctx in (bad_ledger, bad_subs):
        assert r.hdel(keys.pending_unsubscribe(*ctx.key), "lease") == 1     # as if its lease had run out
    assert u.fire_timers(r, [bad_subs.key]) == {bad_subs.key: "broken"}   # unreadable now in the read step too
    r.hdel(keys.pending_unsubscribe(*bad_subs.key), "lease")
    r.delete(subs_key)
    r.hset(subs_key, mapping=saved)
    assert u.fire_timer(r, *bad_subs.key) is True                           # repaired: fires
    assert u.read_pending(r, bad_ledger) and len(timer_events(r, good)) == 1


@pytest.mark.parametrize("damaged", DAMAGED_ENTRIES)
def test_a_timer_fires_after_a_damaged_newest_ledger_entry(app, r, damaged):
    """The delayed unsubscribe the person asked for is honoured whatever the ledger holds: its event is chained
    past the damaged entry; and a late Cancel reads back past a damaged entry to the timer's event."""
    (ctx,) = delayed_contexts(app, r, 1, timer_minutes=1, category="news")
    result = arm(r, ctx)
    key = damage_newest_entry(r, ctx.key[1], damaged)         # the subscription's creation (seq 1)
    sleep_past(result)
    assert u.fire_timers(r, [ctx.key]) == {ctx.key: "fired"}
    stored, raw = r.lrange(key, 0, -1)
    event = events.decode_event(raw)
    assert stored == damaged and event["method"] == "timer" and event["after"]["cats"] == ["receipts"]
    assert (event["seq"], event["prev_hash"]) == (2, chained_past(damaged))
    assert {"ref": f"1|{ctx.key[1]}|2", "rid": str(ctx.resource["id"]), "method": "timer"} in [
        fields for _id, fields in r.xrange(keys.events_timeline())]
    r.rpush(key, damaged)                                      # a damaged entry after the timer's event
    assert u.cancel_timer(r, ctx) == "unsubscribed"            # too late: the ledger says the timer stopped it


def test_a_full_batch_of_broken_records_does_not_hold_up_a_timer_due_after_them(app, r):
    """Broken timers stay pending at their deadline, first in every sweep: a sweep's whole batch of them would
    keep every later timer from firing. They go to the back, to be tried again later."""
    first, second, good = delayed_contexts(app, r, 3, timer_minutes=1)
    for ctx in (first, second):
        arm(r, ctx)
        break_ledger(r, ctx)
    sleep_past(arm(r, good))
    assert delayed.sweep_once(r, limit=2) == 0                                # the two broken ones: a full batch
    for ctx in (first, second):
        r.hdel(keys.pending_unsubscribe(*ctx.key), "lease")                    # as if their leases had run out
    assert delayed.sweep_once(r, limit=2) == 1 and status_of(r, good) == Status.UNSUBSCRIBED
    assert u.read_pending(r, first) and u.read_pending(r, second)             # still pending, to be repaired
    retry = r.zscore(keys.pending_due(), keys.pending_due_member(*first.key)) - u.server_time(r)
    assert u.BROKEN_RETRY_SECONDS - 5 < retry <= u.BROKEN_RETRY_SECONDS


@pytest.mark.parametrize("broken_key", ["profiles", "timeline"])
def test_a_key_a_fire_would_fail_to_write_is_found_before_any_write(app, r, caplog, broken_key):
    (ctx,) = delayed_contexts(app, r, 1, timer_minutes=1)
    sleep_past(arm(r, ctx))
    key = keys.db_profiles(1) if broken_key == "profiles" else keys.events_timeline()
    r.delete(key)
    r.set(key, "oops")
    before = app_state(r)
    assert u.fire_timers(r, [ctx.key]) == {ctx.key: "broken"}
    r.hdel(keys.pending_unsubscribe(*ctx.key), "lease")                         # the claim's own write
    due = keys.pending_due()
    assert r.zscore(due, keys.pending_due_member(*ctx.key)) > before[due][0][1]   # and its retry, later
    r.zadd(due, dict(before[due]))
    assert app_state(r) == before and status_of(r, ctx) == Status.SUBSCRIBED   # not a change without its event


def test_a_change_of_status_by_another_path_settles_the_timer(app, r):
    """Unsubscribed and subscribed again through the API while a timer waits: the timer must not unsubscribe the
    person again at its deadline. A change of categories or fields alone leaves it waiting."""
    waits, changed = delayed_contexts(app, r, 2, timer_minutes=1)
    result = [arm(r, ctx) for ctx in (waits, changed)][-1]
    for ctx, updates in ((waits, [{"custom_fields": {}}]), (changed, [{"status": "unsubscribed"},
                                                                     {"status": "subscribed"}])):
        ident = {"db_id": 1, "profile_id": ctx.key[1], "resource_id": ctx.resource["id"], "channel": "email",
                 "email": f"u{ctx.key[1][2:]}@example.com"}
        for update in updates:
            set_subscription(r, {**ident, **update})
    assert u.read_pending(r, waits) and not u.read_pending(r, changed)
    assert r.zscore(keys.pending_due(), keys.pending_due_member(*changed.key)) is None
    sleep_past(result)
    assert u.fire_timers(r, [waits.key, changed.key]) == {waits.key: "fired", changed.key: "gone"}
    assert status_of(r, changed) == Status.SUBSCRIBED and status_of(r, waits) == Status.UNSUBSCRIBED


def test_a_senders_pause_and_unpause_leave_the_timer_waiting(app, r):
    """Only a change that stops the subscription settles the timer; the person's unsubscribe still happens."""
    (ctx,) = delayed_contexts(app, r, 1, timer_minutes=1)
    result = arm(r, ctx, unit=0.5)
    ident = {"db_id": 1, "profile_id": ctx.key[1], "resource_id": ctx.resource["id"], "channel": "email",
             "email": "u0@example.com"}
    for status in ("suspended", "subscribed", "unconfirmed", "subscribed"):
        set_subscription(r, {**ident, "status": status})
    assert u.read_pending(r, ctx)
    sleep_past(result)
    assert u.fire_timer(r, *ctx.key) is True and status_of(r, ctx) == Status.UNSUBSCRIBED


def test_a_pause_that_ends_by_itself_leaves_the_timer_waiting(app, r):
    """A paused subscription can be stopped too; its pause ending during the timer is nobody's choice."""
    from webapp import preferences
    (ctx,) = delayed_contexts(app, r, 1, timer_minutes=1)
    preferences.suspend(r, 1, ctx.key[1], ctx.key[2], 14, 0.01)             # 14 "days" = 0.14 s
    result = arm(r, ctx, unit=0.5)
    assert result["state"] == "pending"
    time.sleep(0.2)
    assert preferences.resume_due_suspensions(r) == 1 and u.read_pending(r, ctx)
    sleep_past(result)
    assert u.fire_timer(r, *ctx.key) is True and status_of(r, ctx) == Status.UNSUBSCRIBED


def test_a_due_member_that_names_no_timer_is_removed_not_fatal(app, r, caplog):
    (ctx,) = delayed_contexts(app, r, 1, timer_minutes=1)
    result = arm(r, ctx)
    r.zadd(keys.pending_due(), {"no pipes here": 0, "x|p-1|h": 0})   # oldest first, so read before the real one
    sleep_past(result)
    assert delayed.sweep_once(r) == 1 and status_of(r, ctx) == Status.UNSUBSCRIBED
    assert r.zcard(keys.pending_due()) == 0 and "names no timer; removed" in caplog.text


def test_a_claimed_timer_is_left_to_its_claimer_until_the_lease_runs_out(app, r):
    (ctx,) = delayed_contexts(app, r, 1, timer_minutes=1)
    sleep_past(arm(r, ctx))
    pending_key = keys.pending_unsubscribe(*ctx.key)
    item = [(pending_key, keys.profile_subscriptions(1, ctx.key[1]), keys.profile_events(1, ctx.key[1]), ctx.key[2])]
    (row,) = scripts.claim_timers(r, item, "another-firer", u.FIRE_LEASE)  # e.g. a sweeper that then died
    assert len(row) == 9 and r.hget(pending_key, "lease").endswith("|another-firer")
    assert u.fire_timers(r, [ctx.key]) == {ctx.key: "leased"}
    assert scripts.claim_timers(r, item, "another-firer", u.FIRE_LEASE)[0] == row  # its claimer may read again
    later = time.time() + u.FIRE_LEASE + 0.01
    assert u.fire_timer(r, *ctx.key, now=later) is True                     # the lease ran out
    assert_fired_once(r, [ctx])


def test_scheduler_lock_watch_releases_only_a_lock_nobody_refreshes(r):
    live, dead = "rq:scheduler-lock:live", "rq:scheduler-lock:dead"
    r.set(live, "scheduler-a", ex=61)
    r.set(dead, "scheduler-b", ex=61)
    watch = delayed.SchedulerLockWatch(["live", "dead"], stale=0.6)
    assert watch.check(r) == []
    released = []
    for _ in range(4):
        time.sleep(0.3)
        r.expire(live, 61)                                         # what a live RQ scheduler does every second
        released += watch.check(r)
    assert released == ["dead"]
    assert r.get(live) == "scheduler-a" and not r.exists(dead)
    r.set(dead, "scheduler-c", ex=61)                              # a new holder starts a new watch
    assert watch.check(r) == [] and r.get(dead) == "scheduler-c"


def test_no_setting_makes_a_timer_longer_than_thirty_minutes(app, r):
    """Altcraft's timer is at most 30 minutes. TIME_UNIT_SECONDS exists to shorten timers in tests: a "minute"
    longer than 60 s (a typo, or seconds taken for minutes) would keep a person's unsubscribe waiting for hours,
    so the start refuses it; and a timer is never armed for longer than 30 real minutes, whatever it is given."""
    from webapp.config import ConfigError, load_settings
    base = {"API_TOKEN": "t" * 16, "SIGNING_KEYS": "k1:" + "s" * 16}
    for unit in ("61", "120", "3600"):
        with pytest.raises(ConfigError, match="^TIME_UNIT_SECONDS "):
            load_settings({**base, "TIME_UNIT_SECONDS": unit}, dotenv_path="/nonexistent")
    assert load_settings({**base, "TIME_UNIT_SECONDS": "60"}, dotenv_path="/nonexistent")["TIME_UNIT_SECONDS"] == 60
    (ctx,) = delayed_contexts(app, r, 1, timer_minutes=30)
    result = arm(r, ctx, unit=3600)                                   # 30 "minutes" of an hour each
    assert result["deadline"] <= u.server_time(r) + 30 * 60


def test_a_category_stopped_and_then_resumed_in_the_manager_or_the_api_is_not_stopped_again_by_the_timer(app, r):
    """A timer for News waits; meanwhile the person switches News off in the manager (or the sender drops it
    through the API's `cats`), which leaves the timer nothing to stop, and then switches it back on. The timer
    must not stop News again at its deadline: as for a status change by another path, the latest choice holds.
    A timer that still has something to stop (the whole subscription, while only News went off) waits on."""
    from webapp import preferences
    manager, api_cats, whole = delayed_contexts(app, r, 3, timer_minutes=1, category="news", categories=THREE_CATS)
    whole = message_context(app, r, whole, None)
    result = [arm(r, ctx) for ctx in (manager, api_cats, whole)][-1]
    all_cats = [c["api_name"] for c in THREE_CATS]
    for ctx in (manager, whole):
        preferences.save_preferences(r, 1, ctx.key[1], ctx.key[2], ["promo", "receipts"], {})   # News off
    ident = {"db_id": 1, "profile_id": api_cats.key[1], "resource_id": api_cats.resource["id"], "channel": "email",
             "email": "u1@example.com"}
    set_subscription(r, {**ident, "cats": ["promo", "receipts"]})
    assert not u.read_pending(r, manager) and not u.read_pending(r, api_cats)    # nothing left for them to stop
    assert u.read_pending(r, whole)
    preferences.save_preferences(r, 1, manager.key[1], manager.key[2], all_cats, {})          # News on again
    set_subscription(r, {**ident, "cats": all_cats})
    sleep_past(result)
    assert u.fire_timers(r, [manager.key, api_cats.key, whole.key]) == {
        manager.key: "gone", api_cats.key: "gone", whole.key: "fired"}
    assert subscribed(r, manager) == ("subscribed", all_cats) and timer_events(r, manager) == []
    assert subscribed(r, api_cats) == ("subscribed", all_cats) and timer_events(r, api_cats) == []
    assert subscribed(r, whole)[0] == "unsubscribed"
    for ctx in (manager, api_cats, whole):
        assert events.verify_chain(r, 1, ctx.key[1]) is None


def test_a_cancel_after_a_category_timer_fired_says_unsubscribed_though_other_events_followed(app, r):
    """A News timer fired (the subscription stays subscribed to the rest), then the sender's API changed
    something else of the same subscription (its Promo box), and many changes of another subscription of the
    profile came after: the Cancel clicked on the News page still came too late. The answer is the timer's own
    event, found behind the later ones, not the ledger's last event of the subscription."""
    news, promo, _whole = category_contexts(app, r)
    sleep_past(arm(r, news))
    assert u.fire_timer(r, *news.key) is True
    ident = {"db_id": 1, "profile_id": "p-1", "resource_id": news.resource["id"], "channel": "email",
             "email": "ann@example.com"}
    set_subscription(r, {**ident, "cats": ["receipts"]})                    # the API stops Promo too
    assert u.cancel_timer(r, news) == "unsubscribed"
    other = {**ident, "email": "bob@example.com"}
    for i in range(60):                                                    # more than a ledger page behind
        set_subscription(r, {**other, "status": "unsubscribed" if i % 2 == 0 else "subscribed"})
    assert u.cancel_timer(r, news) == "unsubscribed"
    assert u.cancel_timer(r, promo) == "none"                   # Promo was stopped by the API, not by a timer
    set_subscription(r, {**ident, "cats": ["news", "receipts"]})             # News back on: nothing was stopped
    assert u.cancel_timer(r, news) == "none"
    assert events.verify_chain(r, 1, "p-1") is None


def test_a_cancel_through_the_sdk_after_a_category_timer_fired_and_another_change_resolves_unsubscribed(
        app, r, client, api):
    news, _promo, _whole = category_contexts(app, r)
    body = client.post(f"/sdk/v1/{news.resource['id']}/unsubscribe", json={"smid": news.token, "action": "show"},
                       headers={"Origin": "https://shop.example"}).get_json()
    assert body["result"] == "pending"
    assert wait_until(lambda: u.fire_timer(r, *news.key), 5)        # a 1 s timer (TIME_UNIT_SECONDS=1)
    api.ok("subscriptions/set", db_id=1, profile_id="p-1", resource_id=news.resource["id"], channel="email",
           email="ann@example.com", cats=["receipts"])
    body = client.post(f"/sdk/v1/{news.resource['id']}/unsubscribe", json={"smid": news.token, "action": "cancel"},
                       headers={"Origin": "https://shop.example"}).get_json()
    assert (body["result"], body["status"]) == ("unsubscribed", "subscribed")
