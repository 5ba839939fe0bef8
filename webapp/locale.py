"""Page language: an explicit choice, then the profile's language, then the resource default, then the
browser's Accept-Language, then DEFAULT_LOCALE. Translations are gettext catalogs under
webapp/translations (Flask-Babel).

Pages are rendered with `render_page`, which renders one compiled copy of the template per language: the
constant `_("...")` strings are translated when the template is compiled (PageEnvironment), not looked up on
every render. Plurals (`ngettext`) and `_()` of a variable still go through Flask-Babel at render time.
"""
import functools
import os

from datetime import datetime, timezone

from flask import current_app, g, render_template, request
from flask.templating import Environment
from babel import Locale
from flask_babel import Babel, force_locale, format_date, format_time, get_translations
from jinja2 import BaseLoader, nodes
from markupsafe import Markup
from jinja2.visitor import NodeTransformer
from werkzeug.exceptions import HTTPException
from werkzeug.datastructures import LanguageAccept
from werkzeug.http import parse_accept_header

LOCALES = ("en", "ru")
LANGUAGE_NAMES = {"en": "English", "ru": "Русский"}
_BABEL_LOCALES = {code: Locale.parse(code) for code in LOCALES}  # parsed once (Locale.parse stats data files)


def choose_locale(explicit=None, profile=None, resource_default=None, accept_language=None, default="en"):
    """Pure form of the choice order; `accept_language` is the browser's Accept-Language header (or None),
    parsed only when the choice comes down to it."""
    for candidate in (explicit, profile, resource_default):
        if candidate in LOCALES:
            return candidate
    best = browser_locale(accept_language) if accept_language else None
    return best or (default if default in LOCALES else "en")


@functools.lru_cache(maxsize=128)
def browser_locale(accept_language):
    """The first of the browser's languages, in its order of preference, that is one of LOCALES (by primary
    subtag: ru-RU is ru), or None; remembered per header text (browsers send few distinct ones; parsing was a
    twentieth of a page view). Not werkzeug's best_match: it tries every exact tag before any primary subtag,
    so "ru-RU,en;q=0.5" chose English."""
    for tag, quality in parse_accept_header(accept_language, LanguageAccept):  # highest quality first
        primary = tag.replace("_", "-").split("-", 1)[0].lower()
        if quality > 0 and primary in LOCALES:
            return primary
    return None


def request_accept_language():
    return request.environ.get("HTTP_ACCEPT_LANGUAGE")


def explicit_locale():
    """The language the person picked with the switcher (?lang=) or kept in a form field."""
    args = request.args  # `in` first: werkzeug's get() of a missing key builds and catches an exception
    value = args["lang"] if "lang" in args else None
    if not value and request.method == "POST":
        try:
            form = request.form
        except HTTPException:  # a body over MAX_CONTENT_LENGTH: the 413 page is rendered without it
            form = {}
        value = form["lang"] if "lang" in form else None
    return value if value in LOCALES else None


def set_page_locale(profile=None, resource_default=None):
    """Decide this request's language from page data; views call it before rendering."""
    locale = g.locale = choose_locale(explicit_locale(), profile, resource_default, request_accept_language(),
                                      current_app.config["DEFAULT_LOCALE"])
    return locale


def page_locale():
    """This request's page language: the one a view chose (set_page_locale), else chosen now without page data."""
    if "locale" not in g:
        set_page_locale()
    return g.locale


def _translations():
    """flask_babel.get_translations(), remembered for the request's locale and domain.

    Flask-Babel's Jinja gettext looks the catalog up again for every string, several context-local lookups
    each; a page has a dozen strings (a third of the unsubscribe page's render time). Flask-Babel keeps the
    request's locale and domain objects in its namespace on `g` once looked up, so the catalog is kept next to
    them and reused while they are the same objects (refresh() and force_locale() replace them)."""
    ns = g.get("_flask_babel") if g else None
    if ns is not None:
        cached = getattr(ns, "us_translations", None)
        if (cached is not None and cached[0] is getattr(ns, "babel_locale", None)
                and cached[1] is getattr(ns, "babel_domain", None)):
            return cached[2]
    translations = get_translations()
    ns = g.get("_flask_babel") if g else None
    locale = getattr(ns, "babel_locale", None)
    if locale is not None:
        ns.us_translations = (locale, getattr(ns, "babel_domain", None), translations)
    return translations


LOCALE_MARK = ":"  # "ru:unsubscribe/confirm.html" is unsubscribe/confirm.html compiled in Russian


def render_page(template_name, **context):
    """flask.render_template of the copy of `template_name` compiled in this request's language."""
    return render_template(f"{page_locale()}{LOCALE_MARK}{template_name}", **context)


