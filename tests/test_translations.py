"""Every string on the pages has a Russian translation, the compiled catalog matches its source, and the
pages compiled per language (locale.render_page) say exactly what gettext at render time would."""
import os

import pytest
from babel.messages.extract import extract_from_dir
from babel.messages.mofile import read_mo
from babel.messages.pofile import read_po

from flask import g, render_template, template_rendered
from hypothesis import given, strategies as st
from werkzeug.wrappers import Request

from conftest import ROOT, email_resource, form_token
from webapp import locale

PO = os.path.join(ROOT, "webapp", "translations", "ru", "LC_MESSAGES", "messages.po")
KEYWORDS = {"_": None, "gettext": None, "ngettext": (1, 2)}
METHODS = [("templates/**.html", "jinja2"), ("webapp/**.py", "python")]


def extracted_ids():
    ids = set()
    for _fn, _line, message, _comments, _ctx in extract_from_dir(ROOT, METHODS, keywords=KEYWORDS,
                                                                  options_map={"templates/**.html": {}}):
        ids.add(message[0] if isinstance(message, tuple) else message)
    return ids


def test_every_page_string_is_translated_to_russian():
    with open(PO, "rb") as f:
        catalog = read_po(f, locale="ru")
    ids = extracted_ids()
    assert len(ids) > 40
    missing = sorted(i for i in ids if not catalog.get(i) or not catalog.get(i).string
                     or (isinstance(catalog.get(i).string, tuple) and not all(catalog.get(i).string)))
    assert missing == [], "run pybabel extract/update and translate: " + "; ".join(missing)


def test_compiled_catalog_is_up_to_date():
    with open(PO, "rb") as f:
        source = read_po(f, locale="ru")
    with open(PO.replace(".po", ".mo"), "rb") as f:
        compiled = read_mo(f)
    def as_dict(catalog):
        return {tuple(m.id) if isinstance(m.id, (list, tuple)) else m.id:
                tuple(m.string) if isinstance(m.string, (list, tuple)) else m.string for m in catalog if m.id}
    assert as_dict(source) == as_dict(compiled)


def visit_every_page(client, api, pages):
    """GET every page in every language, including a resource name that needs escaping and the pages after a
    change; returns what render_page rendered: [(template name, context)]."""
    res = api.ok("resources/add", **email_resource(name='<b>"Tom & Jerry\'s" 100%</b>', unsubscribe={"mode": "confirm"}))
    ident = {"db_id": 1, "profile_id": "p-esc", "resource_id": res["id"], "channel": "email", "email": "e@example.com"}
    api.ok("subscriptions/set", **ident)
    escaped = api.ok("messages/links", **ident)["unsubscribe_url"].removeprefix("https://unsub.example")
    html = client.get(pages["unsubscribe-instant"]).get_data(as_text=True)
    csrf = form_token(html)
    captured = []

    def keep(sender, template, context, **extra):
        captured.append((template.name, dict(context)))

    with template_rendered.connected_to(keep, client.application):
        for path in [*pages.values(), escaped]:
            for lang in locale.LOCALES:
                client.get(f"{path}?lang={lang}")
        client.post(pages["unsubscribe-instant"], data={"action": "unsubscribe", "csrf_token": csrf})
        for lang in locale.LOCALES:
            client.get(f"{pages['unsubscribe-instant']}?done=unsubscribed&lang={lang}")
    return captured


def test_pages_compiled_per_language_match_gettext_at_render_time(app, client, api, pages):
    captured = visit_every_page(client, api, pages)
    names = {name for name, _ in captured}
    assert {f"{lang}:{page}" for lang in locale.LOCALES
            for page in ("unsubscribe/instant.html", "unsubscribe/confirm.html", "unsubscribe/blocked.html",
                         "unsubscribe/delayed.html", "manage.html", "message.html")} <= names
    with app.test_request_context():
        added_by_flask = {}
        app.update_template_context(added_by_flask)  # g, request, session, csrf_token, current_locale, ...
    seen = {}
    for name, context in captured:
        lang, _, plain = name.partition(locale.LOCALE_MARK)
        view = {k: v for k, v in context.items() if k not in added_by_flask}
        with app.test_request_context():
            g.locale = lang
            compiled = render_template(name, **view)
            assert compiled == render_template(plain, **view), name  # the same request: the same CSRF token
        seen.setdefault(plain, {})[lang] = compiled
    confirm = seen["unsubscribe/confirm.html"]
    assert "Подтвердить отписку" in confirm["ru"] and "Confirm unsubscribe" in confirm["en"]
    assert "&lt;b&gt;&#34;Tom &amp; Jerry&#39;s&#34; 100%&lt;/b&gt;" in confirm["ru"] + confirm["en"]


