"""Every writer at once on the same profiles: one-click POSTs, page forms (instant, confirm, delayed with its
timers firing in a real worker), the SDK endpoint, the subscription manager (pauses the worker ends), and the
API, from many threads through gunicorn's worker processes. A profile's ledger is one hash chain over all its
subscriptions, so each change must be decided on the state it replaces and appended after the event it read:
afterwards every chain verifies, each subscription's events follow on from one another (each `before` is the
previous `after`) and the last one is its stored state."""
import http.cookiejar
import json
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from conftest import email_resource, form_token
from test_delayed_support import WorkerProcesses, wait_until
from test_faults import Gunicorn
from webapp import events, keys
from webapp.subscriptions import decode_record, state_of
from webapp.resources import get_resource

TIME_UNIT = "0.05"  # a timer "minute" of 50 ms: delayed unsubscribes fire while the other writers run
DAY = "0.01"  # a pause "day" of 10 ms: a 14-day pause ends (the worker's housekeeping) while they run
SECONDS = 6
PROFILES = 6
CATEGORIES = [{"title": "News", "api_name": "news"}, {"title": "Offers", "api_name": "offers"},
              {"title": "Receipts", "api_name": "receipts", "required": True}]
# Timers are started often enough that some fire before another writer settles them. A page offering only
# Undo (a subscription already unsubscribed) is mostly just looked at: Undo mostly finds nothing to undo.
ACTION_WEIGHTS = {"start": 10, "unsubscribe": 3, "now": 1, "cancel": 1, "undo": 1}
SDK_ACTIONS = ("show", "confirm", "cancel")
SDK_ORIGIN = "https://shop.example"  # email_resource's url: an origin the SDK endpoint allows
MANAGER_ACTIONS = ("suspend", "suspend", "suspend", "resume", "unsubscribe", "resubscribe", "save")


def page_form(html):
    """The page's form token and the actions its buttons offer."""
    token = re.search(r'name="csrf_token" value="([^"]+)"', html)
    return (token.group(1) if token else None), re.findall(r'name="action" value="([a-z]+)"', html)


def manager_change(browser, url, hash_id, rnd, action=None):
    """Open the manager page (its session cookie carries the CSRF token), then send one of its forms for the
    subscription `hash_id` (`action`, or one chosen at random); the status of the page it ends on (303s are
    followed)."""
    action = action or rnd.choice(MANAGER_ACTIONS)
    try:
        with browser.open(url, timeout=10) as resp:
            token = form_token(resp.read().decode())
        form = [("csrf_token", token), ("lang", "en"), ("hash_id", hash_id), ("action", action), ("days", "14")]
        form += [("categories", c) for c in rnd.sample(["news", "offers", "receipts"], rnd.randint(1, 3))]
        with browser.open(url, data=urllib.parse.urlencode(form).encode(), timeout=10) as resp:
            return "manager " + action, resp.status
    except urllib.error.HTTPError as exc:
        return "manager " + action, exc.code


def writer(server, subscriptions, seed, deadline, answers, lock):
    rnd = random.Random(seed)
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    while time.time() < deadline:
        ident, links = rnd.choice(subscriptions)
        link = links[rnd.choice((None, "news", "offers"))]
        what = rnd.choice(("one_click", "page", "page", "api", "manager", "sdk"))
        if what == "sdk":  # what a customer's own page does through AkUnsub: show, confirmUnsub, cancel
            got = server.fetch("POST", f"/sdk/v1/{ident['resource_id']}/unsubscribe",
                               json.dumps({"smid": link.rsplit("/", 1)[1], "action": rnd.choice(SDK_ACTIONS)}),
                               {"Content-Type": "application/json", "Origin": SDK_ORIGIN})
            status = got and got[0]
        elif what == "manager":
            what, status = manager_change(browser, f"http://127.0.0.1:{server.port}{links['manage']}",
                                          links["hash_id"], rnd)
        elif what == "one_click":
            status = server.one_click(link)
        elif what == "api":
            change = rnd.choice(({"status": "subscribed"}, {"status": "unsubscribed"},
                                 {"status": "subscribed", "cats": rnd.sample(["news", "offers", "receipts"], 2)}))
            server.api("subscriptions/set", **ident, **change)
            status = 200
        else:
            got = server.fetch("GET", link)
            if got is None:
                status = None
            else:
                status, html = got
                token, actions = page_form(html)
                if actions and (actions != ["undo"] or rnd.random() < 0.2):
                    action = rnd.choices(actions, [ACTION_WEIGHTS[a] for a in actions])[0]
                    form = [("csrf_token", token), ("lang", "en"), ("action", action)]
                    if action == "unsubscribe" and "categories" in html and rnd.random() < 0.5:
                        form += [("scope", "categories"), ("categories", rnd.choice(("news", "offers")))]
                    what = "page " + action
                    status = server.post(link, urllib.parse.urlencode(form), "application/x-www-form-urlencoded")
        with lock:
            answers[(what, status)] = answers.get((what, status), 0) + 1