class _TranslateConstants(NodeTransformer):
    """Replaces `_("constant", name=value, ...)` with what Jinja's newstyle gettext computes at render time:
    Markup(translation) % {name: value} when autoescaping (so values are escaped, the translation is not), else
    the plain str % dict. Without variables that is a constant, which Jinja folds into the template's text.
    `current_locale()` becomes the copy's language: render_page renders the copy of the request's language (a
    template function call costs about as much as rendering a line of the page)."""

    def __init__(self, translations, locale):
        self.translations = translations
        self.locale = locale

    def visit_Concat(self, node):
        return node  # Jinja folds a constant `a ~ b` with str(), which would drop the Markup: left to render time

    def visit_Call(self, node):
        node = self.generic_visit(node)
        name = node.node.name if isinstance(node.node, nodes.Name) else None
        if name is None or node.dyn_args is not None or node.dyn_kwargs is not None:
            return node  # a call of an expression, or with *args/**kwargs: left to render time
        if name == "current_locale" and not node.args and not node.kwargs:
            return nodes.Const(self.locale, lineno=node.lineno)
        if not (name in ("_", "gettext") and len(node.args) == 1
                and isinstance(node.args[0], nodes.Const) and isinstance(node.args[0].value, str)):
            return node
        line = node.lineno
        text = nodes.MarkSafeIfAutoescape(nodes.Const(self.translations.ugettext(node.args[0].value)), lineno=line)
        variables = nodes.Dict([nodes.Pair(nodes.Const(k.key), k.value, lineno=line) for k in node.kwargs],
                               lineno=line)
        return nodes.Mod(text, variables, lineno=line)


class _LocalizedLoader(BaseLoader):
    """Finds "ru:name" where the app's loader finds "name"; Jinja caches each language's copy apart."""

    def __init__(self, loader):
        self.loader = loader

    def get_source(self, environment, template):
        return self.loader.get_source(environment, template.partition(LOCALE_MARK)[2] or template)

    def list_templates(self):
        return self.loader.list_templates()


class PageEnvironment(Environment):
    """Flask's Jinja environment, plus one compiled copy of a template per language for render_page.

    Profiling the unsubscribe page showed a sixth of its CPU going to gettext at render time: every string is
    a context call, a Flask-Babel catalog lookup and a Markup format. A copy compiled for one language has the
    translations in its code instead. Templates named without a language render as before."""

    def __init__(self, app, **options):
        super().__init__(app, **options)
        self.loader = _LocalizedLoader(self.loader)

    def join_path(self, template, parent):
        """{% extends %} and {% include %} in a language's copy load that language's copy too."""
        locale, mark, _ = parent.partition(LOCALE_MARK)
        return f"{locale}{LOCALE_MARK}{template}" if mark and LOCALE_MARK not in template else template

    def compile(self, source, name=None, filename=None, raw=False, defer_init=False):
        locale, mark, _ = (name or "").partition(LOCALE_MARK)
        if mark and isinstance(source, str):
            with self.app.app_context(), force_locale(locale):  # its own `g`: the request's locale is untouched
                translations = get_translations()
            source = _TranslateConstants(translations, locale).visit(self.parse(source, name, filename))
        return super().compile(source, name, filename, raw, defer_init)


def init_app(app):
    app.config.setdefault("BABEL_TRANSLATION_DIRECTORIES", os.path.join(os.path.dirname(__file__), "translations"))
    # Flask-Babel passes what the selector returns to Locale.parse, which returns a Locale as it is.
    Babel(app, locale_selector=lambda: _BABEL_LOCALES.get(page_locale()) or page_locale())
    # The callables Flask-Babel installs, with the catalog looked up once per request (see _translations).
    app.jinja_env.install_gettext_callables(
        gettext=lambda s: _translations().ugettext(s),
        ngettext=lambda s, p, n: _translations().ungettext(s, p, n),
        newstyle=True,
        pgettext=lambda c, s: _translations().upgettext(c, s),
        npgettext=lambda c, s, p, n: _translations().unpgettext(c, s, p, n),
    )

    @app.template_filter("utc_time")
    def utc_time(iso, local="date"):
        """An RFC 3339 timestamp for a person: `<time datetime="<UTC>">` whose text is the date and time in UTC,
        said so ("14 December 2026, 23:00 UTC"), correct without scripts; pages.js puts the reader's own date
        (local="date") or date and time (local="datetime") in its place. A date alone, in UTC, was a day off
        for readers east or west of it."""
        if not iso:
            return ""
        moment = datetime.fromisoformat(iso.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        moment = moment.astimezone(timezone.utc)
        text = f"{format_date(moment, 'long')}, {format_time(moment, 'short')} UTC"
        return Markup('<time datetime="{}" data-local="{}">{}</time>').format(
            moment.strftime("%Y-%m-%dT%H:%M:%SZ"), local, text)

    # The switcher's links are made in pages.py, which knows what of a page's query must survive a switch (an
    # unsubscribe page's `done`); it imports this module, so it is imported here rather than at the top.
    from .pages import language_href

    # Globals, not a context processor: the values never change, and a processor is called on every render.
    app.jinja_env.globals.update(current_locale=page_locale, language_names=LANGUAGE_NAMES,
                                 language_href=language_href)
