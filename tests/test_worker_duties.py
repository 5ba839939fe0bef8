"""What real `python -m workers` processes do besides timers: webhook and call-URL delivery (with a worker
killed mid-delivery) and the end of suspensions (across a worker restart)."""
import json
import os
import time

import pytest

from conftest import email_resource, form_token
from test_delayed_support import wait_until, workers  # noqa: F401  (fixture)
from test_webhooks import call_url_resource, one_click
from webapp import keys, webhooks

SECRET = "s3cret-webhook-key-123"


def set_up(api, receiver, **resource_kw):
    res = api.ok("resources/add", **email_resource(**resource_kw))
    ident = {"db_id": 1, "profile_id": "p-42", "resource_id": res["id"], "channel": "email",
             "email": "ann@example.com"}
    return res, ident


def test_worker_delivers_webhooks_and_retries_after_500s(api, r, receiver, workers):  # noqa: F811
    hook = api.ok("webhooks/add", url=receiver.url, secret=SECRET)
    _res, ident = set_up(api, receiver)
    receiver.behaviours = [500, 503]
    api.ok("subscriptions/set", **ident)
    api.ok("subscriptions/set", **ident, status="unsubscribed")
    workers.start()
    requests = receiver.wait_for(4, timeout=20)         # 500, 503, then both events
    ids = [req["headers"]["X-Webhook-Id"] for req in requests]
    assert ids[0] == ids[1] == ids[2] and ids[3] != ids[0]
    assert requests[2]["at"] - requests[1]["at"] >= 1.5   # backoff doubled: 1 s, then 2 s
    wait_until(lambda: webhooks.target_state(r, webhooks.group_name(hook["id"]))["backlog"] == 0, 10)
    log = workers.log(0)
    # The worker's log says what it does, not its routine maintenance (RQ logs each run, every 5 s here).
    assert "Listening on" in log and "registries" not in log, log


def delivered_in_order(api, profiles):
    """The ids of the events of `profiles` (one db, created in this order), in the order they were created."""
    return [e["id"] for p in profiles for e in api.ok("events/list", db_id=1, profile_id=p)[::-1]]


def test_a_slow_target_does_not_hold_up_the_others(api, r, workers):  # noqa: F811
    """Delivery jobs share one queue: a slow (but successful) target's job spends its budget and queues its next
    one behind the other targets' jobs, so a fast target is not kept waiting for the slow one's backlog.
    The slow job holds the only worker before the fast target has any work: the fast target's job can only come
    in between if the slow one stops at its budget (without one it would wait for ~9 more 1-second answers)."""
    from receiver import Receiver
    from test_webhooks import change
    res_a = api.ok("resources/add", **email_resource(name="A"))
    res_b = api.ok("resources/add", **email_resource(name="B"))
    slow, fast = Receiver(), Receiver()
    try:
        slow.behaviours = [("sleep", 1.0, 200)] * 10           # answers 200, within the 5 s timeout, in 1 s
        api.ok("webhooks/add", url=slow.url, secret=SECRET, resource_id=res_a["id"])
        api.ok("webhooks/add", url=fast.url, secret=SECRET, resource_id=res_b["id"])
        for i in range(5):
            change(api, res_a, profile_id=f"a-{i}")              # 10 events for the slow target
        workers.start()
        assert slow.in_flight.wait(20)                           # its job now holds the only worker
        started = time.time()
        for i in range(5):
            change(api, res_b, profile_id=f"b-{i}")              # 10 events for the fast target, only now
        fast.wait_for(10, timeout=30)
        assert time.time() - started < 4, "the fast target waited for the slow one's ten 1-second answers"
        assert len(slow.requests) < 10                           # it did come in between
        slow.wait_for(10, timeout=30)                            # and the slow one gets all of its events
        time.sleep(0.5)                                          # (and nothing more)
        assert [json.loads(req["body"])["id"] for req in slow.requests] == delivered_in_order(
            api, [f"a-{i}" for i in range(5)])                   # each once, in order
        assert [json.loads(req["body"])["id"] for req in fast.requests] == delivered_in_order(
            api, [f"b-{i}" for i in range(5)])
    finally:
        slow.close()
        fast.close()


