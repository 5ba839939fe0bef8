"""The AkUnsub SDK in real Chromium, across origins: a customer's page served by a tiny HTTP server on another port
of 127.0.0.1 loads the script from the live server and calls the endpoint with CORS. Screenshots of the example
page land in test-artifacts/screens/."""
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, urlsplit

import pytest
from flask import request

from conftest import (API_TOKEN, ROOT, SIGNING_KEYS, LiveServer, close_clients, email_resource, redis_state,
                      screenshot, serve_in_thread, start_redis_server)
from webapp import create_app, keys
from webapp.delayed import sweep_once

pytestmark = pytest.mark.browser
EXAMPLE_SCRIPT_URL = "https://unsub.example.com/ak_list_unsubscribe.js?id=MXwx"
CATEGORIES = [{"title": "News", "api_name": "news", "required": False},
              {"title": "Promotions", "api_name": "promo", "required": False},
              {"title": "Receipts", "api_name": "receipts", "required": True}]


class Site:
    """A customer's web site: serves the HTML put into `pages` (path -> text, or (text, {header: value}))
    on its own port."""

    def __init__(self):
        self.pages = {}
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = site.pages.get(urlsplit(self.path).path)
                body, headers = body if isinstance(body, tuple) else (body, {})
                data = (body or "not found").encode()
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def sites():
    shop, other = Site(), Site()
    yield shop, other
    shop.close()
    other.close()


def store_state(r):
    prefix = keys.rate_limits() + ":"
    return {k: v for k, v in redis_state(r).items() if not k.startswith(prefix)}


def setup(live, site, mode, profile_id="p-42", categories=CATEGORIES, category=None):
    """A resource in `mode` whose urls list `site`'s origin, a subscription and one message's SMID."""
    api = live.api
    res = api.ok("resources/add", **email_resource(
        url="https://shop.example/", urls=[site.origin + "/"], categories=categories,
        unsubscribe={"mode": mode, "timer_minutes": 30}))
    ident = {"db_id": 1, "profile_id": profile_id, "resource_id": res["id"], "channel": "email",
             "email": "ann@example.com"}
    sub = api.ok("subscriptions/set", **ident)
    smid = api.ok("messages/links", **ident, **({"category": category} if category else {}))["smid"]
    return res, ident, smid, sub["hash_id"]


def page_html(script_url, options="{}"):
    """A bare customer page: the SDK, one instance, and `run(promise)` that shows the outcome in #out."""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Shop</title>
<script src="{script_url}"></script></head><body><p id="out">-</p><script>
const out = document.getElementById("out");
window.run = (p) => p.then(
  (s) => {{ out.textContent = s ? "state: " + s.result + " " + s.status + " " + s.cats.join(",") : "no smid";
           return {{state: s}}; }},
  (e) => {{ out.textContent = "error: " + e.message; return {{error: e.message}}; }});
