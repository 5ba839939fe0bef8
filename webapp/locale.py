"""Page language: an explicit choice, then the profile's language, then the resource default, then the
browser's Accept-Language, then DEFAULT_LOCALE. Translations are gettext catalogs under
webapp/translations (Flask-Babel)."""
import os

from datetime import datetime

from flask import g, request
from babel import Locale
from flask_babel import Babel, format_date, format_datetime, get_translations

LOCALES = ("en", "ru")
LANGUAGE_NAMES = {"en": "English", "ru": "Русский"}
_BABEL_LOCALES = {code: Locale.parse(code) for code in LOCALES}  # parsed once (Locale.parse stats data files)


def choose_locale(explicit=None, profile=None, resource_default=None, accept_languages=None, default="en"):
    """Pure form of the choice order; `accept_languages` is a werkzeug LanguageAccept (or None)."""
    for candidate in (explicit, profile, resource_default):
        if candidate in LOCALES:
            return candidate
    if accept_languages is not None:
        best = accept_languages.best_match(LOCALES)
        if best:
            return best
    return default if default in LOCALES else "en"


def explicit_locale():
    """The language the person picked with the switcher (?lang=) or kept in a form field."""
    value = request.args.get("lang") or (request.form.get("lang") if request.method == "POST" else None)
    return value if value in LOCALES else None


def set_page_locale(profile=None, resource_default=None):
    """Decide this request's language from page data; views call it before rendering."""
    from flask import current_app
    g.locale = choose_locale(explicit_locale(), profile, resource_default, request.accept_languages,
                             current_app.config["DEFAULT_LOCALE"])
    return g.locale


def _select():
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


def init_app(app):
    app.config.setdefault("BABEL_TRANSLATION_DIRECTORIES", os.path.join(os.path.dirname(__file__), "translations"))
    # Flask-Babel passes what the selector returns to Locale.parse, which returns a Locale as it is.
    Babel(app, locale_selector=lambda: _BABEL_LOCALES.get(_select()) or _select())
    # The callables Flask-Babel installs, with the catalog looked up once per request (see _translations).
    app.jinja_env.install_gettext_callables(
        gettext=lambda s: _translations().ugettext(s),
        ngettext=lambda s, p, n: _translations().ungettext(s, p, n),
        newstyle=True,
        pgettext=lambda c, s: _translations().upgettext(c, s),
        npgettext=lambda c, s, p, n: _translations().unpgettext(c, s, p, n),
    )

    @app.template_filter("localdate")
    def localdate(iso, with_time=False):
        """An RFC 3339 timestamp as a date (and time) in the page's language."""
        if not iso:
            return ""
        moment = datetime.fromisoformat(iso.replace("Z", "+00:00"))
        return format_datetime(moment, "medium") if with_time else format_date(moment, "long")

    @app.context_processor
    def language_switcher():
        return {"current_locale": _select, "language_names": LANGUAGE_NAMES}
