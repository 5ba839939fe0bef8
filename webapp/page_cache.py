"""The unsubscribe page rendered once per kind of page, then filled in for each link.

Every recipient of a resource who opens a link in the same state and language sees the same page but for a few
values of their own (LINK_VALUES): the masked address, the manager link, the form's URL and its CSRF token.
Rendering the confirm template was about half of what the page's view did in one process (119-125 of some
240 us, README Performance). So a page is rendered once with a marker in place of each of those values, cut
at the markers and kept, keyed by everything else the render reads: the template, the language, the app's
root, the language switcher's links and the rest of the view. The next page of that kind is those pieces
joined around this link's values, escaped as Jinja's autoescape escapes them.

A kind is also kept under what its view was made of (kept_kind: pages.page_kind_inputs, the resource, the
record's state, the language, ...), so that the next page of that kind is filled in without making its view,
in Flask or in front of it (front.py).

A kind is kept only if its pieces, filled in with the first link's own values, give exactly the page rendered
for that link; a template that used one of those values other than by printing it is rendered every time.
tests/test_page_cache.py checks that the templates read nothing beyond the view and the globals the key holds.
Kinds are kept per app and process; none while templates reload from disk (debug), since a kept page would
outlive its template, and none of a page with a countdown, which changes every second.
"""
import re
import secrets

import orjson
from flask import current_app, request
from markupsafe import Markup, escape

from .locale import LOCALES, page_locale, render_page

# The view's values that differ from one recipient, or one link, to the next.
LINK_VALUES = ("smid", "address", "manage_url", "action_url", "form_token")
# Markers no value can hold: private-use characters around a secret of this process.
_SECRET = secrets.token_hex(8)
_MARKERS = {name: Markup(f"\ue000{_SECRET}{i}\ue001") for i, name in enumerate(LINK_VALUES)}
_VALUE_OF_MARKER = {str(marker): name for name, marker in _MARKERS.items()}
_CUT = re.compile("(" + "|".join(map(re.escape, _VALUE_OF_MARKER)) + ")")
# View members that are this person's at this moment (a pending timer: its deadline and the seconds left): a
# page that shows one is of a kind no other view shares, which would only crowd out kinds that are.
_OF_THE_MOMENT = ("pending", "seconds_left")
KINDS_KEPT = 256  # per app and process: resources x states x languages in use; all dropped when full
_UNCACHEABLE = ()


def kept_kinds(app):
    """{key: (pieces, names) or _UNCACHEABLE}: pieces[0], then the value of names[i] and pieces[i + 1]."""
    return app.extensions.setdefault("page_kinds", {})


def _kinds_by_inputs(app):
    """{inputs: (owner, (pieces, names))}: the kinds kept under what their views were made of (kept_kind)."""
    return app.extensions.setdefault("page_kinds_by_inputs", {})


def kept_kind(app, inputs, owner):
    """The kept kind of the pages whose views are made of `inputs` (pages.page_kind_inputs; None: no kind) and
    `owner`, the object they name by its id (the resource), or None: then only a view tells the kind."""
    entry = _kinds_by_inputs(app).get(inputs) if inputs is not None else None
    return entry[1] if entry is not None and entry[0] is owner else None


def fill(kind, values):
    """The page of a kept kind for a link whose LINK_VALUES are `values`."""
    return _fill(*kind, values)


def _key(app, template_name, view):
    """Everything but the link's own values that the render reads, as bytes. orjson writes Markup as the plain
    text it is, though Jinja prints it unescaped: the names of the values that are Markup are in the key too.
    A value orjson cannot write raises TypeError."""
    rest = {name: value for name, value in view.items() if name not in _MARKERS}
    markup = [name for name, value in rest.items() if isinstance(value, Markup)]
    language_href = app.jinja_env.globals["language_href"]  # what the templates' switcher calls
    switcher = [language_href(code) for code in LOCALES]
    return orjson.dumps([template_name, page_locale(), request.script_root, switcher, markup, rest],
                        option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)


def _fill(pieces, names, view):
    values = {name: str(escape(view[name])) for name in set(names)}
    out = [pieces[0]]
    for name, piece in zip(names, pieces[1:]):
        out += (values[name], piece)
    return "".join(out)


def render_link_page(template_name, view, inputs=None, owner=None):
    """render_page(template_name, **view), the same text, from the kept pieces of its kind where there are.
    With `inputs` (and `owner`, see kept_kind), what the view was made of: its kind is kept under them too."""
    app = current_app._get_current_object()
    if app.jinja_env.auto_reload or any(view.get(name) is not None for name in _OF_THE_MOMENT):
        return render_page(template_name, **view)
    try:
        key = _key(app, template_name, view)
    except TypeError:
        return render_page(template_name, **view)
    kinds = kept_kinds(app)
    kind = kinds.get(key)
    page = None
    if kind is None:
        page = render_page(template_name, **view)
        cut = _CUT.split(render_page(template_name, **{**view, **_MARKERS}))
        pieces, names = tuple(cut[::2]), tuple(_VALUE_OF_MARKER[marker] for marker in cut[1::2])
        if len(kinds) >= KINDS_KEPT:
            kinds.clear()
            _kinds_by_inputs(app).clear()
        kind = kinds[key] = (pieces, names) if _fill(pieces, names, view) == page else _UNCACHEABLE
    if kind is _UNCACHEABLE:
        return render_page(template_name, **view) if page is None else page
    if inputs is not None:
        by_inputs = _kinds_by_inputs(app)
        if len(by_inputs) >= KINDS_KEPT:
            by_inputs.clear()
        by_inputs[inputs] = (owner, kind)
    return _fill(*kind, view) if page is None else page