window.akUnsub = new AkUnsub({options});
</script></body></html>"""


def status(live, ident):
    got = live.api.ok("subscriptions/get", **ident)
    return got["status"], got["cats"]


def test_confirm_from_another_origin_respects_categories(live_server, sites, open_page, r):
    shop, _ = sites
    res, ident, smid, _hash = setup(live_server, shop, "confirm")
    shop.pages["/plain.html"] = page_html(res["sdk_script_url"], "{rtoken: %r}" % res["rtoken"])
    page = open_page(shop.origin + "/plain.html")
    assert page.evaluate("run(akUnsub.ready)") == {"state": None}           # no SMID in this page's URL
    got = page.evaluate("([s, c]) => run(AkUnsub.confirmUnsub(s, c))", [smid, ["promo"]])
    assert got["state"]["result"] == "unsubscribed" and got["state"]["cats"] == ["news", "receipts"]
    assert page.locator("#out").inner_text() == "state: unsubscribed subscribed news,receipts"
    assert status(live_server, ident) == ("subscribed", ["news", "receipts"])
    got = page.evaluate("([s, c]) => run(akUnsub.confirmUnsub(s, c))", [smid, ["receipts"]])
    assert "'receipts' is required" in got["error"]
    assert status(live_server, ident) == ("subscribed", ["news", "receipts"])


def test_cancel_during_delayed_timer_stops_it(live_server, sites, open_page, r):
    shop, _ = sites
    res, ident, smid, hash_id = setup(live_server, shop, "delayed")
    shop.pages["/unsubscribe.html"] = page_html(res["sdk_script_url"])
    page = open_page(shop.origin + "/unsubscribe.html?smid=" + quote(smid))
    armed = page.evaluate("run(akUnsub.ready)")["state"]                     # constructing started the timer
    assert armed["result"] == "pending" and 25 <= armed["pending"]["seconds_left"] <= 30
    pending_key = keys.pending_unsubscribe(1, "p-42", hash_id)
    assert r.exists(pending_key) and r.zcard(keys.pending_due()) == 1
    got = page.evaluate("([s, c]) => run(akUnsub.cancelUnsub(s, c))", [smid, ["news"]])
    assert got["state"]["result"] == "cancelled" and got["state"]["pending"] is None
    assert not r.exists(pending_key) and r.zcard(keys.pending_due()) == 0
    assert sweep_once(r, now=time.time() + 3600) == 0                        # the workers' sweep finds nothing
    assert status(live_server, ident) == ("subscribed", ["news", "promo", "receipts"])


@pytest.mark.parametrize("mode", ["instant", "delayed"])
def test_in_a_browser_an_automation_drives_constructing_changes_nothing(live_server, sites, browser, r, mode):
    """A link scanner running the customer's page (navigator.webdriver) does not unsubscribe or start a timer;
    the page's own confirmUnsub, a click's, still works."""
    shop, _ = sites
    res, ident, smid, _hash = setup(live_server, shop, mode)
    shop.pages["/unsubscribe.html"] = page_html(res["sdk_script_url"])
    context = browser.new_context()
    try:
        context.add_init_script("Object.defineProperty(Navigator.prototype, 'webdriver', {get: () => true})")
        page = context.new_page()
        page.goto(shop.origin + "/unsubscribe.html?smid=" + quote(smid))
        state = page.evaluate("run(akUnsub.ready)")["state"]
        assert (state["result"], state["pending"]) == ("waiting", None)
        assert status(live_server, ident) == ("subscribed", ["news", "promo", "receipts"])
        assert r.zcard(keys.pending_due()) == 0
        got = page.evaluate("(s) => run(akUnsub.confirmUnsub(s))", smid)
        assert got["state"]["result"] == "unsubscribed" and status(live_server, ident)[0] == "unsubscribed"
    finally:
        context.close()


def test_unlisted_origin_gets_a_readable_error_and_changes_nothing(live_server, sites, open_page, r):
    shop, other = sites
    res, ident, smid, _hash = setup(live_server, shop, "instant")
    other.pages["/unsubscribe.html"] = page_html(res["sdk_script_url"])
    before = store_state(r)
    page = open_page(other.origin + "/unsubscribe.html?smid=" + quote(smid))  # instant: would unsubscribe
    expected = (f"This page's origin {other.origin} is not allowed to unsubscribe for this resource: "
                "add it to the resource's URLs")
    assert page.evaluate("run(akUnsub.ready)") == {"error": expected}
    assert page.evaluate("(s) => run(akUnsub.confirmUnsub(s))", smid) == {"error": expected}
    assert page.locator("#out").inner_text() == "error: " + expected
    assert store_state(r) == before and status(live_server, ident)[0] == "subscribed"


def test_network_failure_is_readable(live_server, sites, open_page, r):
    shop, _ = sites
    res, ident, smid, _hash = setup(live_server, shop, "confirm")
    shop.pages["/down.html"] = page_html(res["sdk_script_url"], "{pxl_domain: 'http://127.0.0.1:9/unsub/'}")
    page = open_page(shop.origin + "/down.html")
    got = page.evaluate("(s) => run(akUnsub.confirmUnsub(s))", smid)
    assert got["error"] == ("Could not reach the unsubscribe service at http://127.0.0.1:9/unsub (network error); "
                            "please try again")


def test_a_redis_outage_is_readable_in_the_page(sites, browser, tmp_path):
    """With the service's Redis down its answers carry no CORS headers (it cannot read the resource's origins),
    so the page's fetch fails like a network error; the SDK's question to /origin then says why. Both ways
    there: a page whose earlier call left its preflight in Chromium's cache sends the POST alone (so a second
    call costs one round trip, not two), and its 503 is unreadable; a page without one sees its preflight fail."""
    shop, _ = sites
    proc, redis_url = start_redis_server(str(tmp_path))
    app = create_app({"TESTING": True, "REDIS_URL": redis_url, "API_TOKEN": API_TOKEN, "SIGNING_KEYS": SIGNING_KEYS,
                      "VAR_DIR": str(tmp_path), "PUBLIC_BASE_URL": "http://127.0.0.1:1"})
    seen = []
    app.before_request(lambda: seen.append(request.method) if request.path.endswith("/unsubscribe") else None)
    server = serve_in_thread(app)
    live = LiveServer(app, server)
    app.config["PUBLIC_BASE_URL"] = live.url
    contexts = []
    try:
        res, ident, smid, _hash = setup(live, shop, "confirm")
        shop.pages["/outage.html"] = page_html(res["sdk_script_url"])
        outcome = "(s) => akUnsub.confirmUnsub(s).then(() => 'done', (e) => [e.message, e.status, e.reason])"
        pages = []
        for _ in range(2):
            contexts.append(browser.new_context())
            pages.append(contexts[-1].new_page())
            pages[-1].goto(shop.origin + "/outage.html")
        assert "state" in pages[0].evaluate("(s) => run(akUnsub.cancelUnsub(s))", smid)  # its preflight is cached
        proc.terminate()
        proc.wait(timeout=10)
        unavailable = ["The unsubscribe service is unavailable; please try again shortly", 503, "unavailable"]
        del seen[:]
        assert pages[0].evaluate(outcome, smid) == unavailable
        assert seen == ["POST"]
        assert pages[1].evaluate(outcome, smid) == unavailable
        assert seen == ["POST", "OPTIONS"]
    finally:
        for ctx in contexts:
            ctx.close()
        server.shutdown()
        close_clients(app)
        if proc.poll() is None:
            proc.kill()


def test_rate_limited_call_is_readable_in_the_page(live_server, sites, open_page, r):
    shop, _ = sites
    res, ident, smid, _hash = setup(live_server, shop, "confirm")
    shop.pages["/busy.html"] = page_html(res["sdk_script_url"])
    page = open_page(shop.origin + "/busy.html")
    saved = live_server.app.config["SDK_RATE_LIMIT_PER_SMID"]
    live_server.app.config["SDK_RATE_LIMIT_PER_SMID"] = "1 per minute"
    try:
        assert "state" in page.evaluate("(s) => run(akUnsub.cancelUnsub(s))", smid)
        got = page.evaluate("(s) => run(akUnsub.confirmUnsub(s))", smid)
    finally:
        live_server.app.config["SDK_RATE_LIMIT_PER_SMID"] = saved
    assert got["error"].startswith("Too many requests for this message (try again in ")
    assert status(live_server, ident)[0] == "subscribed"


def test_constructing_with_the_smid_in_the_url_in_instant_mode_unsubscribes(live_server, sites, open_page, r):
    shop, _ = sites
    res, ident, smid, _hash = setup(live_server, shop, "instant")
    shop.pages["/bye.html"] = page_html(res["sdk_script_url"])
    # any query parameter whose value verifies: here "m", next to values that are not SMIDs
    page = open_page(f"{shop.origin}/bye.html?utm_source=mail&m={quote(smid)}&id=42")
    got = page.evaluate("run(akUnsub.ready)")["state"]
    assert (got["mode"], got["result"], got["status"]) == ("instant", "unsubscribed", "unsubscribed")
    assert page.evaluate("akUnsub.smid") == smid
    assert status(live_server, ident)[0] == "unsubscribed"


def test_constructing_in_confirm_mode_waits_for_confirm(live_server, sites, open_page, r):
    shop, _ = sites
    res, ident, smid, _hash = setup(live_server, shop, "confirm")
    shop.pages["/confirm.html"] = page_html(res["sdk_script_url"])
    before = store_state(r)
    page = open_page(f"{shop.origin}/confirm.html?smid={quote(smid)}")
    got = page.evaluate("run(akUnsub.ready)")["state"]
    assert (got["mode"], got["result"], got["status"]) == ("confirm", "waiting", "subscribed")
    page.wait_for_timeout(200)
    assert store_state(r) == before                                          # showing changed nothing
    got = page.evaluate("run(akUnsub.confirmUnsub())")["state"]              # the SMID from the URL
    assert got["status"] == "unsubscribed"
    assert status(live_server, ident)[0] == "unsubscribed"


def test_hidden_page_waits_until_visible(live_server, sites, browser, r):
    shop, _ = sites
    res, ident, smid, _hash = setup(live_server, shop, "instant")
    shop.pages["/hidden.html"] = page_html(res["sdk_script_url"])
    context = browser.new_context()
    try:
        page = context.new_page()
        # A prerendered or background page: visibilityState is "hidden" until we say otherwise.
        page.add_init_script("window.__vis = 'hidden'; Object.defineProperty(document, 'visibilityState', "
                             "{get: () => window.__vis});")
        page.goto(f"{shop.origin}/hidden.html?smid={quote(smid)}")
        page.wait_for_timeout(300)
        assert status(live_server, ident)[0] == "subscribed"
        page.evaluate("window.__vis = 'visible'; document.dispatchEvent(new Event('visibilitychange'))")
        assert page.evaluate("run(akUnsub.ready)")["state"]["status"] == "unsubscribed"
        assert status(live_server, ident)[0] == "unsubscribed"
    finally:
        context.close()


def example_page(site, res, name):
    with open(os.path.join(ROOT, "docs", "sdk-example.html"), encoding="utf-8") as f:
        site.pages[name] = f.read().replace(EXAMPLE_SCRIPT_URL, res["sdk_script_url"])


def test_example_page_in_the_states_a_person_can_be_in(live_server, sites, open_page, r):
    shop, _ = sites
    # Only required categories: nothing to choose, so the whole subscription, as on the hosted page.
    res, ident, smid, _hash = setup(live_server, shop, "confirm", categories=[CATEGORIES[2]])
    example_page(shop, res, "/required.html")
    page = open_page(f"{shop.origin}/required.html?smid={quote(smid)}")
    page.get_by_text("Stop all these emails?").wait_for()
    page.get_by_role("button", name="Confirm unsubscribe").click()
    page.get_by_text("You are unsubscribed.").wait_for()
    assert status(live_server, ident)[0] == "unsubscribed"
    # A message for one category offers that one ticked, the others not.
    res, ident, smid, _hash = setup(live_server, shop, "confirm", profile_id="p-43", category="promo")
    example_page(shop, res, "/promo.html")
    page = open_page(f"{shop.origin}/promo.html?smid={quote(smid)}")
    page.locator("#choose").wait_for()
    assert page.locator('input[value="promo"]').is_checked() and not page.locator('input[value="news"]').is_checked()
    # A message for a required category offers that one too, ticked: what a message was sent for can be stopped.
    res, ident, smid, _hash = setup(live_server, shop, "confirm", profile_id="p-46", category="receipts")
    example_page(shop, res, "/receipts.html")
    page = open_page(f"{shop.origin}/receipts.html?smid={quote(smid)}")
    page.locator("#choose").wait_for()
    assert page.locator('input[value="receipts"]').is_checked() and not page.locator('input[value="news"]').is_checked()
    page.get_by_role("button", name="Confirm unsubscribe").click()
    page.get_by_text("Done. You still get: News, Promotions.").wait_for()
    assert status(live_server, ident) == ("subscribed", ["news", "promo"])
    # A paused subscription can still be stopped: not shown as unsubscribed.
    res, ident, smid, _hash = setup(live_server, shop, "confirm", profile_id="p-44")
    live_server.api.ok("subscriptions/set", **ident, status="suspended")
    example_page(shop, res, "/paused.html")
    page = open_page(f"{shop.origin}/paused.html?smid={quote(smid)}")
    page.get_by_text("Choose what to stop.").wait_for()
    # Keep my subscription clicked twice: the second answer ("none") still says it continues.
    res, ident, smid, _hash = setup(live_server, shop, "delayed", profile_id="p-45")
    example_page(shop, res, "/keep.html")
    page = open_page(f"{shop.origin}/keep.html?smid={quote(smid)}")
    page.locator("#timer").wait_for()
    page.get_by_role("button", name="Keep my subscription").dblclick()
    page.get_by_text("Your subscription continues.").wait_for()
    assert page.evaluate("akUnsub.cancelUnsub().then((s) => s.result)") == "none"
    assert status(live_server, ident)[0] == "subscribed"


def test_where_a_page_url_may_put_the_smid_and_what_only_looks_like_one(live_server, sites, open_page, r):
    shop, _ = sites
    for n, (path, query) in enumerate([("/u/{smid}", ""), ("/u.html", "#smid={smid}")]):  # path, #fragment
        res, ident, smid, _hash = setup(live_server, shop, "instant", profile_id=f"p-{n}")
        shop.pages[path.format(smid=smid)] = page_html(res["sdk_script_url"])   # SMIDs are URL-safe
        where = path + query
        page = open_page(shop.origin + where.format(smid=smid))
        assert page.evaluate("run(akUnsub.ready)")["state"]["status"] == "unsubscribed", where
        assert status(live_server, ident)[0] == "unsubscribed"
    # A tracking value that merely looks like a SMID: no SMID here, not an error.
    res, ident, smid, _hash = setup(live_server, shop, "instant", profile_id="p-9")
    shop.pages["/promo.html"] = page_html(res["sdk_script_url"])
    lookalike = smid[:-6] + ("AAAAAA" if not smid.endswith("AAAAAA") else "BBBBBB")
    page = open_page(f"{shop.origin}/promo.html?utm_content={lookalike}")
    assert page.evaluate("run(akUnsub.ready)") == {"state": None}
    # The static method as a click handler: the event is not a SMID; the page's own is used.
    page = open_page(f"{shop.origin}/promo.html?smid={quote(smid)}")
    page.evaluate("run(akUnsub.ready)")
    assert page.evaluate("AkUnsub.confirmUnsub(new MouseEvent('click')).then((s) => s.status)") == "unsubscribed"


def test_the_script_loads_with_crossorigin_anonymous(live_server, sites, open_page, r):
    shop, _ = sites
    res, ident, smid, _hash = setup(live_server, shop, "confirm")
    shop.pages["/sri.html"] = page_html(res["sdk_script_url"]).replace(
        "<script src=", '<script crossorigin="anonymous" src=', 1)
    page = open_page(f"{shop.origin}/sri.html")
    assert page.evaluate("typeof AkUnsub") == "function"


def test_example_page(live_server, sites, open_page, r):
    shop, _ = sites
    res, ident, smid, _hash = setup(live_server, shop, "confirm")
    with open(os.path.join(ROOT, "docs", "sdk-example.html"), encoding="utf-8") as f:
        example = f.read()
    assert EXAMPLE_SCRIPT_URL in example
    shop.pages["/unsubscribe.html"] = example.replace(EXAMPLE_SCRIPT_URL, res["sdk_script_url"])
    page = open_page(f"{shop.origin}/unsubscribe.html?smid={quote(smid)}")
    page.locator("#choose").wait_for()
    assert page.locator("#status").inner_text() == "Choose what to stop."
    assert page.locator('input[name="categories"]').count() == 2                # required Receipts is not offered
    assert page.locator("#continues").inner_text() == "These continue: Receipts."
    screenshot(page, "sdk-example-confirm")
    page.locator('input[value="news"]').uncheck()
    page.get_by_role("button", name="Confirm unsubscribe").click()
    page.get_by_text("Done. You still get: News, Receipts.").wait_for()
    assert status(live_server, ident) == ("subscribed", ["news", "receipts"])
    screenshot(page, "sdk-example-done")

    res, ident, smid, _hash = setup(live_server, shop, "delayed", profile_id="p-43")
    shop.pages["/delayed.html"] = example.replace(EXAMPLE_SCRIPT_URL, res["sdk_script_url"])
    page = open_page(f"{shop.origin}/delayed.html?smid={quote(smid)}")
    page.locator("#timer").wait_for()
    assert page.locator("#status").inner_text() == "You will be unsubscribed in 1 min. Changed your mind?"
    screenshot(page, "sdk-example-delayed")
    page.get_by_role("button", name="Keep my subscription").click()
    page.get_by_text("Your subscription continues.").wait_for()
    assert r.zcard(keys.pending_due()) == 0 and status(live_server, ident)[0] == "subscribed"


def test_a_service_that_never_answers_rejects_after_a_timeout(live_server, sites, browser, r):
    """A pxl_domain that accepts the connection and never answers (a hung proxy, a stalled server): the promise
    rejects with a readable timeout, and the SDK does not go on to probe the service (the POST may have landed).
    The page's clock is Playwright's, moved on by hand."""
    shop, _ = sites
    res, ident, smid, _hash = setup(live_server, shop, "confirm")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)                                     # the kernel accepts connections; nobody ever answers
    shop.pages["/hung.html"] = page_html(res["sdk_script_url"],
                                         "{pxl_domain: 'http://127.0.0.1:%d'}" % silent.getsockname()[1])
    context = browser.new_context()
    try:
        context.clock.install()
        page = context.new_page()
        page.goto(shop.origin + "/hung.html")
        page.evaluate("(s) => { window.outcome = null; akUnsub.confirmUnsub(s).then("
                      "() => { window.outcome = 'resolved'; }, (e) => { window.outcome = [e.message, e.status, "
                      "e.reason]; }); }", smid)
        page.wait_for_timeout(500)                        # real time: the request is on its way, unanswered
        assert page.evaluate("window.outcome") is None
        page.clock.run_for(30_000)
        page.wait_for_function("window.outcome !== null", timeout=5000)
        assert page.evaluate("window.outcome") == [
            f"The unsubscribe service at http://127.0.0.1:{silent.getsockname()[1]} did not answer in time; "
            "please try again", 0, "timeout"]
    finally:
        context.close()
        silent.close()


def test_an_smid_of_the_wrong_type_is_refused_not_replaced_by_the_pages(live_server, sites, open_page, r):
    """confirmUnsub(['promo']) (the categories where the SMID goes, as one writes when the SMID is optional)
    must not unsubscribe the whole subscription of the page's own SMID: a wrong type is refused, nothing
    changes. Nothing, null and a click event still mean the page's own SMID."""
    shop, _ = sites
    res, ident, smid, _hash = setup(live_server, shop, "confirm")
    shop.pages["/types.html"] = page_html(res["sdk_script_url"])
    page = open_page(f"{shop.origin}/types.html?smid={quote(smid)}")
    assert page.evaluate("run(akUnsub.ready)")["state"]["result"] == "waiting"
    before = store_state(r)
    outcome = "akUnsub.%s.then((s) => s.status, (e) => [e.message, e.status, e.reason])"
    for call, got in [("confirmUnsub(['promo'])", "an array"), ("cancelUnsub(['promo'])", "an array"),
                      ("confirmUnsub(42)", "a number"), ("confirmUnsub({smid: akUnsub.smid})", "an object"),
                      ("confirmUnsub(true, ['promo'])", "a boolean")]:
        assert page.evaluate(outcome % call) == [
            f"AkUnsub: the SMID (first argument) must be a string, got {got}; the categories come second: "
            "confirmUnsub(smid, ['news'])", 0, "invalid"], call
        assert page.evaluate(f"AkUnsub.{call}.catch((e) => e.reason)") == "invalid", call
    assert store_state(r) == before and status(live_server, ident)[0] == "subscribed"
    assert page.evaluate(outcome % "confirmUnsub(null, ['promo'])") == "subscribed"
    assert status(live_server, ident) == ("subscribed", ["news", "receipts"])
    assert page.evaluate(outcome % "confirmUnsub(new MouseEvent('click'))") == "unsubscribed"


