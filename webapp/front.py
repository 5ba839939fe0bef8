"""The two requests every sent message can cause at volume answered in front of Flask, where they can be:
RFC 8058 one-click POSTs, and GETs of the unsubscribe page.

Mail providers POST `List-Unsubscribe=One-Click` to the unsubscribe URL of every message a person
unsubscribes from, and retry it. Profiling that request under gunicorn (bench/profile.py oneclick) showed
Flask's per-request machinery (request context, session, form parser, response object, after-request hooks)
costing more than the unsubscribe itself. This WSGI layer answers the common case itself: a urlencoded
one-click POST that succeeds. It runs the same code as pages.one_click (hotpaths.one_click with the same
evidence) and sends the same status, body and headers. Every other request goes to Flask unchanged, body
included. A one-click that does not end in success (unknown or forged link, blocked resource, Redis down or
stalled, ...) goes to Flask with the exception it ended in, and pages.one_click answers that exception as
if it had raised it itself, without running the one-click again (a stalled Redis is waited for once).
tests/test_pages.py::test_one_click_front_answers_exactly_as_flask compares the two.

The page GET: of what the page's view costs in Flask, Flask's own part (request context, routing, hooks,
response object) and the view's (the view and the kind's key, see page_cache.py) were most. A GET of a link,
without a query or with only the switcher's `lang`, whose page is of a kind kept already under what its view
is made of (pages.kept_page) is answered here: the same read as the view's (hotpaths.open_for_page, which
counts the view), the language chosen as the view chooses it, the kept pieces filled in with this link's
values, the headers Flask sends with the page. Any other GET goes to Flask; one the front read already goes
with what the read gave (pages.PAGE_READ: the Context, or the exception it raised), so the view is counted
once. tests/test_page_front.py compares the two.
"""
import re
from io import BytesIO
from urllib.parse import parse_qsl

from . import hotpaths, pages
from .locale import LOCALES, choose_locale
from .pages import NOSNIFF, ONE_CLICK_DONE, ONE_CLICK_FAILURE, PAGE_READ, PAGE_SECURITY_HEADERS
from .store import client_of
from .tokens import B64URL_RUN

# The paths pages.unsubscribe_page is routed at (pages.slash_optional_route): the link, with or without its
# slash or "index.html", its segment (1-400 characters: a longer one is no link of ours, Flask answers it) taken
# as the route takes it: the group is tokens.token_in_link's leading base64url run (a ">" or "." a mail client
# left after the token is dropped, as there), in this one match rather than a second regex call per one-click.
_PATH_RE = re.compile(rf"/unsubscribe/(?=[^/]{{1,400}}(?![^/]))({B64URL_RUN.pattern})[^/]*(?:/|/index\.html?)?")
# "List-Unsubscribe=One-Click" is 26 bytes; anything much longer is not a provider's POST, and goes to Flask
# unread (as does one without a length), where a body over PAGE_BODY_LIMIT_BYTES is refused (413) before it is
# read (webapp.small_bodies_only).
_MAX_BODY = 256
_BODY = ONE_CLICK_DONE.encode()
# What Flask sends for pages.one_click's 200 (pages.plain + pages.security_headers), in the same order.
_HEADERS = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(_BODY))),
            ("Cache-Control", "no-store"), *PAGE_SECURITY_HEADERS, NOSNIFF]
# What Flask sends with the page (pages.no_store + pages.security_headers), Content-Length after the first.
_PAGE_HEADERS = [("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-store"),
                 *PAGE_SECURITY_HEADERS, NOSNIFF]
# The queries a page GET is answered here with, and the language each asks for (explicit_locale).
_PAGE_QUERIES = {"": None, **{f"lang={code}": code for code in LOCALES}}


class Front:
    def __init__(self, app, flask_wsgi):
        self.app = app
        self.flask_wsgi = flask_wsgi  # the wrapped app.wsgi_app

    def __call__(self, environ, start_response):
        method = environ.get("REQUEST_METHOD")
        if method == "POST":
            match = _PATH_RE.fullmatch(environ.get("PATH_INFO", ""))
            if match and self._unsubscribed(environ, match.group(1)):
                start_response("200 OK", list(_HEADERS))
                return [_BODY]
        elif method == "GET" and environ.get("QUERY_STRING", "") in _PAGE_QUERIES:
            match = _PATH_RE.fullmatch(environ.get("PATH_INFO", ""))
            body = match and self._page(environ, match.group(1))
            if body:
                start_response("200 OK", [_PAGE_HEADERS[0], ("Content-Length", str(len(body))), *_PAGE_HEADERS[1:]])
                return [body]
        return self.flask_wsgi(environ, start_response)

    def _page(self, environ, token):
        """The page of this GET, encoded, when its kind is kept; else None, and Flask answers (PAGE_READ)."""
        app = self.app
        script_root = environ.get("SCRIPT_NAME", "")
        if not script_root.isascii():
            return None  # werkzeug decodes it: Flask's request.script_root says what it is
        try:
            ctx = hotpaths.open_for_page(client_of(app), app.extensions["signing_keys"], token, "GET")
        except Exception as exc:  # noqa: BLE001 - the view raises it again and answers it (or the app's handlers)
            environ[PAGE_READ] = (token, exc)
            return None
        explicit = _PAGE_QUERIES[environ.get("QUERY_STRING", "")]
        page = None
        try:
            if not pages.customer_page_url(ctx):  # else Flask redirects there
                # As pages.open_page_context's set_page_locale chooses it.
                locale = choose_locale(explicit, ctx.record.get("locale"), ctx.resource.get("default_locale"),
                                       environ.get("HTTP_ACCEPT_LANGUAGE"), app.config["DEFAULT_LOCALE"])
                root = script_root.rstrip("/")
                inputs = pages.page_kind_inputs(ctx, None, locale, root)
                page = pages.kept_page(app, ctx, inputs, locale, explicit, root)
        except Exception:  # noqa: BLE001 - the view meets it again, and the app answers and logs it as any error
            page = None
        if page is None:
            environ[PAGE_READ] = (token, ctx)
            return None
        return page.encode()

    def _unsubscribed(self, environ, smid):
        """True when this was a one-click POST and it succeeded; False leaves the request to Flask."""
        if environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower() != "application/x-www-form-urlencoded":
            return False  # multipart and bodiless one-clicks are rare: Flask's form parser handles them
        try:
            length = int(environ.get("CONTENT_LENGTH") or "")
        except ValueError:
            return False
        if not 0 <= length <= _MAX_BODY:
            return False
        body = environ["wsgi.input"].read(length)
        environ["wsgi.input"] = BytesIO(body)  # so that Flask can read it again
        environ["CONTENT_LENGTH"] = str(len(body))
        # A form of the unsubscribe page (pages.page_action) goes to Flask, which checks its CSRF token: only a body
        # that says "action", or percent-encodes a name, can hold its field, and only such a body is parsed.
        if (b"action" in body or b"%" in body) and any(
                name == "action" for name, _ in parse_qsl(body.decode("latin-1"), keep_blank_values=True)):
            return False
        evidence = {"ip": environ.get("REMOTE_ADDR"), "user_agent": environ.get("HTTP_USER_AGENT", "")[:512]}
        try:
            hotpaths.one_click(client_of(self.app), self.app.extensions["signing_keys"], smid, evidence)
        except Exception as exc:  # noqa: BLE001 - pages.one_click raises it again and answers (or logs) it
            environ[ONE_CLICK_FAILURE] = exc
            return False
        return True
