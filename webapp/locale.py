"""Page language: an explicit choice, then the profile's language, then the resource default, then the
browser's Accept-Language, then DEFAULT_LOCALE. Translations are gettext catalogs under
webapp/translations (Flask-Babel)."""
import os

from datetime import datetime

from flask import g, request
from flask_babel import Babel, format_date, format_datetime

LOCALES = ("en", "ru")
LANGUAGE_NAMES = {"en": "English", "ru": "Русский"}


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
    value = request.args.get("lang") or request.form.get("lang")
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


def init_app(app):
    app.config.setdefault("BABEL_TRANSLATION_DIRECTORIES", os.path.join(os.path.dirname(__file__), "translations"))
    Babel(app, locale_selector=_select)

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