def test_constructing_again_in_the_same_page_does_not_show_the_link_again(live_server, sites, open_page, r):
    """A page that constructs AkUnsub more than once (a component mounted twice, as React's StrictMode does, or
    again after a route change) shows the link once: a second instance reads the state. Else "Keep my
    subscription" is undone by the next construction, which starts a new timer the page does not show."""
    shop, _ = sites
    res, ident, smid, hash_id = setup(live_server, shop, "delayed")
    shop.pages["/spa.html"] = page_html(res["sdk_script_url"])
    page = open_page(f"{shop.origin}/spa.html?smid={quote(smid)}")
    posts = []
    page.on("request", lambda req: posts.append(req.post_data_json["action"])
            if req.method == "POST" and req.url.endswith("/unsubscribe") else None)
    assert page.evaluate("run(akUnsub.ready)")["state"]["result"] == "pending"
    assert page.evaluate("run(akUnsub.cancelUnsub())")["state"]["result"] == "cancelled"
    again = page.evaluate("run(new AkUnsub().ready)")["state"]                # mounted again
    assert (again["result"], again["pending"]) == ("waiting", None)
    assert r.zcard(keys.pending_due()) == 0 and not r.exists(keys.pending_unsubscribe(1, "p-42", hash_id))
    # Two at once in instant mode: one show between them.
    res, ident, smid, hash_id = setup(live_server, shop, "instant", profile_id="p-43")
    shop.pages["/twice.html"] = page_html(res["sdk_script_url"]).replace(
        "</body>", "<script>window.second = new AkUnsub();</script></body>")
    page = open_page(shop.origin + "/none")
    del posts[:]
    page.on("request", lambda req: posts.append(req.post_data_json["action"])
            if req.method == "POST" and req.url.endswith("/unsubscribe") else None)
    page.goto(f"{shop.origin}/twice.html?smid={quote(smid)}")
    got = page.evaluate("Promise.all([akUnsub.ready, second.ready]).then((s) => s.map((x) => [x.result, x.status]))")
    assert got == [["unsubscribed", "unsubscribed"], ["waiting", "unsubscribed"]]
    assert sorted(posts) == ["show", "state"] and page.evaluate("second.smid") == smid


