"""front.py's page GET, and pages filled in from a kind kept under what their views are made of
(pages.page_kind_inputs, page_cache.kept_kind): from the same Redis state, every GET answered through the
front gives the status, headers and body, and leaves the keys, that Flask gives rendering every page from its
view; the front answers only pages of a kind kept already and leaves every other GET to Flask."""
import pytest
import redis
from werkzeug.test import Client

from conftest import email_resource, form_token, restore, same_state, snapshot
from webapp import hotpaths, locale, pages

BASE = "https://unsub.example"


def subscribe(api, resource_id, profile_id, category="news", channel="email", **record):
    """A subscription and the unsubscribe path of a message sent for `category`."""
    ident = {"db_id": 1, "profile_id": profile_id, "resource_id": resource_id, "channel": channel}
    address = {"email": f"{profile_id}@example.com"} if channel == "email" else {"phone": "+79001234567"}
    api.ok("subscriptions/set", **ident, **address, **record)
    links = api.ok("messages/links", **ident, **address, **({"category": category} if category else {}))
    return links["unsubscribe_url"].removeprefix(BASE)


def people(api, count, mode="confirm", resource=None, **record):
    res = api.ok("resources/add", **email_resource(**{"unsubscribe": {"mode": mode}, **(resource or {})}))
    return res, [subscribe(api, res["id"], f"p-{i}", **record) for i in range(count)]


def unsubscribed_on_its_page(client, path):
    token = form_token(client.get(path).get_data(as_text=True))
    assert client.post(path, data={"action": "unsubscribe", "csrf_token": token, "scope": "all"}).status_code == 303


def crowd(api, client):
    """People of one resource in every state a page shows, languages and channels mixed."""
    categories = email_resource()["categories"]
    res = api.ok("resources/add", **email_resource(unsubscribe={"mode": "confirm"}, categories=categories + [
        {"title": "Offers", "api_name": "offers", "in_manager": True, "required": False}]))
    rid = res["id"]
    paths = [subscribe(api, rid, "c-0"), subscribe(api, rid, "c-1"), subscribe(api, rid, "c-2", category=None),
             subscribe(api, rid, "c-3", cats=["receipts"]), subscribe(api, rid, "c-4", cats=["receipts"]),
             subscribe(api, rid, "c-5", status="suspended"), subscribe(api, rid, "c-6", status="unconfirmed"),
             subscribe(api, rid, "c-7", status="complained"), subscribe(api, rid, "c-8", status="complained"),
             subscribe(api, rid, "c-9", locale="ru"), subscribe(api, rid, "c-10", locale="ru"),
             subscribe(api, rid, "c-11", channel="sms"), subscribe(api, rid, "c-12", channel="sms"),
             subscribe(api, rid, "c-13", category="receipts"), subscribe(api, rid, "c-14", category="receipts"),
             subscribe(api, rid, "c-15", category="offers"), subscribe(api, rid, "c-16", category="offers"),
             subscribe(api, rid, "c-17"), subscribe(api, rid, "c-18")]
    unsubscribed_on_its_page(client, paths[17])  # its page shows Undo
    unsubscribed_on_its_page(client, paths[18])
    # A category the sender deleted since its message was sent: that message stands for the whole subscription.
    api.ok("resources/update", id=rid, categories=categories, delete_categories=["offers"])
    return [(path, "", {}) for path in paths] * 2


def forged(path):
    """The link with a character in the middle of its token changed (each of those carries 6 bits of it)."""
    middle = len(path) - len(path.rsplit("/", 1)[1]) // 2
    return path[:middle] + ("B" if path[middle] == "A" else "A") + path[middle + 1:]


def deleted_resource(api):
    res, paths = people(api, 1)
    api.ok("resources/delete", id=res["id"])
    return [(paths[0], "", {})]


def mixed(api, asks):
    """GETs of the links of two people in turn, each with its (query, headers[, app root])."""
    _res, paths = people(api, 2)
    return [(paths[i % 2], *ask) for i, ask in enumerate(asks)]


