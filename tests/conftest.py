"""Shared fixtures: one real redis-server per session (unix socket in a temp dir), flushed before each test;
the Flask app built against it; an ApiActions helper that posts to the API and unwraps the envelope."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import redis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from webapp import create_app  # noqa: E402

API_TOKEN = "test-api-token"
SIGNING_KEYS = "t1:test-secret-one"


def start_redis_server(workdir, appendonly=False, port=0, extra=(), wait=True):
    """Start redis-server on a unix socket (and a TCP port when port != 0); return (process, url) once it
    answers (wait=False: once its socket exists, e.g. while it is still loading its data)."""
    if shutil.which("redis-server") is None:
        pytest.exit("redis-server is not installed: apt-get install redis-server", returncode=3)
    sock = os.path.join(workdir, "redis.sock")
    args = ["redis-server", "--port", str(port), "--unixsocket", sock, "--unixsocketperm", "700",
            "--dir", workdir, "--save", "", "--appendonly", "yes" if appendonly else "no",
            "--appendfsync", "everysec", "--daemonize", "no", "--loglevel", "warning", *extra]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"unix://{sock}"
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            if (not wait and os.path.exists(sock)) or redis.Redis.from_url(url).ping():
                return proc, url
        except (redis.ConnectionError, FileNotFoundError):
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError("redis-server did not start")


@pytest.fixture(scope="session")
def redis_url():
    workdir = tempfile.mkdtemp(prefix="us-redis-")
    proc, url = start_redis_server(workdir)
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def r(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushall()
    yield client
    client.close()


def close_clients(app):
    """Close the Redis connections an app opened (else they are garbage-collected open: ResourceWarning)."""
    client = app.extensions.pop("redis", None)
    if client is not None:
        client.close()
    queue = app.extensions.pop("timer_queue", None)
    if queue is not None:
        queue.connection.close()


@pytest.fixture
def app(r, redis_url, tmp_path):
    application = create_app({"TESTING": True, "REDIS_URL": redis_url, "API_TOKEN": API_TOKEN,
                              "SIGNING_KEYS": SIGNING_KEYS, "PUBLIC_BASE_URL": "https://unsub.example",
                              "VAR_DIR": str(tmp_path), "TIME_UNIT_SECONDS": 1})
    yield application
    close_clients(application)


@pytest.fixture
def client(app):
    return app.test_client()


class ApiActions:
    """Post to /api/v1.1/<path> with the token and unwrap the envelope."""

    def __init__(self, client):
        self.client = client

    def call(self, path, token=API_TOKEN, **body):
        if token is not None:
            body["token"] = token
        return self.client.post(f"/api/v1.1/{path}", json=body)

    def ok(self, path, **body):
        resp = self.call(path, **body)
        payload = resp.get_json()
        assert resp.status_code == 200, payload
        assert payload["error"] == 0 and payload["error_text"] == "Successful operation", payload
        return payload["data"]

    def fail(self, path, expect=400, **body):
        resp = self.call(path, **body)
        payload = resp.get_json()
        assert resp.status_code == expect, payload
        assert payload["error"] != 0 and payload["error_text"], payload
        return payload["error_text"]


@pytest.fixture
def api(client):
    return ApiActions(client)


@pytest.fixture
def pages(api):
    """The path of every page a person can reach, by name (one resource per unsubscribe mode)."""
    out = {}
    for mode in ("instant", "confirm", "blocked", "delayed"):
        res = api.ok("resources/add", **email_resource(name=mode, unsubscribe={"mode": mode}))
        ident = {"db_id": 1, "profile_id": "p-42", "resource_id": res["id"], "channel": "email",
                 "email": f"{mode}@example.com"}
        api.ok("subscriptions/set", **ident)
        links = api.ok("messages/links", **ident)
        out[f"unsubscribe-{mode}"] = links["unsubscribe_url"].removeprefix("https://unsub.example")
        out["manage"] = links["manage_url"].removeprefix("https://unsub.example")
    out["bad-link"] = "/unsubscribe/nope"
    out["bad-manager"] = "/manage/nope"
    return out


TELEMETRY_PREFIXES = ("us:views:", "us:ratelimit:")


def read_key(r, key, scores=True, stream_ids=True):
    """(type, content) of one key; without scores/stream_ids the parts that carry times are left out."""
    kind = r.type(key)
    if kind == "string":
        value = r.get(key)
    elif kind == "hash":
        value = r.hgetall(key)
    elif kind == "list":
        value = r.lrange(key, 0, -1)
    elif kind == "set":
        value = sorted(r.smembers(key))
    elif kind == "zset":
        value = r.zrange(key, 0, -1, withscores=scores)
    elif kind == "stream":
        value = r.xrange(key) if stream_ids else [fields for _id, fields in r.xrange(key)]
    else:
        value = None
    return kind, value


def round_trips(monkeypatch):
    """What each round trip to Redis sent (a command, or a pipeline's commands together), as it goes."""
    sends = []
    real_send = redis.connection.AbstractConnection.send_packed_command
    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command",
                        lambda self, command, *a, **k: sends.append(
                            command if isinstance(command, bytes) else b"".join(command))
                        or real_send(self, command, *a, **k))
    return sends