@pytest.mark.parametrize("page_url", ["/unsubscribe.html?{send_message_id}", "/unsubscribe.html#{send_message_id}",
                                      "/app#/unsubscribe/{send_message_id}", "/unsubscribe/{send_message_id}.html",
                                      "/app#!/unsubscribe?smid={send_message_id}&rtoken={resource_token}"])
def test_the_smid_where_page_url_puts_it_bare_or_in_an_app_route(live_server, sites, open_page, r, page_url):
    """The resource's page_url may put {send_message_id} anywhere: as the whole query or fragment, in a
    client-side router's path, before an extension. The person follows the message's link (the service
    redirects to page_url) and the page's SDK finds the SMID: in instant mode, it unsubscribes."""
    shop, _ = sites
    res, ident, _smid, _hash = setup(live_server, shop, "instant")
    live_server.api.ok("resources/update", id=res["id"], unsubscribe={"page_url": shop.origin + page_url})
    link = live_server.api.ok("messages/links", **ident)["unsubscribe_url"]
    smid = link.rsplit("/", 1)[1]  # this link's own: a SMID issued a second later than setup's differs from it
    path = page_url.split("?")[0].split("#")[0].replace("{send_message_id}", smid)
    shop.pages[path] = page_html(res["sdk_script_url"])
    page = open_page(link)
    assert page.url.startswith(shop.origin + path)
    assert page.evaluate("run(akUnsub.ready)")["state"]["result"] == "unsubscribed"
    assert page.evaluate("akUnsub.smid") == smid and status(live_server, ident)[0] == "unsubscribed"