def pauser(server, subscription, deadline, answers, lock):
    """Pauses one subscription for 14 "days" (0.14 s) through the manager, again and again, while the other
    writers change the other subscriptions of its profile: pauses that end (the worker's) take part in the race
    every run. A pause any writer may change ended in some runs only, and in some in none."""
    rnd = random.Random(99)
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    _ident, links = subscription
    while time.time() < deadline:
        got = manager_change(browser, f"http://127.0.0.1:{server.port}{links['manage']}", links["hash_id"], rnd,
                             "suspend")
        with lock:
            answers[got] = answers.get(got, 0) + 1
        time.sleep(0.3)


def test_concurrent_writers_keep_every_chain_and_state_consistent(r, redis_url, tmp_path):
    unlimited = "10000/minute"  # the storm comes from one address and few links
    server = Gunicorn(redis_url, workers=4, env={"TIME_UNIT_SECONDS": TIME_UNIT, "SUSPEND_DAY_SECONDS": DAY,
                                                 "SDK_RATE_LIMIT_PER_IP": unlimited,
                                                 "SDK_RATE_LIMIT_PER_SMID": unlimited,
                                                 "PAGE_RATE_LIMIT_PER_LINK": unlimited,
                                                 "PAGE_RATE_LIMIT_PER_IP": unlimited})
    workers = WorkerProcesses(redis_url, tmp_path)
    try:
        workers.start(TIME_UNIT_SECONDS=TIME_UNIT, SUSPEND_DAY_SECONDS=DAY)
        subscriptions = []
        for mode in ("instant", "confirm", "delayed"):
            res = server.api("resources/add", **email_resource(
                name=mode, categories=CATEGORIES, unsubscribe={"mode": mode, "timer_minutes": 1}))
            for p in range(PROFILES):  # each profile on all three resources: one chain per profile
                ident = {"db_id": 1, "profile_id": f"race-{p}", "resource_id": res["id"], "channel": "email",
                         "email": f"race{p}@example.com"}
                hash_id = server.api("subscriptions/set", **ident)["hash_id"]
                issued = {cat: server.api("messages/links", **ident, **({"category": cat} if cat else {}))
                          for cat in (None, "news", "offers")}
                links = {cat: urllib.parse.urlsplit(got["unsubscribe_url"]).path for cat, got in issued.items()}
                links.update(manage=urllib.parse.urlsplit(issued[None]["manage_url"]).path, hash_id=hash_id)
                subscriptions.append((ident, links))

        answers, lock, deadline = {}, threading.Lock(), time.time() + SECONDS
        paused, others = subscriptions[0], subscriptions[1:]
        threads = [threading.Thread(target=writer, args=(server, others, seed, deadline, answers, lock))
                   for seed in range(8)]
        threads.append(threading.Thread(target=pauser, args=(server, paused, deadline, answers, lock)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        try:
            wait_until(lambda: r.zcard(keys.pending_due()) == 0 and not suspended(r, subscriptions), 10)
        except AssertionError:  # say what was left, with the Redis clock: a rare CI failure left no trace
            left = {"now": r.time(), "pending_due": r.zrange(keys.pending_due(), 0, -1, withscores=True),
                    "suspensions_due": r.zrange(keys.suspensions_due(), 0, -1, withscores=True),
                    "paused": [r.hget(keys.profile_subscriptions(1, ident["profile_id"]), links["hash_id"])
                               for ident, links in subscriptions if suspended(r, [(ident, links)])]}
            raise AssertionError(f"timers or pauses left 10 s after the writers stopped: {left}") from None
    finally:
        workers.close()
        server.stop()

    expected = {"one_click": (200,), "api": (200,), "page": (200,), "sdk": (200,),
                "page undo": (303, 409)}  # 409: nothing to undo
    # the manager: 409 when the subscription's state does not allow the action (resume one not paused, ...)
    expected.update({"manager " + action: (200, 409) for action in MANAGER_ACTIONS})
    assert {k: n for k, n in answers.items() if k[1] not in expected.get(k[0], (303,))} == {}, answers
    assert events.verify_all(r, 1) is None

    methods = set()
    for ident, _links in subscriptions:
        ledger = [events.decode_event(raw) for raw in r.lrange(keys.profile_events(1, ident["profile_id"]), 0, -1)]
        mine = [e for e in ledger if e["resource_id"] == ident["resource_id"]]  # oldest first
        methods.update(e["method"] for e in mine)
        assert mine[0]["before"] is None
        for earlier, later in zip(mine, mine[1:]):
            assert later["before"] == earlier["after"], (ident, earlier, later)
        raw = r.hget(keys.profile_subscriptions(1, ident["profile_id"]), mine[0]["hash_id"])
        assert state_of(get_resource(r, ident["resource_id"]), decode_record(raw)) == mine[-1]["after"]
    # every kind of writer took part
    assert methods >= {"api", "one_click", "page_instant", "page_confirm", "sdk", "timer", "manager",
                       "suspend_expiry"}, methods


def suspended(r, subscriptions):
    """Whether any of the subscriptions is still paused (its pause not yet ended by the worker)."""
    for ident, links in subscriptions:
        raw = r.hget(keys.profile_subscriptions(1, ident["profile_id"]), links["hash_id"])
        if decode_record(raw)["status"] == 5:
            return True
    return False