def test_a_delivery_job_that_spends_its_budget_queues_the_next_behind_the_others(api, r, resource, receiver,
                                                                                 redis_url, tmp_path, monkeypatch):
    """workers.jobs.deliver_target run as a real RQ job (a SimpleWorker, in this process), with nothing else to
    dispatch: no Housekeeper thread, and its mark set so that no chain of housekeeping ticks starts either. A job
    that stops at its budget with events left enqueues the target's next job itself, behind the job of the other
    target already queued, and that job delivers the rest."""
    import redis as redis_lib
    from rq import SimpleWorker
    from rq.serializers import JSONSerializer
    from conftest import API_TOKEN, SIGNING_KEYS
    from receiver import Receiver
    from test_webhooks import change
    from webapp import keys
    from webapp.delayed import HousekeepingRearm, timer_queue
    from workers import jobs
    from workers.housekeeping import DELIVERY_JOB, enqueue_delivery
    for name, value in {"REDIS_URL": redis_url, "API_TOKEN": API_TOKEN, "SIGNING_KEYS": SIGNING_KEYS,
                        "VAR_DIR": str(tmp_path), "WEBHOOK_TIMEOUT_SECONDS": "5"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(jobs, "_client", None)             # this test's Redis and settings, read by the job
    monkeypatch.setattr(jobs, "_loaded_settings", None)
    monkeypatch.setattr(jobs, "DELIVERY_BUDGET_EVENTS", 3)   # smaller than the busy target's 6 events
    monkeypatch.setattr(jobs, "DELIVERY_BUDGET_SECONDS", 60.0)   # (and no time limit to race against)
    raw = redis_lib.Redis.from_url(redis_url)
    queue = timer_queue(raw, "unsubscribe")
    # An earlier test's app in this process may still have its re-arm thread looking at this Redis: stopped
    # (a look that began before this test's flush can schedule a tick after it), and any tick it left removed.
    with HousekeepingRearm.lock:
        HousekeepingRearm.apps.clear()
    HousekeepingRearm.wake.set()
    if HousekeepingRearm.current is not None:
        HousekeepingRearm.current.join(10)
    for job_id in queue.scheduled_job_registry.get_job_ids():
        queue.scheduled_job_registry.remove(job_id, delete_job=True)
    r.set(keys.housekeeping_alive(), "thread", ex=600)        # nobody else dispatches
    other = Receiver()
    try:
        busy_group = webhooks.group_name(api.ok("webhooks/add", url=receiver.url, secret=SECRET)["id"])
        other_group = webhooks.group_name(api.ok("webhooks/add", url=other.url, secret=SECRET)["id"])
        for i in range(3):
            change(api, resource, profile_id=f"p-{i}")        # 6 events for each target
        assert enqueue_delivery(r, queue, busy_group) and enqueue_delivery(r, queue, other_group)
        worker = SimpleWorker([queue], connection=raw, serializer=JSONSerializer)
        worker.work(burst=True, max_jobs=1)                   # the busy target's job: 3 events, then its budget
        assert len(receiver.requests) == 3 and other.requests == []
        assert [(job.func_name, job.args) for job in queue.get_jobs()] == [
            (DELIVERY_JOB, [other_group]), (DELIVERY_JOB, [busy_group])]   # its next job behind the other's
        assert queue.scheduled_job_registry.get_job_ids() == []           # and no housekeeping tick
        worker.work(burst=True)                               # the other target's job, then the busy one's
        assert len(queue) == 0
        expected = delivered_in_order(api, [f"p-{i}" for i in range(3)])
        assert [json.loads(req["body"])["id"] for req in receiver.requests] == expected   # each once, in order
        assert [json.loads(req["body"])["id"] for req in other.requests] == expected
        assert webhooks.target_state(r, busy_group)["backlog"] == 0
        assert webhooks.target_state(r, other_group)["backlog"] == 0
    finally:
        other.close()
        if jobs._client is not None:
            jobs._client.close()
        raw.close()


def test_no_event_lost_when_the_worker_dies_mid_delivery(api, r, receiver, workers):  # noqa: F811
    hook = api.ok("webhooks/add", url=receiver.url, secret=SECRET)
    _res, ident = set_up(api, receiver)
    receiver.behaviours = [("sleep", 30, 200)]            # the first delivery hangs...
    api.ok("subscriptions/set", **ident)
    api.ok("subscriptions/set", **ident, status="unsubscribed")
    first = workers.start(WEBHOOK_TIMEOUT_SECONDS="2")
    assert receiver.in_flight.wait(20)
    workers.kill(first)                                  # ...and its worker is killed mid-delivery
    workers.start(WEBHOOK_TIMEOUT_SECONDS="2")
    wait_until(lambda: webhooks.target_state(r, webhooks.group_name(hook["id"]))["backlog"] == 0, 30)
    delivered = [json.loads(req["body"])["id"] for req in receiver.requests]
    event_ids = [e["id"] for e in api.ok("events/list", db_id=1, profile_id="p-42")][::-1]
    assert set(delivered) == set(event_ids) and delivered[0] == delivered[1] == event_ids[0]


def test_worker_calls_the_call_url_after_one_click(api, client, r, receiver, workers):  # noqa: F811
    res, ident = set_up(api, receiver, unsubscribe={"mode": "confirm",
                                                    "list_unsubscribe": {"enabled": True, "called_url": receiver.url}})
    api.ok("subscriptions/set", **ident)
    links = api.ok("messages/links", **ident)
    workers.start()
    assert client.post(links["unsubscribe_url"].removeprefix("https://unsub.example"),
                       data={"List-Unsubscribe": "One-Click"}).status_code == 200
    (call,) = receiver.wait_for(1)
    body = json.loads(call["body"])
    assert body["smid"] == links["smid"] and body["result"] == "unsubscribed"


def test_suspension_ends_even_after_a_worker_restart(api, app, client, r, workers):  # noqa: F811
    app.config["SUSPEND_DAY_SECONDS"] = 0.25             # 14 "days" = 3.5 s
    res = api.ok("resources/add", **email_resource())
    ident = {"db_id": 1, "profile_id": "p-42", "resource_id": res["id"], "channel": "email",
             "email": "ann@example.com"}
    api.ok("subscriptions/set", **ident)
    path = api.ok("messages/links", **ident)["manage_url"].removeprefix("https://unsub.example")
    html = client.get(path).get_data(as_text=True)
    token = form_token(html)
    sub = api.ok("subscriptions/get", **ident)
    client.post(path, data={"csrf_token": token, "action": "suspend", "hash_id": sub["hash_id"], "days": "14"})
    assert api.ok("subscriptions/get", **ident)["status"] == "suspended"
    first = workers.start()
    workers.kill(first)                                  # the only worker dies before the end...
    until = api.ok("subscriptions/get", **ident)["suspended_until"]
    import time
    from datetime import datetime
    end = datetime.fromisoformat(until.replace("Z", "+00:00")).timestamp()
    time.sleep(max(0, end - time.time()) + 0.5)
    assert api.ok("subscriptions/get", **ident)["status"] == "suspended"
    workers.start()                                      # ...and a new one resumes it at once
    wait_until(lambda: api.ok("subscriptions/get", **ident)["status"] == "subscribed", 5)
    assert api.ok("events/list", db_id=1, profile_id="p-42")[0]["method"] == "suspend_expiry"


def plain_rq_worker(redis_url):
    """Contract §1: production may run `rq worker --with-scheduler` instead of `python -m workers`."""
    import os
    import sys
    return [os.path.join(os.path.dirname(sys.executable), "rq"), "worker", "--with-scheduler",
            "-S", "rq.serializers.JSONSerializer", "-u", redis_url, "unsubscribe"]


def test_a_plain_rq_worker_delivers_webhooks_and_the_call_url(api, client, r, receiver, workers,  # noqa: F811
                                                             redis_url):
    """No Housekeeper thread there: a chain of RQ housekeeping ticks, started by webhooks/add (and a call URL),
    dispatches the deliveries, retries after backoff included. The call URL has a receiver of its own: the
    two targets' jobs run in either order, and the webhook's first answer must be the 500."""
    from receiver import Receiver
    called = Receiver()
    try:
        workers.start(plain_rq_worker(redis_url))
        hook = api.ok("webhooks/add", url=receiver.url, secret=SECRET)
        res, ident = set_up(api, receiver, unsubscribe={"mode": "confirm", "list_unsubscribe": {
            "enabled": True, "called_url": called.url}})
        receiver.behaviours = [500]
        api.ok("subscriptions/set", **ident)
        links = api.ok("messages/links", **ident)
        assert client.post(links["unsubscribe_url"].removeprefix("https://unsub.example"),
                           data={"List-Unsubscribe": "One-Click"}).status_code == 200
        wait_until(lambda: webhooks.target_state(r, webhooks.group_name(hook["id"]))["backlog"] == 0, 20)
        wait_until(lambda: webhooks.target_state(r, webhooks.call_url_group(res["id"]))["backlog"] == 0, 20)
        hook_requests = receiver.requests
        assert [b["method"] for b in receiver.bodies()] == ["api", "api", "one_click"]   # after a 500, retried
        assert [req["answered"] for req in hook_requests] == [500, 200, 200]             # the 500 was answered
        assert (hook_requests[1]["headers"]["X-Webhook-Id"] == hook_requests[0]["headers"]["X-Webhook-Id"]
                == json.loads(hook_requests[0]["body"])["id"])   # and the same event is sent again after it
        assert [b["smid"] for b in called.bodies()] == [links["smid"]]                   # the call URL, once
    finally:
        called.close()


def test_a_plain_rq_worker_ends_a_pause(api, app, client, r, workers, redis_url):  # noqa: F811
    """The pause's end, like a webhook's dispatch, is housekeeping: the manager's suspend starts the ticks."""
    app.config["SUSPEND_DAY_SECONDS"] = 0.25             # 14 "days" = 3.5 s
    res = api.ok("resources/add", **email_resource())
    ident = {"db_id": 1, "profile_id": "p-42", "resource_id": res["id"], "channel": "email",
             "email": "ann@example.com"}
    api.ok("subscriptions/set", **ident)
    workers.start(plain_rq_worker(redis_url))
    path = api.ok("messages/links", **ident)["manage_url"].removeprefix("https://unsub.example")
    token = form_token(client.get(path).get_data(as_text=True))
    sub = api.ok("subscriptions/get", **ident)
    client.post(path, data={"csrf_token": token, "action": "suspend", "hash_id": sub["hash_id"], "days": "14"})
    assert api.ok("subscriptions/get", **ident)["status"] == "suspended"
    wait_until(lambda: api.ok("subscriptions/get", **ident)["status"] == "subscribed", 10)
    assert api.ok("events/list", db_id=1, profile_id="p-42")[0]["method"] == "suspend_expiry"


def test_housekeeping_ticks_run_only_while_needed(api, r, resource, receiver, redis_url):
    """A Housekeeper thread's mark keeps ticks from starting; a chain of ticks stops when nothing is left to
    watch (no pause, no delivery target), and the next piece of work starts it again."""
    import redis as redis_lib
    from webapp import keys
    from webapp.delayed import ensure_housekeeping, timer_queue
    from workers.housekeeping import housekeeping_tick
    raw = redis_lib.Redis.from_url(redis_url)
    queue = timer_queue(raw, "unsubscribe")
    r.set(keys.housekeeping_alive(), "thread", ex=10)
    assert ensure_housekeeping(r, queue) is False and queue.scheduled_job_registry.get_job_ids() == []
    r.delete(keys.housekeeping_alive())
    assert ensure_housekeeping(r, queue) is True and ensure_housekeeping(r, queue) is False   # one chain
    (first,) = queue.scheduled_job_registry.get_job_ids()
    assert first.startswith("housekeeping-unsubscribe-")
    assert housekeeping_tick(r, queue, now=2000.0) is None          # nothing to watch: the chain ends
    assert not r.exists(keys.housekeeping_alive())
    api.ok("webhooks/add", url=receiver.url, secret=SECRET)        # work again: a new chain
    assert r.get(keys.housekeeping_alive()) == "chain"
    assert housekeeping_tick(r, queue, now=2000.0) == 2001                   # and it goes on
    assert "housekeeping-unsubscribe-2001" in queue.scheduled_job_registry.get_job_ids()
    # A tick that cannot tell whether there is work (a key of the wrong type here; a Redis error) goes on.
    r.set(keys.suspensions_due(), "not a sorted set")
    assert housekeeping_tick(r, queue, now=2001.0) == 2002
    assert "housekeeping-unsubscribe-2002" in queue.scheduled_job_registry.get_job_ids()
    # A tick released before this host's clock reached its second (the scheduler's clock is ahead): the next
    # comes after it, not at this host's next second (the running tick's own id: nothing was scheduled).
    assert housekeeping_tick(r, queue, now=2001.5, running=2002) == 2003
    assert "housekeeping-unsubscribe-2003" in queue.scheduled_job_registry.get_job_ids()
    raw.close()


def test_a_pause_restored_by_undo_ends_under_a_plain_rq_worker(api, app, client, r, workers,  # noqa: F811
                                                                redis_url):
    """Every manager action that leaves a subscription paused makes sure housekeeping runs: an Undo that
    brings a pause back, after the chain of ticks had ended with nothing left to watch, starts it again."""
    from webapp import keys
    app.config["SUSPEND_DAY_SECONDS"] = 0.3               # 14 "days" = 4.2 s
    _res, ident = set_up(api, None)
    api.ok("subscriptions/set", **ident)
    workers.start(plain_rq_worker(redis_url))
    path = api.ok("messages/links", **ident)["manage_url"].removeprefix("https://unsub.example")
    hash_id = api.ok("subscriptions/get", **ident)["hash_id"]

    def post(action, **extra):
        token = form_token(client.get(path).get_data(as_text=True))
        resp = client.post(path, data={"csrf_token": token, "action": action, "hash_id": hash_id, **extra})
        assert resp.status_code == 303, resp.get_data(as_text=True)

    post("suspend", days="14")                            # starts the chain
    post("resume")                                        # nothing left to watch: the chain ends
    wait_until(lambda: not housekeeping_jobs(r) and not r.exists(keys.housekeeping_alive()), 5)
    post("undo")                                          # the pause is back
    assert api.ok("subscriptions/get", **ident)["status"] == "suspended"
    assert r.get(keys.housekeeping_alive()) == "chain" and housekeeping_jobs(r)   # and the chain with it
    wait_until(lambda: api.ok("subscriptions/get", **ident)["status"] == "subscribed", 10)
    assert api.ok("events/list", db_id=1, profile_id="p-42")[0]["method"] == "suspend_expiry"


def housekeeping_jobs(r):
    """The housekeeping ticks waiting to run: scheduled, or queued (a chain that goes on has one)."""
    scheduled = [j for j in r.zrange("rq:scheduled:unsubscribe", 0, -1) if j.startswith("housekeeping-")]
    queued = [j for j in r.lrange("rq:queue:unsubscribe", 0, -1) if j.startswith("housekeeping-")]
    return scheduled + queued


def test_the_tick_chain_goes_on_through_a_python_m_workers_process(api, r, receiver, workers,  # noqa: F811
                                                                    redis_url):
    """Mixed deployments: a tick that lands on a `python -m workers` process schedules its successor too (that
    process's Housekeeper does the duties meanwhile), so the chain outlives the process, and a plain worker
    delivers again as soon as it has left (its Housekeeper takes its mark back on a clean stop)."""
    from webapp import keys
    _res, ident = set_up(api, receiver)
    plain = workers.start(plain_rq_worker(redis_url))
    api.ok("webhooks/add", url=receiver.url, secret=SECRET)          # starts the chain
    api.ok("subscriptions/set", **ident)
    receiver.wait_for(1, timeout=15)
    plain.terminate()                                               # the plain worker is replaced by a
    plain.wait(timeout=30)                                          # `python -m workers` process: ticks
    joined = workers.start()                                        # land on it alone
    time.sleep(3)                      # (a tick that has just started may not have scheduled its successor yet)
    wait_until(lambda: housekeeping_jobs(r), 2)             # a tick run there did not end the chain
    joined.terminate()                                              # it leaves too (a clean stop)
    joined.wait(timeout=30)
    assert r.get(keys.housekeeping_alive()) != "thread"
    workers.start(plain_rq_worker(redis_url))                       # a plain worker again
    api.ok("subscriptions/set", **ident, status="unsubscribed")
    receiver.wait_for(2, timeout=8)
    assert json.loads(receiver.requests[-1]["body"])["after"]["status"] == "unsubscribed"


def test_a_chain_mark_with_no_tick_waiting_is_stale(r, redis_url):
    """A "chain" mark whose chain died (its tick abandoned by a killed worker, or lost by a Redis restart) does
    not keep ensure_housekeeping from starting a new chain; a live chain's does."""
    import redis as redis_lib
    from webapp import keys
    from webapp.delayed import ensure_housekeeping, timer_queue
    raw = redis_lib.Redis.from_url(redis_url)
    queue = timer_queue(raw, "unsubscribe")
    r.set(keys.housekeeping_alive(), "chain", ex=10)                 # no tick scheduled or queued
    assert ensure_housekeeping(r, queue) is True
    assert housekeeping_jobs(r) and ensure_housekeeping(r, queue) is False
    # A tick a worker took off the queue and died with: its job still says "queued", but it is nowhere to run.
    (tick,) = housekeeping_jobs(r)
    r.zrem(queue.scheduled_job_registry.key, tick)
    r.hset(f"rq:job:{tick}", "status", "queued")
    assert ensure_housekeeping(r, queue) is True
    raw.close()


def test_the_tick_chain_is_rearmed_after_a_redis_crash(tmp_path):
    """Redis killed and restarted from its AOF (contract §1) under a plain `rq worker`: the tick it was running
    is abandoned and its "chain" mark may survive; each web process looks every HOUSEKEEPING_REARM_SECONDS and
    starts the chain again, so events are delivered with no new webhook, call URL or pause to start it."""
    import os
    import shutil

    import redis as redis_lib
    from conftest import API_TOKEN, SIGNING_KEYS, ApiActions, close_clients, start_redis_server
    from rq.scheduler import RQScheduler
    from receiver import Receiver
    from test_delayed_support import WorkerProcesses

    from webapp import create_app
    workdir = str(tmp_path / "redis")
    os.makedirs(workdir)
    proc, url = start_redis_server(workdir, appendonly=True)
    procs = WorkerProcesses(url, tmp_path)
    r = redis_lib.Redis.from_url(url, decode_responses=True)
    receiver = Receiver()
    app = create_app({"TESTING": True, "REDIS_URL": url, "API_TOKEN": API_TOKEN, "SIGNING_KEYS": SIGNING_KEYS,
                      "PUBLIC_BASE_URL": "https://unsub.example", "VAR_DIR": str(tmp_path),
                      "HOUSEKEEPING_REARM_SECONDS": 0.5})
    try:
        api = ApiActions(app.test_client())
        _res, ident = set_up(api, receiver)
        procs.start(plain_rq_worker(url))
        api.ok("webhooks/add", url=receiver.url, secret=SECRET)
        api.ok("subscriptions/set", **ident)
        receiver.wait_for(1, timeout=15)
        time.sleep(1.5)                                          # the AOF has the chain's state
        proc.kill()                                              # a crash
        proc.wait(timeout=10)
        proc, _url = start_redis_server(workdir, appendonly=True)
        procs.close()                                            # the plain worker quit on the outage (or
        # is killed here); its supervisor restarts it. RQ's scheduler lock, if the AOF kept the dead worker's,
        # holds the new one's scheduler back until it expires (61 s; RQ's own limit, not this test's subject):
        # let it expire now.
        r.delete(RQScheduler.get_locking_key("unsubscribe"))
        procs.start(plain_rq_worker(url))
        wait_until(lambda: housekeeping_jobs(r), 5)              # the chain is back
        api.ok("subscriptions/set", **ident, status="unsubscribed")
        receiver.wait_for(2, timeout=15)
        assert json.loads(receiver.requests[-1]["body"])["after"]["status"] == "unsubscribed"
    finally:
        receiver.close()
        close_clients(app)
        r.close()
        procs.close()
        proc.kill()
        proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def test_broken_data_holds_up_no_other_duty(api, app, r, receiver, workers):  # noqa: F811
    """A due suspension whose record cannot be read (and a member that names none) come first in the index;
    the worker logs them once and goes on: a real suspension still ends and webhooks are still delivered."""
    from webapp import keys, preferences
    hook = api.ok("webhooks/add", url=receiver.url, secret=SECRET)
    _res, ident = set_up(api, receiver)
    sub = api.ok("subscriptions/set", **ident)
    preferences.suspend(r, 1, "p-42", sub["hash_id"], 14, 0.01)      # 14 "days" = 0.14 s
    r.hset(keys.profile_subscriptions(1, "p-broken"), "h1", "not json")
    r.zadd(keys.suspensions_due(), {"1|p-broken|h1": 0, "not a member": 0})
    workers.start()
    wait_until(lambda: api.ok("subscriptions/get", **ident)["status"] == "subscribed", 10)
    wait_until(lambda: webhooks.target_state(r, webhooks.group_name(hook["id"]))["backlog"] == 0, 10)
    assert [b["method"] for b in receiver.bodies()] == ["api", "manager", "suspend_expiry"]
    assert r.zscore(keys.suspensions_due(), "1|p-broken|h1") == 0          # left for a person to look at
    assert workers.log(0).count("cannot be resumed, its data is broken") == 2   # once each, not every pass


def test_a_failing_duty_holds_up_no_other(api, app, r, receiver, workers):  # noqa: F811
    """The suspension index holding a key of the wrong type makes every pass of that duty fail; webhooks are
    still delivered, and the failure is logged once, not every half second."""
    from webapp import keys
    hook = api.ok("webhooks/add", url=receiver.url, secret=SECRET)
    _res, ident = set_up(api, receiver)
    api.ok("subscriptions/set", **ident)
    r.set(keys.suspensions_due(), "not a sorted set")
    workers.start()
    wait_until(lambda: webhooks.target_state(r, webhooks.group_name(hook["id"]))["backlog"] == 0, 10)
    assert [b["method"] for b in receiver.bodies()] == ["api"]
    assert workers.log(0).count("housekeeping failed resuming suspensions") == 1


def test_worker_warns_about_redis_settings_that_cost_memory_or_data(r, workers):  # noqa: F811
    """The test Redis runs with redis-server's defaults for both (listpack values up to 64 bytes, no AOF);
    `python -m webapp run` sets both, so that start-up says nothing."""
    from webapp.store import settings_advice
    assert r.config_get("hash-max-listpack-value")["hash-max-listpack-value"] == "64"
    workers.start()
    log = workers.log(0)
    assert "hash-max-listpack-value is 64: set it to 512" in log and "appendonly is off" in log
    r.config_set("hash-max-listpack-value", 512)
    r.config_set("appendonly", "yes")
    try:
        assert settings_advice(r) == []
    finally:
        r.config_set("appendonly", "no")
        r.config_set("hash-max-listpack-value", 64)


DOWN = "http://127.0.0.1:9/down"                          # nothing listens there: every call is refused


def call_url_failures(r):
    """The failures recorded for any call-URL target, whatever its group is called."""
    from webapp import keys
    return sum(int(r.hget(key, "failures") or 0) for key in r.scan_iter(keys.delivery_state("called_url*"))
               if r.type(key) == "hash")                 # not the targets' lock and queued markers


def test_a_call_url_that_is_down_does_not_delay_another_resources_call(api, client, r, receiver,  # noqa: F811
                                                                      workers):
    """Resource A's call URL refuses every call; resource B's answers. Each call URL is its own delivery target,
    with its own backoff: B's call goes out at once while A keeps failing, and resources/get shows each one's
    delivery state as webhooks/list shows a webhook's."""
    res_a, res_b = call_url_resource(api, DOWN, "A"), call_url_resource(api, receiver.url, "B")
    one_click(api, client, res_a, "a-1")
    workers.start()
    wait_until(lambda: call_url_failures(r) >= 2, 20)            # A is backing off (1 s, then 2 s)
    smid_b = one_click(api, client, res_b, "b-1")
    (call,) = receiver.wait_for(1, timeout=5)                    # not behind A's backoff
    assert json.loads(call["body"])["smid"] == smid_b
    wait_until(lambda: api.ok("resources/get", id=res_b["id"])["called_url_delivery"]["backlog"] == 0, 5)
    state_b = api.ok("resources/get", id=res_b["id"])["called_url_delivery"]
    assert state_b["failures"] == 0 and state_b["last_error"] is None and state_b["last_success_at"]
    assert state_b["next_attempt_at"] is None
    state_a = api.ok("resources/get", id=res_a["id"])["called_url_delivery"]
    assert state_a["backlog"] == 1 and state_a["failures"] >= 2 and state_a["last_success_at"] is None
    assert state_a["last_error"].startswith("ConnectionRefusedError") and state_a["last_error_at"]
    assert state_a["next_attempt_at"].endswith("Z")             # RFC 3339, as webhooks/list shows it
    assert set(state_a) == set(state_b) == {"backlog", "last_error", "last_error_at", "last_success_at", "failures",
                                            "next_attempt_at"}


def test_an_upgrade_from_the_shared_call_url_group_delivers_its_undelivered_calls(api, client, r, receiver,  # noqa: F811,E501
                                                                                  workers):
    """Older versions had one consumer group, `called_url`, for every resource's call URL. Left as such a version
    leaves it (B's first call delivered; A's call and B's second read and unacknowledged, A's having failed;
    B's third not read yet; the shared target backing off), it is upgraded: each resource's target starts where
    the shared group stood, so B gets its second and third calls (not the first again) while A keeps failing,
    and the shared group and its delivery state are gone."""
    from webapp import keys
    res_a, res_b = call_url_resource(api, DOWN, "A"), call_url_resource(api, receiver.url, "B")
    timeline = keys.events_timeline()

    def last_entry():
        return r.xrevrange(timeline, count=1)[0][0]

    one_click(api, client, res_b, "b-1")
    delivered = last_entry()
    one_click(api, client, res_a, "a-1")
    smid_b2 = one_click(api, client, res_b, "b-2")
    read = last_entry()
    smid_b3 = one_click(api, client, res_b, "b-3")
    for group in r.xinfo_groups(timeline):                      # the older version's layout: one shared group
        r.xgroup_destroy(timeline, group["name"])
    r.xgroup_create(timeline, "called_url", id=delivered)
    r.xreadgroup("called_url", "deliverer", {timeline: ">"}, count=len(r.xrange(timeline, "(" + delivered, read)))
    assert r.xinfo_groups(timeline)[0]["pending"] > 0
    r.hset(keys.delivery_state("called_url"), mapping={"failures": 5, "last_error": "ConnectionRefusedError",
                                                        "next_attempt_at": repr(time.time() + 3600)})
    workers.start()
    receiver.wait_for(2, timeout=10)
    time.sleep(1)                                                # and nothing more
    assert [b["smid"] for b in receiver.bodies()] == [smid_b2, smid_b3]
    assert sorted(g["name"] for g in r.xinfo_groups(timeline)) == sorted(
        [f"called_url:{res_a['id']}", f"called_url:{res_b['id']}"])
    assert not r.exists(keys.delivery_state("called_url"))
    wait_until(lambda: api.ok("resources/get", id=res_a["id"])["called_url_delivery"]["failures"] >= 1, 5)
    assert api.ok("resources/get", id=res_a["id"])["called_url_delivery"]["backlog"] == 1   # its call, not lost


def not_answering(addresses):
    """Real TCP listeners on `addresses`, all on one port, that never accept: each one's queue (one connection)
    is filled, so further SYNs are dropped and a connect waits out its own timeout, as to an address that does
    not answer. Returns (port, sockets to close)."""
    import socket
    held, port = [], 0
    for address in addresses:
        listener = socket.socket()
        listener.bind((address, port))
        listener.listen(0)
        port = listener.getsockname()[1]
        filler = socket.create_connection((address, port), timeout=2)
        held += [listener, filler]
    probe = socket.socket()
    probe.settimeout(0.3)
    try:
        probe.connect((addresses[0], port))
        raise AssertionError("the listener answered: cannot make an address that does not answer here")
    except TimeoutError:
        pass
    finally:
        probe.close()
    return port, held


def worker_with_own_names(workers, tmp_path, names, **env):
    """A real `python -m workers` whose host name lookups use their own hosts file (`names`: address, name pairs)
    and a name server at 127.0.0.77 (none answers there unless a test binds it): /etc/hosts and
    /etc/resolv.conf bind-mounted over in a mount namespace of its own (unshare), the machine's left alone."""
    import shlex
    import shutil
    import subprocess
    import sys
    hosts, resolv = tmp_path / "hosts", tmp_path / "resolv.conf"
    resolv.write_text("")
    # A machine (a container without CAP_SYS_ADMIN) may allow no mount namespace: said in the run's summary as a
    # skip with its reason, rather than a failure of something this service cannot change.
    probe = ["unshare", "--mount", "mount", "--bind", str(resolv), str(resolv)]
    if os.geteuid() != 0 or shutil.which("unshare") is None or subprocess.run(probe, capture_output=True).returncode:
        pytest.skip("needs root and a mount namespace (unshare --mount, mount --bind) to give a worker its own "
                    "/etc/hosts and name server")
    hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for a, n in names))
    resolv.write_text("nameserver 127.0.0.77\n")
    script = (f"mount --bind {shlex.quote(str(hosts))} /etc/hosts && "
              f"mount --bind {shlex.quote(str(resolv))} /etc/resolv.conf && "
              f"exec {shlex.quote(sys.executable)} -m workers")
    return workers.start(["unshare", "--mount", "sh", "-c", script], **env)