def renamed_between(api, client):
    res, paths = people(api, 3)

    def rename():
        api.ok("resources/update", id=res["id"], name="Renamed news")
    return [(paths[0], "", {}), rename, (paths[1], "", {}), (paths[2], "", {})]


def two(api, client, mode="confirm", suffixes=("", ""), query="", headers=None, **kw):
    _res, paths = people(api, 2, mode, **kw)
    return [(path + suffix, query, headers or {}) for path, suffix in zip(paths, suffixes)]


# name -> (requests made of the API and client: [(path, query, headers)], which of them the front answers)
CASES = {
    "confirm": (lambda api, client: two(api, client), [False, True]),
    "instant": (lambda api, client: two(api, client, "instant"), [False, True]),
    "blocked": (lambda api, client: two(api, client, "blocked"), [False, True]),
    "delayed, no timer": (lambda api, client: two(api, client, "delayed"), [False, True]),
    "the switcher's ?lang=ru": (lambda api, client: two(api, client, query="lang=ru"), [False, True]),
    "an unknown ?lang=": (lambda api, client: two(api, client, query="lang=fr"), [False, False]),
    "Accept-Language: ru": (lambda api, client: two(api, client, headers={"Accept-Language": "ru-RU,en;q=0.5"}),
                            [False, True]),
    "a Russian resource": (lambda api, client: two(api, client, resource={"default_locale": "ru"}),
                           [False, True]),
    "a Russian profile": (lambda api, client: two(api, client, locale="ru"), [False, True]),
    "a message without a category": (lambda api, client: two(api, client, category=None), [False, True]),
    "phones": (lambda api, client: two(api, client, channel="sms"), [False, True]),
    "what mail clients leave after links": (lambda api, client: two(api, client, suffixes=(">", "/index.html")),
                                            [False, True]),
    "?done=back goes to Flask": (lambda api, client: two(api, client, query="done=back"), [False, False]),
    "?done=back after a plain page": (lambda api, client: mixed(api, [("", {}), ("done=back", {}), ("", {})]),
                                      [False, False, True]),
    "languages mixed": (lambda api, client: mixed(api, [("", {"Accept-Language": "ru"}), ("", {}), ("lang=ru", {}),
                                                        ("lang=en", {"Accept-Language": "ru"})]),
                        [False, False, True, True]),
    "two resources": (lambda api, client: [*two(api, client)[:1], *two(api, client, resource={"name": "Offers"})[:1]],
                      [False, False]),
    "a resource renamed between two pages": (lambda api, client: renamed_between(api, client), [False, False, True]),
    # In a new process: the page's kind is kept, the spoken form of an address not looked up yet in its language.
    "spoken forms not looked up yet": (lambda api, client: [*(ask := two(api, client))[:1], pages._SAID.clear,
                                                            *ask[1:], ask[0]], [False, False, True]),
    "under an app root": (lambda api, client: mixed(api, [("", {}, "/unsub"), ("", {}, "/unsub"), ("", {}),
                                                          ("", {}, "/unsub/")]),
                          [False, True, False, True]),
    "a query of more goes to Flask": (lambda api, client: two(api, client, query="lang=ru&x=1"), [False, False]),
    "page_url redirects": (lambda api, client: two(api, client, resource={"unsubscribe": {
        "mode": "confirm", "page_url": "https://shop.example/bye?smid={send_message_id}"}}), [False, False]),
    "forged link": (lambda api, client: [(forged(path), "", {}) for path in people(api, 1)[1]], [False]),
    "resource deleted": (lambda api, client: deleted_resource(api), [False]),
    # Each person's page twice, in turn: a kind's first page comes from Flask; a page whose message's category
    # has stopped (c-3, c-4: it may show an Undo) or that shows one (c-17, c-18) always does.
    "a crowd in every state": (crowd, [False, True, False, False, False, False, False, False, True, False, True,
                                       False, True, False, True, False, True, False, False]
                               + [True, True, True, False, False] + [True] * 12 + [False, False]),
}