def redis_state(r):
    """Every key with its type and content: compare before/after to prove nothing was written.
    Telemetry keys (page-view counters, rate-limit counters) are left out: they are not subscription state."""
    return {key: read_key(r, key) for key in r.scan_iter(count=1000) if not key.startswith(TELEMETRY_PREFIXES)}


def snapshot(r):
    """Every key's DUMP and TTL, to run two code paths from the same Redis state (see restore)."""
    return {k: (r.dump(k), r.pttl(k)) for k in r.scan_iter(count=1000)}


def restore(r, snap):
    r.flushall()
    for key, (blob, ttl) in snap.items():
        r.restore(key, max(ttl, 0), blob, replace=True)


# Members that differ between two runs of the same change: event ids, times and hashes.
VOLATILE = ("id", "at", "updated_at", "hash", "prev_hash", "seconds_since_send")


def normalized(value):
    """value with JSON inside strings parsed and VOLATILE members replaced by "*"."""
    if isinstance(value, str) and value[:1] == "{":
        try:
            return normalized(json.loads(value))
        except ValueError:
            return value
    if isinstance(value, dict):
        return {k: ("*" if k in VOLATILE else normalized(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [normalized(v) for v in value]
    return value


def long_form(key, kind, value):
    """Stored subscription records and ledger events as the code works with them (their stored forms use
    one-letter names that would hide what VOLATILE names)."""
    from webapp.events import decode_event
    from webapp.subscriptions import decode_record
    if key.endswith(":subs") and kind == "hash":
        return {h: decode_record(v) for h, v in value.items()}
    if key.endswith(":events") and kind == "list":
        return [decode_event(v) for v in value]
    return value


def same_state(r):
    """Every key, normalized: equal for two code paths that made the same changes."""
    out = {}
    for key in r.scan_iter(count=1000):
        if key.startswith("rq:"):  # RQ's own (binary) job keys
            continue
        kind, value = read_key(r, key, scores=False, stream_ids=False)
        out[key] = (kind, normalized(long_form(key, kind, value)), r.ttl(key) > 0)
    return out


# Newest ledger entries as damaged storage leaves them: not JSON (an empty string too: an entry, not an empty
# ledger), JSON that is not an object, an object that is not an event (no seq, no hash). A change after one is
# still applied, chained past it (events.chain_tip).
DAMAGED_ENTRIES = ["{not json", "[]", "{}", ""]


def damage_newest_entry(r, profile_id, text, db_id=1):
    """Overwrite the profile's newest ledger entry with `text`; return the ledger's key."""
    key = f"us:{{{db_id}:{profile_id}}}:events"
    r.lset(key, -1, text)
    return key


def chained_past(damaged):
    """The prev_hash of the event after a damaged entry: the SHA-256 of its stored text."""
    return hashlib.sha256(damaged.encode()).hexdigest()


def form_token(html):
    """The CSRF token of the first form on a page (its hidden csrf_token field)."""
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def back_link(html):
    """The way back an answer page offers (message.html's): (href, its words), or None."""
    link = re.search(r'<p class="back"><a href="([^"]+)">([^<]+)</a>', html)
    return link and (link.group(1).replace("&amp;", "&"), link.group(2))


def refuse_form(app, client, url, form, status, **request):
    """Post a link's form to `url` so that it is refused before anything is read or changed: 413, its body over
    PAGE_BODY_LIMIT_BYTES, or 429, over the forms' limit per link (set to one, spent by a form with an action no
    page has, which changes nothing either). `request`: more for client.post (headers). Returns the refusal."""
    if status == 413:
        form = {**form, "pad": "a" * app.config["PAGE_BODY_LIMIT_BYTES"]}
    else:
        app.config["PAGE_RATE_LIMIT_PER_LINK"] = "1 per minute"
        assert client.post(url, data={**form, "action": "no-such-action"}, **request).status_code == 400
    resp = client.post(url, data=form, **request)
    assert resp.status_code == status, (url, resp.status_code)
    return resp


def email_resource(**overrides):
    """A typical resource as resources/add takes it (the contract's example)."""
    body = {
        "name": "Weekly news", "description": "", "url": "https://shop.example", "urls": ["https://promo.example"],
        "dbs_ids": [1], "trk_domain": "t.shop.example", "increase_priority": True,
        "categories": [{"title": "News", "api_name": "news", "in_manager": True, "required": False},
                       {"title": "Receipts", "api_name": "receipts", "in_manager": True, "required": True}],
        "channels": ["email", "sms"],
        "channel_settings": {
            "email": {"from_name": "Shop", "from_email": "news@shop.example", "replyto_name": "",
                      "replyto_email": "", "list_id": "weekly.shop.example",
                      "fields": [{"title": "Plan", "api_name": "plan", "type": "line", "default": "free",
                                  "required": False, "in_manager": True}]},
            "sms": {"sender": "SHOP", "fields": []}},
        "unsubscribe": {"mode": "delayed", "timer_minutes": 10, "page_url": None, "blocked_text": None,
                        "list_unsubscribe": {"enabled": True, "called_url": None}},
    }
    body.update(overrides)
    return body


@pytest.fixture
def resource(api):
    return api.ok("resources/add", **email_resource())


@pytest.fixture
def subscription(api, resource):
    return api.ok("subscriptions/set", db_id=1, profile_id="p-42", resource_id=resource["id"],
                  channel="email", email="ann@example.com")


# -- live server and Chromium (browser tests) ---------------------------------------------------------------

ARTIFACTS = os.path.join(ROOT, "test-artifacts")
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class LiveServer:
    """The app served by a threaded werkzeug server on 127.0.0.1 (a real socket the browser can reach)."""

    def __init__(self, app, server):
        self.app, self.server = app, server
        self.url = f"http://127.0.0.1:{server.server_port}"
        self.api = ApiActions(app.test_client())


def serve_in_thread(app):
    import threading

    from werkzeug.serving import make_server
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


@pytest.fixture(scope="session")
def live_server(redis_url, tmp_path_factory):
    app = create_app({"TESTING": True, "REDIS_URL": redis_url, "API_TOKEN": API_TOKEN,
                      "SIGNING_KEYS": SIGNING_KEYS, "VAR_DIR": str(tmp_path_factory.mktemp("live")),
                      "TIME_UNIT_SECONDS": 1, "PUBLIC_BASE_URL": "http://127.0.0.1:1"})
    server = serve_in_thread(app)
    live = LiveServer(app, server)
    app.config["PUBLIC_BASE_URL"] = live.url   # links are built per request from the config
    yield live
    server.shutdown()
    close_clients(app)


def person_browser_args():
    """Launch flags that make headless Chromium look like a person's browser to the page: no
    navigator.webdriver and no "HeadlessChrome" in the user agent. Pages and the SDK leave alone a page an
    automation drives (a link scanner's): tests/test_scanner_browser.py opens pages that way on purpose."""
    version = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True, check=True).stdout.split()[1]
    agent = (f"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
             f"Chrome/{version.split('.')[0]}.0.0.0 Safari/537.36")
    return ["--disable-blink-features=AutomationControlled", f"--user-agent={agent}"]


@pytest.fixture(scope="session")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.exit(f"Chromium is not installed at {CHROMIUM}: apt-get install chromium", returncode=3)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + person_browser_args())
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser, r):
    """open_page(url, lang="en", mobile=False) -> a Playwright page in a fresh context (no cookies)."""
    contexts = []

    def open_(url, lang="en", mobile=False):
        size = {"width": 390, "height": 844} if mobile else {"width": 1024, "height": 768}
        ctx = browser.new_context(locale=lang, viewport=size, extra_http_headers={"Accept-Language": lang})
        contexts.append(ctx)
        page = ctx.new_page()
        page.goto(url)
        return page

    yield open_
    for ctx in contexts:
        ctx.close()


def screenshot(page, name):
    """Save a full-page PNG under test-artifacts/screens/ (looked at by people, kept by CI)."""
    folder = os.path.join(ARTIFACTS, "screens")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.png")
    page.screenshot(path=path, full_page=True)
    return path


@pytest.fixture
def receiver():
    """A real HTTP server on 127.0.0.1 that records webhook deliveries."""
    from receiver import Receiver
    rec = Receiver()
    yield rec
    rec.close()


def pytest_terminal_summary(terminalreporter):
    fuzz = sys.modules.get("test_fuzz")
    if fuzz is not None and fuzz.GENERATED["requests"]:
        terminalreporter.write_line(f"fuzz: {fuzz.GENERATED['requests']} generated requests "
                                    f"(FUZZ_EXAMPLES={fuzz.EXAMPLES})")