def test_a_page_with_a_strict_csp(live_server, sites, open_page, r):
    """The script needs no eval, no inline code and no DOM sinks: it runs under a nonce-based strict-dynamic
    policy with Trusted Types enforced. A policy whose connect-src leaves the service out gets an error that
    says so (retrying would never help), not a network error."""
    shop, _ = sites
    res, ident, smid, _hash = setup(live_server, shop, "instant")
    html = page_html(res["sdk_script_url"]).replace("<script", '<script nonce="n0nce"')
    strict = ("default-src 'none'; script-src 'nonce-n0nce' 'strict-dynamic'; base-uri 'none'; object-src 'none'; "
              "require-trusted-types-for 'script'; trusted-types 'none'; connect-src ")
    shop.pages["/strict.html"] = (html, {"Content-Security-Policy": strict + live_server.url})
    page = open_page(f"{shop.origin}/strict.html?smid={quote(smid)}")
    assert page.evaluate("run(akUnsub.ready)")["state"]["status"] == "unsubscribed"
    res, ident, smid, _hash = setup(live_server, shop, "instant", profile_id="p-43")
    before = store_state(r)
    shop.pages["/self.html"] = (html, {"Content-Security-Policy": strict + "'self'"})
    page = open_page(f"{shop.origin}/self.html?smid={quote(smid)}")
    assert page.evaluate("akUnsub.ready.catch((e) => [e.message, e.status, e.reason])") == [
        f"This page's Content-Security-Policy does not allow connecting to the unsubscribe service at "
        f"{live_server.url}: add it to the policy's connect-src", 0, "csp"]
    assert store_state(r) == before