def answers(wsgi, requests):
    """The GETs' answers; a request that is a function is a change made between them (nothing answered)."""
    out = []
    for request in requests:
        if callable(request):
            request()
            continue
        path, query, headers, *root = request  # root: the app's root (SCRIPT_NAME), "" unless given
        resp = Client(wsgi).get(path, query_string=query, headers=headers, base_url=BASE + "".join(root))
        out.append((resp.status, list(resp.headers), resp.get_data()))
    return out


@pytest.mark.parametrize("name", CASES)
def test_the_front_answers_a_page_get_exactly_as_flask_renders_it(app, api, client, r, monkeypatch, name):
    make, in_front = CASES[name]
    requests = make(api, client)
    front = app.extensions["front"]
    flask_wsgi = front.flask_wsgi
    answered_by_flask = []

    def counting(environ, start_response):
        answered_by_flask.append(True)
        return flask_wsgi(environ, start_response)

    snap = snapshot(r)
    for kept in ("page_kinds", "page_kinds_by_inputs"):
        app.extensions.pop(kept, None)
    through_front = []
    for request in requests:
        answered_by_flask.clear()
        monkeypatch.setattr(front, "flask_wsgi", counting)
        through_front += [(answer, not answered_by_flask) for answer in answers(front, [request])]
    after_front = same_state(r)
    monkeypatch.undo()
    restore(r, snap)
    monkeypatch.setattr(pages, "kept_page", lambda *args: None)
    monkeypatch.setattr(pages, "render_link_page", lambda name, view, *inputs: locale.render_page(name, **view))
    rendered = answers(flask_wsgi, requests)
    assert [answer for answer, _ in through_front] == rendered
    assert same_state(r) == after_front  # the views counted once each, nothing else written
    assert [by_front for _, by_front in through_front] == in_front


def test_a_read_the_front_could_not_make_is_answered_by_flask_without_reading_again(api, client, monkeypatch):
    _res, paths = people(api, 2)
    client.get(paths[0])  # the kind kept
    reads = []

    def unavailable(*args):
        reads.append(args)
        raise redis.ConnectionError("Redis went away")
    monkeypatch.setattr(hotpaths, "open_for_page", unavailable)
    resp = client.get(paths[1])
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "5"
    assert resp.headers["Cache-Control"] == "no-store"
    assert len(reads) == 1  # the view answered what the front's read raised


def test_a_countdown_is_never_answered_in_front(app, api, client, monkeypatch):
    _res, paths = people(api, 2, "delayed")
    for path in paths:
        client.post(path, data={"action": "start", "csrf_token": form_token(client.get(path).text)})
    front = app.extensions["front"]
    flask_wsgi, by_flask = front.flask_wsgi, []
    monkeypatch.setattr(front, "flask_wsgi", lambda environ, start: by_flask.append(1) or flask_wsgi(environ, start))
    for path in paths * 2:
        assert 'role="timer"' in client.get(path).text
    assert len(by_flask) == 4


def test_an_error_after_the_fronts_read_is_left_to_flask(api, client, monkeypatch):
    """Whatever fails in the front once it has read goes to the view with that read, which meets it again (and
    the app answers and logs it as any error) or not: never an answer the app did not make."""
    _res, paths = people(api, 2)
    client.get(paths[0])  # the kind kept
    expected = client.get(paths[1], query_string="x=1")  # Flask's view, filled in from the kind
    reads, kept_page, calls = [], pages.kept_page, []
    open_for_page = hotpaths.open_for_page
    monkeypatch.setattr(hotpaths, "open_for_page", lambda *args: reads.append(1) or open_for_page(*args))

    def failing_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in the front's part")
        return kept_page(*args)
    monkeypatch.setattr(pages, "kept_page", failing_once)
    resp = client.get(paths[1])
    assert resp.status_code == 200 and resp.data == expected.data
    assert (len(reads), len(calls)) == (1, 2)