@pytest.mark.parametrize("target", ["eight addresses that do not answer", "a name server that does not answer"])
def test_a_post_ends_within_its_timeout_lookup_and_every_connect_included(api, r, receiver, workers, tmp_path,
                                                                         target):  # noqa: F811
    """WEBHOOK_TIMEOUT_SECONDS bounds the whole POST: a name whose eight addresses do not answer (each connect
    attempt gets only the time left, not the whole timeout again), or whose name server does not answer (the
    lookup is bounded too), fails within the timeout, so the delivery job never outlives its target's lock
    (timeout + 5 s), past which a second job could start and send the events twice or out of order. A name
    that resolves to a real receiver is delivered to as before."""
    import socket
    from test_webhooks import change
    port, held = not_answering([f"127.0.0.{i}" for i in range(2, 10)])
    name_server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # takes the questions, answers none
    name_server.bind(("127.0.0.77", 53))
    try:
        names = [("127.0.0.1", "receiver.test")] + [(f"127.0.0.{i}", "many.test") for i in range(2, 10)]
        worker_with_own_names(workers, tmp_path, names, WEBHOOK_TIMEOUT_SECONDS="1")
        res = api.ok("resources/add", **email_resource())
        api.ok("webhooks/add", url=receiver.url.replace("127.0.0.1", "receiver.test"), secret=SECRET)
        change(api, res, profile_id="p-1")
        receiver.wait_for(2, timeout=20)                       # looked up, connected, delivered
        host = "many.test" if target.startswith("eight") else "slow.test"
        hook = api.ok("webhooks/add", url=f"http://{host}:{port}/hook", secret=SECRET)
        group = webhooks.group_name(hook["id"])
        lock, state = keys.delivery_lock(group), keys.delivery_state(group)
        change(api, res, profile_id="p-2")
        token = wait_until(lambda: r.get(lock), 20, interval=0.01)  # its delivery job started
        started = time.monotonic()
        while not r.hget(state, "last_error"):
            assert r.get(lock) == token, f"the job outlived its lock ({time.monotonic() - started:.1f} s)"
            assert time.monotonic() - started < 15
            time.sleep(0.01)
        took = time.monotonic() - started
        assert r.hget(state, "last_error") == "TimeoutError: timed out (no complete answer within 1 s)"
        assert took < 1.75, f"the POST took {took:.2f} s with a 1 s timeout"
        receiver.wait_for(4, timeout=20)                       # the other target is not held up
    finally:
        name_server.close()
        for sock in held:
            sock.close()
