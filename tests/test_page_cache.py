"""webapp/page_cache.py: an unsubscribe page filled in from its kind's kept render is the page rendered for it."""
import os

import pytest
from jinja2 import ChoiceLoader, DictLoader, meta
from markupsafe import Markup

from conftest import email_resource, form_token
from webapp import locale, page_cache, pages

TEMPLATES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "templates")


class RenderCounter:
    """Wraps page_cache's render_page: counts renders, so a page filled in from kept pieces shows as none."""

    def __init__(self):
        self.calls = 0

    def __call__(self, name, **view):
        self.calls += 1
        return locale.render_page(name, **view)


@pytest.fixture
def compared(monkeypatch):
    """Every page the unsubscribe GET fills in from a kept kind is checked against a fresh render of its view;
    yields the list of (template, rendered?) per page. Every page is made from its view here (pages.kept_page
    finds none): pages filled in without a view are tests/test_page_front.py's."""
    seen = []
    counter = RenderCounter()
    monkeypatch.setattr(page_cache, "render_page", counter)
    monkeypatch.setattr(pages, "kept_page", lambda *args: None)
    real = page_cache.render_link_page

    def checked(name, view, *inputs):
        before = counter.calls
        page = real(name, view, *inputs)
        assert page == locale.render_page(name, **view), name
        seen.append((name, counter.calls > before))
        return page
    monkeypatch.setattr(pages, "render_link_page", checked)
    return seen


def link_for(api, resource_id, profile_id, email, category="news"):
    ident = {"db_id": 1, "profile_id": profile_id, "resource_id": resource_id, "channel": "email"}
    api.ok("subscriptions/set", **ident, email=email)
    links = api.ok("messages/links", **ident, email=email, **({"category": category} if category else {}))
    return links["unsubscribe_url"].removeprefix("https://unsub.example")


# Addresses whose masked forms differ in length and in what escaping does to them.
PEOPLE = [("p-1", "ann@example.com"), ("p-2", "o'brien+news@example.com"), ("p-3", "x@sub.example.org")]


@pytest.mark.parametrize("mode", ["instant", "confirm", "blocked", "delayed"])
def test_pages_of_one_kind_are_rendered_once_and_filled_in_exactly(api, client, compared, mode):
    res = api.ok("resources/add", **email_resource(name='News & "offers" <weekly>', unsubscribe={"mode": mode}))
    paths = [link_for(api, res["id"], profile, email) for profile, email in PEOPLE]
    for query in ("", "?lang=ru", "?done=back", "?done=back&lang=ru", "?done=nonsense"):
        for path in paths:
            resp = client.get(path + query)
            assert resp.status_code == 200
            if mode == "confirm":
                assert form_token(resp.get_data(as_text=True))
    # The first person's page of each kind was rendered; the others' were filled in from it. An unknown `done`
    # is ignored (pages.DONE_WORDS): the page opened without one, whose kind is kept already.
    rendered = [was_rendered for _name, was_rendered in compared]
    assert rendered == [True, False, False] * 4 + [False] * 3


def test_a_page_after_a_change_is_a_kind_of_its_own(api, client, compared):
    res = api.ok("resources/add", **email_resource(unsubscribe={"mode": "confirm"}))
    paths = [link_for(api, res["id"], profile, email) for profile, email in PEOPLE]
    for path in paths:
        client.get(path)
    page = client.post(paths[1], data={"action": "unsubscribe", "csrf_token": form_token(client.get(paths[1]).text),
                                       "scope": "categories", "categories": ["news"]})
    assert page.status_code == 303
    html = client.get(paths[1]).get_data(as_text=True)
    assert "You are unsubscribed" in html and "o•" in html
    assert compared[-1] == ("unsubscribe/confirm.html", True)  # another state: its own render
    client.get(paths[1] + "?done=unsubscribed")
    assert client.get(paths[0]).get_data(as_text=True).count("You are unsubscribed") == 0
    assert compared[-1] == ("unsubscribe/confirm.html", False)


def test_a_countdown_is_rendered_every_time_and_keeps_no_kind(app, api, client, compared):
    res = api.ok("resources/add", **email_resource(unsubscribe={"mode": "delayed"}))
    paths = [link_for(api, res["id"], profile, email) for profile, email in PEOPLE[:2]]
    for path in paths:
        client.post(path, data={"action": "start", "csrf_token": form_token(client.get(path).text)})
    kinds = dict(page_cache.kept_kinds(app))
    for path in paths * 2:
        assert 'role="timer"' in client.get(path).text
    # Each countdown page was rendered (its deadline is this person's, its seconds this moment's), none kept.
    assert compared[-4:] == [("unsubscribe/delayed.html", True)] * 4
    assert page_cache.kept_kinds(app) == kinds