def test_constructor_options_of_the_wrong_type_are_refused(live_server, sites, open_page, r):
    """new AkUnsub('rtoken') would drop the rtoken the page meant the service to check, and a pxl_domain that
    is not a host sent every call to a made-up address: both throw a TypeError that says what is expected.
    A misspelt option is named in the console."""
    shop, _ = sites
    res, ident, smid, _hash = setup(live_server, shop, "confirm")
    shop.pages["/options.html"] = page_html(res["sdk_script_url"])
    page = open_page(f"{shop.origin}/options.html")
    warnings = []
    page.on("console", lambda msg: warnings.append(msg.text) if msg.type == "warning" else None)
    construct = ("(o) => { try { new AkUnsub(eval('(' + o + ')')); return 'made'; } "
                 "catch (e) { return e.name + ': ' + e.message; } }")
    expected = {
        "'abc'": "TypeError: AkUnsub: the options must be an object {rtoken?, pxl_domain?}, got a string",
        "{rtoken: 123}": "TypeError: AkUnsub: rtoken must be a string (the resource token), got a number",
        "{pxl_domain: 42}": "TypeError: AkUnsub: pxl_domain must be a host or an http(s) URL, got 42",
        "{pxl_domain: 'bad host!'}": "TypeError: AkUnsub: pxl_domain must be a host or an http(s) URL, got bad host!",
        "{pxl_domain: 'https://unsub.example/?x=1'}":
            "TypeError: AkUnsub: pxl_domain must be a host or an http(s) URL, got https://unsub.example/?x=1",
        "{pxl_domain: 'ftp://x'}": "TypeError: AkUnsub: pxl_domain must be a host or an http(s) URL, got ftp://x",
        "{pxl_domain: 'unsub.example:8443/u/'}": "made", "{rtoken: 'x', pxl_domain: 'https://unsub.example'}": "made",
        "undefined": "made", "null": "made", "{}": "made",
    }
    assert {o: page.evaluate(construct, o) for o in expected} == expected
    made = page.evaluate("new AkUnsub({pxl_domain: 'unsub.example:8443/u/'}).pxlDomain")
    assert made == "https://unsub.example:8443/u"
    assert page.evaluate(construct, "{pxlDomain: 'unsub.example'}") == "made"
    assert warnings == ["AkUnsub: unknown option pxlDomain (the options are rtoken and pxl_domain)"]