def test_compiled_pages_do_not_look_up_constant_strings_when_rendering(client, pages, monkeypatch):
    lookups = []
    real = locale._translations
    monkeypatch.setattr(locale, "_translations", lambda: lookups.append(1) or real())
    html = client.get(pages["unsubscribe-confirm"] + "?lang=ru").get_data(as_text=True)
    assert "Подтвердить отписку" in html and lookups == []
    html = client.get(pages["unsubscribe-delayed"] + "?lang=ru").get_data(as_text=True)
    assert "минут" in html and lookups  # ngettext (plural forms) still asks the catalog when rendering


def test_compiled_translation_keeps_gettext_escaping():
    """newstyle gettext treats the translation as markup and escapes only the values (and always applies %)."""
    from jinja2 import Environment

    class Catalog:
        def ugettext(self, text):
            return {"Hi %(name)s": "Привет, <b>%(name)s</b> & 100%%", "Done.": "Готово &amp; <i>всё</i>."}[text]

    env = Environment(autoescape=True, extensions=["jinja2.ext.i18n"])
    env.install_gettext_callables(Catalog().ugettext, lambda s, p, n: s, newstyle=True)
    source = '{{ _("Hi %(name)s", name=who) }}|{{ _("Done.") }}|{{ "x" ~ _("Done.") }}|{{ current_locale() }}'
    at_render = env.from_string(source).render(who="<Tom & 'Jerry'>", current_locale=lambda: "ru")
    compiled = env.from_string(locale._TranslateConstants(Catalog(), "ru").visit(env.parse(source)))
    assert compiled.render(who="<Tom & 'Jerry'>") == at_render  # current_locale() is the copy's language
    assert at_render.endswith("|ru")
    assert at_render.startswith("Привет, <b>&lt;Tom &amp; &#39;Jerry&#39;&gt;</b> & 100%|Готово &amp; <i>всё</i>.|")


@pytest.mark.parametrize("header,expected", [
    ("ru-RU,en;q=0.5", "ru"), ("en-GB,ru;q=0.5", "en"), ("ru-RU,en-US;q=0.8,en;q=0.7", "ru"),
    ("en-US,ru;q=0.9", "en"), ("de-DE,ru;q=0.3,en;q=0.2", "ru"), ("RU_ru", "ru"), ("ru;q=0,en;q=0.1", "en"),
    ("de,fr;q=0.9", None), ("*", None), ("", None),
])
def test_browser_locale_follows_the_browsers_order_of_preference(header, expected):
    assert locale.browser_locale(header) == expected
    assert locale.choose_locale(None, None, None, header, "en") == (expected or "en")


@given(st.text(alphabet="enruENRUdefr-_;=q0.15 ,*x", max_size=40))
def test_browser_locale_is_the_first_wanted_language_we_have(header):
    wanted = Request.from_values(headers={"Accept-Language": header}).accept_languages  # highest quality first
    ours = [tag.replace("_", "-").split("-")[0].lower() for tag, q in wanted if q > 0]
    assert locale.browser_locale(header) == next((t for t in ours if t in locale.LOCALES), None)


def test_russian_says_what_happened_to_the_subscription_in_plain_words(app, client, api, pages):
    """The badge describes the subscription, as "Подписка активна" does; the empty choice says what to choose;
    the 405 page reads naturally; a push channel is named in Russian."""
    from webapp import manager
    res = api.ok("resources/add", **email_resource(unsubscribe={"mode": "confirm"}))
    ident = {"db_id": 1, "profile_id": "p-ru", "resource_id": res["id"], "channel": "email", "email": "e@example.com"}
    api.ok("subscriptions/set", **ident, status="unsubscribed")
    links = api.ok("messages/links", **ident)
    html = client.get(links["manage_url"].removeprefix("https://unsub.example") + "?lang=ru").get_data(as_text=True)
    assert '<span class="badge unsubscribed">Подписка отменена</span>' in html
    api.ok("subscriptions/set", **ident, status="subscribed")
    path = links["unsubscribe_url"].removeprefix("https://unsub.example")
    token = form_token(client.get(path + "?lang=ru").get_data(as_text=True))
    resp = client.post(path, data={"action": "unsubscribe", "scope": "categories", "csrf_token": token, "lang": "ru"})
    assert "Отметьте хотя бы один вид сообщений, которые больше не присылать." in resp.get_data(as_text=True)
    assert "Так эту страницу использовать нельзя" in client.put(path + "/?lang=ru").get_data(as_text=True)
    with app.test_request_context("/?lang=ru"):
        locale.set_page_locale()
        assert manager.channel_label("push") == "Push-уведомления" and manager.channel_label("viber") == "Viber"
