"""Rate limits: Flask-Limiter with its counters in Redis (under keys.rate_limits()), one limiter per app (the
extension keeps its storage per instance).

- The SDK endpoint's POSTs, per client address and per SMID: sdk.init_rate_limits puts them on its blueprint,
  checked by the limiter's before-request hook, which runs for that blueprint alone (see init_app), after the
  blueprint's own origin check (sdk.check_origin_first): a POST from an origin it refuses is not counted.
- The forms of the unsubscribe page and of the manager (their POSTs with an `action`), per link (a digest of
  its SMID or manager token: no Redis key holds a whole token) and per client address, each one bucket for
  both kinds of page: count_link_form, which their views call once the form's CSRF check has passed. The RFC
  8058 one-click is never limited (mail providers retry it; front.py answers it in front of Flask),
  nor is a GET.

The limits are settings (config.py), read from app config on every request. Over a limit: 429 with Retry-After
(retry_after_seconds), JSON on the SDK, a page in the person's language elsewhere (the app's HTTP error
handler), having changed nothing.

While Redis refuses writes but serves reads (out of memory under noeviction, a failed snapshot, a replica), the
limiter cannot count. Each blueprint says what may then go on uncounted (ServiceLimiter's
uncounted_while_writes_refused): the SDK its read-only actions; the page and manager forms all, since a change
meets the same refusal in the view (503, nothing written) and a form that has nothing left to write (an
unsubscribe already made) answers as usual. The limit never turns an unsubscribe into an error of its own.
"""
import logging
import math
import time
from functools import partial

from flask import current_app, g, request
from flask_limiter import Limiter
from redis.exceptions import ResponseError as RedisResponseError

from . import keys, store
from .redact import redact
from .tokens import link_digest


log = logging.getLogger(__name__)


def limiter_storage_uri(redis_url):
    """The `limits` library spells a unix-socket Redis URL redis+unix:///path."""
    if redis_url.startswith("unix://"):
        return "redis+" + redis_url
    return redis_url


def retry_after_seconds():
    """Seconds until the breached limit's window resets (at least 1)."""
    limiter = current_app.extensions.get("rate_limiter")
    resets = [lim.reset_at for lim in (limiter.current_limits if limiter else []) if lim.breached]
    return max(1, math.ceil(max(resets, default=0) - time.time()))


def client_ip():
    return request.remote_addr or "unknown"


class ServiceLimiter(Limiter):
    """Flask-Limiter, letting a request go on uncounted while Redis refuses the counter's write when its
    blueprint's rule says it may (uncounted_while_writes_refused: blueprint name -> a function of the request).
    Any other request, and any other failure (a Redis down or stalled: it is not asked again), goes to the 503
    handler."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.uncounted_while_writes_refused = {}

    # Every check goes through here (the before-request hook, and a limited callable when it is called): a
    # private method, hence flask-limiter pinned <5 (pyproject).
    def _check_request_limit(self, *args, **kwargs):
        try:
            super()._check_request_limit(*args, **kwargs)
        except RedisResponseError as exc:
            may_go_on = self.uncounted_while_writes_refused.get(request.blueprint)
            if not (store.writes_refused(exc) and may_go_on is not None and may_go_on()):
                raise
            log.warning("%s %s not rate-limited: Redis refuses writes (%s)", request.method, redact(request.path),
                        exc)


def init_app(app, hooked_blueprints, link_form_blueprints):
    """The app's limiter, with the limits of the forms of `link_form_blueprints` (count_link_form). Flask-Limiter
    hooks every request of the app (before, after, teardown), and resolving "no limits here" costs a few
    hundred microseconds on each page, one-click POST and API call: its hooks run for `hooked_blueprints` alone
    (those with limits checked before their views: the SDK's)."""
    limiter = ServiceLimiter(
        client_ip, storage_uri=limiter_storage_uri(app.config["REDIS_URL"]),
        storage_options={"key_prefix": keys.rate_limits(), **store.timeouts(app.config["REDIS_TIMEOUT_SECONDS"])},
        strategy="fixed-window", headers_enabled=False,
    )
    limiter.init_app(app)
    _scope_hooks_to_blueprints(app, limiter, hooked_blueprints)
    app.extensions["rate_limiter"] = limiter
    app.extensions["link_form_limits"] = _link_form_limits(limiter)
    for name in link_form_blueprints:  # a form's change meets the refusal itself (see the module's doc)
        limiter.uncounted_while_writes_refused[name] = lambda: True
    return limiter


def _link_form_limits(limiter):
    """The callable whose call is the check of count_link_form: Flask-Limiter checks the limits decorating a
    callable when it is called. Shared limits: one bucket per link and one per address, whichever page."""
    @limiter.shared_limit(lambda: current_app.config["PAGE_RATE_LIMIT_PER_LINK"], "page-link",
                          key_func=lambda: g.rate_limited_link, error_message="Too many requests for this link")
    @limiter.shared_limit(lambda: current_app.config["PAGE_RATE_LIMIT_PER_IP"], "page-ip",
                          key_func=client_ip, error_message="Too many requests from this address")
    def link_form():
        """Nothing: the limits around it are the check."""

    return link_form


def count_link_form(link_token):
    """Count a form POST of a link's page (an unsubscribe page's SMID, or a manager token) against the limits per
    link and per address; raises RateLimitExceeded (429) over either, before anything is read or changed.
    Views call it once the form's CSRF check passed (the form token is a MAC of the link), so that only links
    the service issued get a counter."""
    g.rate_limited_link = link_digest(link_token)
    current_app.extensions["link_form_limits"]()


def _scope_hooks_to_blueprints(app, limiter, names):
    """Move the limiter's app-wide hooks to the blueprints `names`. Flask runs blueprint hooks after the app's
    before-request hooks (the limiter's was the last of those) and before the app's after-request and teardown
    hooks (the limiter's were the first of those), so the order is unchanged."""
    def mine(fn):
        return getattr(fn, "__self__", None) is limiter or (isinstance(fn, partial) and fn.args[:1] == (limiter,))

    for hooks in (app.before_request_funcs, app.after_request_funcs, app.teardown_request_funcs):
        app_wide = hooks.get(None, [])
        moved = [fn for fn in app_wide if mine(fn)]
        if moved:
            hooks[None] = [fn for fn in app_wide if not mine(fn)]
            for name in names:
                hooks.setdefault(name, []).extend(moved)