def load_script_again(page, url):
    """Add one more <script src=url> to the page, as a tag manager does after the page's own, and wait for it."""
    page.evaluate("""(url) => new Promise((resolve, reject) => {
        const tag = document.createElement("script");
        tag.src = url;
        tag.onload = resolve;
        tag.onerror = () => reject(new Error("the script did not load"));
        document.head.appendChild(tag);
    })""", url)


def test_the_script_loaded_twice_keeps_the_first_ones_record_of_what_was_shown(live_server, sites, open_page, r):
    """A page that loads the script a second time (a tag manager and a template each add the tag) keeps the
    AkUnsub the first load defined, and with it the record of what was shown: a later construction reads the
    state rather than showing the link again, which in delayed mode would start a new timer after "Keep my
    subscription". A load for another resource is ignored too, with a console warning naming both."""
    shop, _ = sites
    res, ident, smid, hash_id = setup(live_server, shop, "delayed")
    shop.pages["/twice.html"] = page_html(res["sdk_script_url"])
    page = open_page(shop.origin + "/none")
    posts, warnings = [], []
    page.on("request", lambda req: posts.append(req.post_data_json["action"])
            if req.method == "POST" and req.url.endswith("/unsubscribe") else None)
    page.on("console", lambda msg: warnings.append(msg.text) if msg.type == "warning" else None)
    page.goto(f"{shop.origin}/twice.html?smid={quote(smid)}")
    assert page.evaluate("run(akUnsub.ready)")["state"]["result"] == "pending"
    assert page.evaluate("run(akUnsub.cancelUnsub())")["state"]["result"] == "cancelled"
    page.evaluate("() => { window.first = AkUnsub; }")
    load_script_again(page, res["sdk_script_url"])
    assert page.evaluate("AkUnsub === first")
    again = page.evaluate("run(new AkUnsub().ready)")["state"]               # a component mounted after it
    assert (again["result"], again["pending"]) == ("waiting", None)
    assert posts == ["show", "cancel", "state"] and warnings == []
    assert r.zcard(keys.pending_due()) == 0 and not r.exists(keys.pending_unsubscribe(1, "p-42", hash_id))
    # The script of another resource: the first one loaded is kept, and the console says so.
    other = live_server.api.ok("resources/add", **email_resource(name="Other", url=shop.origin + "/"))
    load_script_again(page, other["sdk_script_url"])
    assert page.evaluate("AkUnsub === first && new AkUnsub().resourceId") == res["id"]
    assert warnings == [f"AkUnsub: this page loads the script of resource {other['id']} as well as that of resource "
                        f"{res['id']}; the first one loaded is kept: use one resource per page"]
    assert posts == ["show", "cancel", "state", "state"] and status(live_server, ident)[0] == "subscribed"