def with_templates(app, templates):
    loaders = [DictLoader(templates), app.jinja_env.loader.loader]
    app.jinja_env.loader = locale._LocalizedLoader(ChoiceLoader(loaders))


def view_of(token, address):
    return {"smid": token, "address": Markup(address), "manage_url": f"https://unsub.example/manage/{token}",
            "action_url": f"/unsubscribe/{token}?lang=en", "form_token": f"b1.{token}-mac", "state": "active"}


def test_a_template_that_reads_a_link_value_otherwise_than_printing_it_is_rendered_every_time(app):
    with_templates(app, {
        "printing.html": "<p>{{ address }} {{ state }}</p><a href='{{ manage_url }}'>{{ form_token }}</a>",
        "measuring.html": "{% if form_token|length > 12 %}long{% else %}short{% endif %} {{ form_token }}",
    })
    views = [view_of("Ab-1", "a<b>&amp;"), view_of("Cd-2-much-longer-token", "c'd")]
    with app.test_request_context("/"):
        pages_made = [page_cache.render_link_page(name, view) for name in ("printing.html", "measuring.html")
                      for view in views]
        assert pages_made == [locale.render_page(name, **view) for name in ("printing.html", "measuring.html")
                              for view in views]
        assert pages_made[0].startswith("<p>a<b>&amp; active</p><a href='https://unsub.example/manage/Ab-1'>")
        assert pages_made[2:] == ["short b1.Ab-1-mac", "long b1.Cd-2-much-longer-token-mac"]
        kinds = list(page_cache.kept_kinds(app).values())
        assert len(kinds) == 2 and kinds[1] is page_cache._UNCACHEABLE and kinds[0][1] == (
            "address", "manage_url", "form_token")


def test_markup_and_the_same_plain_text_are_two_kinds(app):
    with_templates(app, {"note.html": "{{ note }}|{{ form_token }}"})
    with app.test_request_context("/"):
        plain = page_cache.render_link_page("note.html", dict(view_of("Ab", "a"), note="<b>"))
        marked = page_cache.render_link_page("note.html", dict(view_of("Ab", "a"), note=Markup("<b>")))
    assert (plain, marked) == ("&lt;b&gt;|b1.Ab-mac", "<b>|b1.Ab-mac")


def test_kinds_kept_are_bounded(app, monkeypatch):
    monkeypatch.setattr(page_cache, "KINDS_KEPT", 3)
    with_templates(app, {"n.html": "{{ n }}"})
    with app.test_request_context("/"):
        for n in range(10):
            assert page_cache.render_link_page("n.html", dict(view_of("Ab", "a"), n=n)) == str(n)
            assert len(page_cache.kept_kinds(app)) <= 3


def test_nothing_is_kept_while_templates_reload(app):
    with_templates(app, {"n.html": "{{ n }}"})
    app.jinja_env.auto_reload = True
    with app.test_request_context("/"):
        assert page_cache.render_link_page("n.html", dict(view_of("Ab", "a"), n=1)) == "1"
    assert page_cache.kept_kinds(app) == {}


def test_the_pages_templates_read_only_their_view_and_the_globals_the_key_holds(app, api, client, monkeypatch):
    """What a kept page is keyed by must be all its templates read: nothing of the request, the session, `g` or
    the config (each could differ between two links of one kind)."""
    views = []
    real = pages.page_view
    monkeypatch.setattr(pages, "page_view", lambda *a, **k: views.append(real(*a, **k)) or views[-1])
    res = api.ok("resources/add", **email_resource(unsubscribe={"mode": "confirm"}))
    client.get(link_for(api, res["id"], "p-1", "ann@example.com"))
    globals_keyed = {"_", "gettext", "ngettext", "current_locale", "language_names", "language_href", "static_url"}
    # choice_error: only in a re-render after a form's POST, never kept; hidden, page_title: set by _layout.html
    allowed = set(views[0]) | globals_keyed | {"choice_error", "hidden", "page_title"}
    names = ["base.html"] + [f"unsubscribe/{name}" for name in os.listdir(os.path.join(TEMPLATES, "unsubscribe"))]
    for name in names:
        with open(os.path.join(TEMPLATES, name), encoding="utf-8") as f:
            read = meta.find_undeclared_variables(app.jinja_env.parse(f.read()))
        assert read <= allowed, (name, read - allowed)
