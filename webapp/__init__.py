"""The unsubscribe service: `create_app()` builds the Flask app; importing this package does nothing else."""
import functools
import hashlib
import hmac
import inspect
import logging
import os
import re

from flask import Flask, current_app, jsonify, make_response, request
from flask.sessions import SecureCookieSessionInterface
from flask_wtf.csrf import CSRFProtect
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError as RedisResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.middleware.proxy_fix import ProxyFix

from . import store
from .config import DEFAULTS, MAX_BODY_BYTES, https_warning, load_settings, signing_key_ring
from .locale import PageEnvironment, render_page
from .redact import redact
from .tokens import SigningKeys


class MethodFirstCSRF(CSRFProtect):
    """Flask-WTF's CSRFProtect, asking the method first: its before-request check looked up the view's exemptions
    (the blueprint, the view's dotted name) on every GET, a method it never checks. POST, PUT, PATCH and DELETE
    go through its check as before."""

    def protect(self, apply_exemptions=False):
        if request.method in current_app.config["WTF_CSRF_METHODS"]:
            super().protect(apply_exemptions)


csrf = MethodFirstCSRF()
log = logging.getLogger("webapp")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CookieSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions (the manager's CSRF token), with the signing serializer built once.

    Flask builds it when it opens the session, on every request, and itsdangerous's constructor serializes
    `{}` to learn what the serializer returns: about 40 µs per request for a page that has no cookie."""

    def __init__(self):
        self._serializer = (None, None)  # (the keys it was built for, the serializer)

    def get_signing_serializer(self, app):
        keys = (app.secret_key, tuple(app.config["SECRET_KEY_FALLBACKS"] or ()))
        if self._serializer[0] != keys:
            self._serializer = (keys, super().get_signing_serializer(app))
        return self._serializer[1]

    def open_session(self, app, request):
        # No Cookie header (a message's link opened): the empty session Flask's would give, without parsing cookies.
        if "HTTP_COOKIE" not in request.environ and self.get_signing_serializer(app) is not None:
            return self.session_class()
        return super().open_session(app, request)

    def save_session(self, app, session, response):
        # A session never read nor changed (every page a link opens) has nothing to write or vary: Flask's reads
        # seven cookie settings before it finds that out.
        if session or session.modified or session.accessed:
            super().save_session(app, session, response)


@functools.lru_cache(maxsize=1024)
def _is_coroutine_function(func):
    return inspect.iscoroutinefunction(func)


class ServiceApp(Flask):
    def ensure_sync(self, func):
        """Flask's, with the answer remembered per function: it asks inspect on every call of every hook, view and
        context processor, several per request, and a function's answer never changes."""
        return self.async_to_sync(func) if _is_coroutine_function(func) else func

    def log_exception(self, exc_info):
        # Flask's own says "Exception on <path>": a page's or manager's path is a whole token.
        self.logger.error("Exception on %s [%s]", redact(request.path), request.method, exc_info=exc_info)


def collapse_slashes(wsgi_app):
    """WSGI middleware: a path with doubled slashes is served as the path with single ones, no redirect."""
    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if "//" in path:
            environ["PATH_INFO"] = re.sub("/{2,}", "/", path)
        return wsgi_app(environ, start_response)
    return app


def small_bodies_only():
    """The first before-request hook of the pages, the manager and the SDK endpoint: their forms and JSON are
    small, and a body was parsed before any check (a 4 MB form cost 2 s before its 404). A POST body longer
    than PAGE_BODY_LIMIT_BYTES is refused (413) before anything reads it; one without a length (chunked) is read
    here, one byte past the limit at most. The API keeps MAX_CONTENT_LENGTH."""
    if request.method != "POST":
        return  # nothing else of theirs reads a body
    limit = request.max_content_length = current_app.config["PAGE_BODY_LIMIT_BYTES"]  # the 413 page's too
    length = request.content_length
    if length is None:
        # Werkzeug ends a stream at its limit without a word, and a form cut there would be taken as sent: the
        # views read what is kept here (get_data's cache) instead.
        request.max_content_length = limit + 1
        length = len(request.get_data(cache=True))
    if length > limit:
        raise RequestEntityTooLarge(f"The request body is larger than {limit} bytes")


def create_app(test_config=None):
    """Build the app from the environment, or from `test_config` laid over it (tests pass REDIS_URL etc.)."""
    overrides = {k: v for k, v in (test_config or {}).items() if k in DEFAULTS and v is not None}
    settings = load_settings({**os.environ, **overrides} if overrides else None)
    app = ServiceApp(__name__, template_folder=os.path.join(ROOT, "templates"),
                     static_folder=os.path.join(ROOT, "static"),
                     static_url_path="/static")  # Flask's own for the folder, not derived again per static_url
    # werkzeug's default answers /unsubscribe//<smid> with a redirect built from the Host header; doubled
    # slashes (an API client's base URL that ends in "/") are collapsed in front instead (collapse_slashes).
    app.url_map.merge_slashes = False
    app.jinja_environment = PageEnvironment  # before anything creates app.jinja_env
    app.session_interface = CookieSessions()
    app.config.update(settings)
    app.config.update({
        "MAX_CONTENT_LENGTH": MAX_BODY_BYTES,  # the API's; the pages, manager and SDK take less (small_bodies_only)
        "SESSION_COOKIE_SAMESITE": "Lax",
        "SESSION_COOKIE_HTTPONLY": True,
        "SESSION_COOKIE_SECURE": settings["PUBLIC_BASE_URL"].startswith("https://"),
        # The one-click POST and the SDK come cross-site without a Referer: CSRF is checked by token only.
        "WTF_CSRF_SSL_STRICT": False,
        "WTF_CSRF_TIME_LIMIT": None,
    })
    # Settings among them were read and checked by load_settings (PUBLIC_BASE_URL made ASCII): not laid over raw.
    app.config.update({k: v for k, v in (test_config or {}).items() if k not in overrides})
    if not app.config["REDIS_URL"]:
        raise RuntimeError("REDIS_URL is not set: run `python -m webapp run` (it starts a local Redis) "
                           "or set REDIS_URL=redis://host:6379/0")
    ring, verify_only = signing_key_ring(app.config)
    app.extensions["signing_keys"] = SigningKeys(ring, verify_only)
    # Sessions (CSRF tokens of page forms) are signed with a key derived from the newest signing key.
    app.config["SECRET_KEY"] = hmac.new(ring[-1][1], b"flask-session", hashlib.sha256).hexdigest()
    from .front import Front
    app.wsgi_app = app.extensions["front"] = Front(app, app.wsgi_app)  # inside ProxyFix
    app.wsgi_app = collapse_slashes(app.wsgi_app)
    if app.config["TRUSTED_PROXIES"]:
        n = app.config["TRUSTED_PROXIES"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n, x_port=n, x_prefix=n)
    from .delayed import HousekeepingRearm
    app.wsgi_app = HousekeepingRearm.entry(app, app.wsgi_app)  # re-arms housekeeping from the first request on
    warning = https_warning(app.config["PUBLIC_BASE_URL"])
    if warning and not app.testing:
        log.warning(warning)

    store.init_app(app)
    csrf.init_app(app)
    from . import api, health, locale, manager, pages, ratelimits, sdk
    locale.init_app(app)
    app.register_blueprint(health.bp)
    app.register_blueprint(api.bp)
    csrf.exempt(api.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(sdk.bp)
    csrf.exempt(sdk.bp)
    limiter = ratelimits.init_app(app, hooked_blueprints=(sdk.bp.name,),
                                  link_form_blueprints=(pages.bp.name, manager.bp.name))
    sdk.init_rate_limits(limiter)
    app.register_blueprint(manager.bp)
    csrf.exempt(manager.bp)  # its forms carry a token bound to the manager link (pages.check_link_form)
    for name in (pages.bp.name, manager.bp.name, sdk.bp.name):  # first: before the SDK's limiter reads the body
        app.before_request_funcs.setdefault(name, []).insert(0, small_bodies_only)
    _register_error_handlers(app)
    _drop_repeated_context_processors(app)
    return app


def _drop_repeated_context_processors(app):
    """Every blueprint brings its own copy of Flask's default context processor (g, request, session), which the
    app's own already gives to every template: each copy was called again on every page render."""
    for name, processors in app.template_context_processors.items():
        if name is not None:
            processors[:] = [f for f in processors if f not in app.template_context_processors[None]]


def http_error(exc, **page):
    """The answer to an HTTPException: the API's envelope, the SDK's JSON, else a page in the person's language.
    `page`: more for that page (message.html), as the way back a link's form adds (pages.refused_form_page)."""
    from .api import envelope
    from .pages import no_store
    from .ratelimits import retry_after_seconds
    retry_after = retry_after_seconds() if exc.code == 429 else None  # when the breached limit's window resets
    if request.path.startswith("/api/"):
        resp = make_response(envelope(None, exc.code, exc.code, exc.description or exc.name))
    elif request.path.startswith("/sdk/"):
        resp = make_response(jsonify({"error": exc.code, "error_text": exc.description or exc.name}), exc.code)
    else:  # no-store as the pages' own errors: a cache may keep a 404 or 405 unasked (RFC 9110 §15.1)
        resp = no_store(make_response(render_page("message.html", status=exc.code, retry_after=retry_after,
                                                  **page), exc.code))
    # The answer's own headers go with any body: a 405's Allow (RFC 9110 §15.5.6 MUST), a 401's challenge.
    resp.headers.extend((name, value) for name, value in exc.get_headers(request.environ)
                        if name.lower() not in ("content-type", "content-length"))
    if retry_after:
        resp.headers["Retry-After"] = str(retry_after)
    return resp


def _register_error_handlers(app):
    from .api import envelope
    app.register_error_handler(HTTPException, http_error)

    @app.errorhandler(RedisConnectionError)
    @app.errorhandler(RedisTimeoutError)
    def store_unavailable(exc):
        # Redis is down, restarting, stalled or refusing writes: ask to retry, never a 500. A GET changed
        # nothing; a POST's write may have been made (Redis got it, then timed out or dropped the connection).
        log.error("Redis unavailable on %s %s: %s", request.method, redact(request.path), exc)
        if request.path.startswith("/api/"):
            return envelope(None, 503, 503, "Storage is unavailable; if this call changes something, read it back "
                                            "before retrying")
        if request.path.startswith("/sdk/"):
            body = {"error": 503, "error_text": "The unsubscribe service is unavailable; please try again shortly",
                    "reason": "unavailable"}
            return jsonify(body), 503, {"Retry-After": "5"}
        if request.path == "/ak_list_unsubscribe.js":  # a script, as its 404 is: an HTML page there is refused
            body = "/* AkUnsub: the unsubscribe service is unavailable; try again shortly */\n"
            return body, 503, {"Content-Type": "application/javascript; charset=utf-8", "Retry-After": "5",
                               "Cache-Control": "no-store"}
        page = render_page("message.html", status=503, unconfirmed=request.method == "POST")
        return page, 503, {"Retry-After": "5", "Cache-Control": "no-store"}  # as every error page

    @app.errorhandler(RedisResponseError)
    def store_refused(exc):
        return store_unavailable(exc) if store.unavailable_reply(exc) else unexpected(exc)

    @app.errorhandler(Exception)
    def unexpected(exc):
        if isinstance(exc, HTTPException):
            return http_error(exc)
        log.exception("unhandled error on %s %s", request.method, redact(request.path))
        if request.path.startswith("/api/"):
            return envelope(None, 500, 500, "Internal error")
        if request.path.startswith("/sdk/"):
            return jsonify({"error": 500, "error_text": "Internal error", "reason": "error"}), 500
        return render_page("message.html", status=500), 500