class NotTheService:
    """A web server that is not the unsubscribe service, as a wrong pxl_domain reaches one (a web site, a proxy's
    error page): answers every GET and POST with `answer` (status, content type, body) and, as a permissive
    proxy or CDN does, Access-Control-Allow-Origin: *; a preflight is allowed only when `preflight`."""

    def __init__(self, answer, preflight=True):
        self.answer, self.preflight = answer, preflight
        site = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status, content_type, body, extra=()):
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Access-Control-Allow-Origin", "*")
                for name, value in extra:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_OPTIONS(self):
                if not site.preflight:
                    return self._send(405, "text/html", "<h1>405 Not Allowed</h1>")
                self._send(204, "text/plain", "", [("Access-Control-Allow-Methods", "POST"),
                                                    ("Access-Control-Allow-Headers", "Content-Type")])

            def do_GET(self):
                self._send(*site.answer)

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._send(*site.answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("answer, preflight, status_seen", [
    ((501, "text/html", "<h1>Not Implemented</h1>"), True, 501),       # a proxy's error page, readable
    ((200, "application/json", '{"ok": true}'), True, 200),              # some other JSON API
    ((404, "text/html", "<h1>Not Found</h1>"), False, 404),              # a static site: the preflight fails,
])                                                                       # the probe reads its page
def test_an_answer_that_is_not_the_services_says_to_check_pxl_domain(live_server, sites, open_page, r, answer,
                                                                      preflight, status_seen):
    """A pxl_domain that reaches another server: the call rejects saying the answer was not the service's and to
    check pxl_domain, with a reason of its own (not "the service answered HTTP 501", nor a network error, nor,
    for a JSON answer of another kind, a resolved promise)."""
    shop, _ = sites
    res, ident, smid, _hash = setup(live_server, shop, "confirm")
    foreign = NotTheService(answer, preflight)
    try:
        shop.pages["/wrong.html"] = page_html(res["sdk_script_url"], "{pxl_domain: %r}" % foreign.origin)
        page = open_page(shop.origin + "/wrong.html")
        got = page.evaluate("(s) => akUnsub.confirmUnsub(s).then((x) => ['resolved', x], "
                            "(e) => [e.message, e.status, e.reason])", smid)
    finally:
        foreign.close()
    assert got == [f"The answer from {foreign.origin} (HTTP {status_seen}) was not the unsubscribe service's: "
                   "check pxl_domain", status_seen, "not_the_service"]
    assert status(live_server, ident)[0] == "subscribed"


def test_a_page_on_another_site_cannot_use_up_the_persons_allowance(live_server, sites, open_page, r):
    """Any site the person visits can make their browser POST to the endpoint (a text/plain POST needs no
    preflight): refused for its origin before the rate limiter counts it, it leaves the person's own page its
    whole allowance."""
    shop, other = sites
    res, ident, smid, _hash = setup(live_server, shop, "confirm")
    other.pages["/ad.html"] = "<!doctype html><title>Ad</title><p>An ad</p>"
    shop.pages["/unsubscribe.html"] = page_html(res["sdk_script_url"])
    saved = live_server.app.config["SDK_RATE_LIMIT_PER_IP"]
    live_server.app.config["SDK_RATE_LIMIT_PER_IP"] = "3 per minute"
    try:
        ad = open_page(other.origin + "/ad.html")
        sent = ad.evaluate("""([url, smid]) => Promise.all([1, 2, 3, 4, 5].map(() => fetch(url, {
            method: "POST", mode: "no-cors", body: JSON.stringify({smid: smid, action: "show"}),
        }).then(() => "sent")))""", [f"{live_server.url}/sdk/v1/{res['id']}/unsubscribe", smid])
        assert sent == ["sent"] * 5                                  # they reached the service (and got 403s)
        page = open_page(f"{shop.origin}/unsubscribe.html?smid={quote(smid)}")
        assert page.evaluate("run(akUnsub.ready)")["state"]["result"] == "waiting"
        got = page.evaluate("([s, c]) => run(akUnsub.confirmUnsub(s, c))", [smid, ["promo"]])
    finally:
        live_server.app.config["SDK_RATE_LIMIT_PER_IP"] = saved
    assert got["state"]["result"] == "unsubscribed" and status(live_server, ident) == ("subscribed",
                                                                                     ["news", "receipts"])


def test_the_rtoken_in_the_pages_url_is_not_sent(live_server, sites, open_page, r):
    """A page_url's {resource_token} is for a page that unsubscribes through its own server (the API's
    message_unsub); the resource token is a secret of that server, which the SDK never sends unless the page
    passes it as the rtoken option. An rtoken in the URL, even a stale one, changes nothing of what the SDK does."""
    shop, _ = sites
    res, ident, smid, _hash = setup(live_server, shop, "instant")
    shop.pages["/own.html"] = page_html(res["sdk_script_url"])
    page = open_page(shop.origin + "/none")
    bodies = []
    page.on("request", lambda req: bodies.append(req.post_data_json)
            if req.method == "POST" and req.url.endswith("/unsubscribe") else None)
    page.goto(f"{shop.origin}/own.html?smid={quote(smid)}&rtoken=stale-token")
    assert page.evaluate("run(akUnsub.ready)")["state"]["result"] == "unsubscribed"
    assert [sorted(body) for body in bodies] == [["action", "resource_id", "smid"]]
