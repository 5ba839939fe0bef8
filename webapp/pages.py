"""Blueprint for the pages reached from a message: /unsubscribe/<smid>.

GET and HEAD only read: link scanners fetch every URL, so a page changes nothing until the browser POSTs
(the page's own script, or a button when scripts are off). POST with a page `action` is a CSRF-protected
form; any other POST to the URL is the RFC 8058 one-click (no cookies, no CSRF token, 200, never 3xx).
The page's CSRF token is bound to the link, not to a session (check_link_form): the page sets no cookie.
"""
import functools
from urllib.parse import quote, urlencode

from flask import Blueprint, current_app, g, has_request_context, jsonify, make_response, redirect, request, url_for
from flask_wtf.csrf import CSRFError
from flask_babel import gettext as _
from markupsafe import Markup, escape
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from . import csrf, hotpaths, http_error, unsubscribe
from .delayed import schedule_timer
from .errors import BadToken, Blocked, Conflict, IncompleteToken, InvalidInput, NotFound, ServiceError
from .headers import manage_url
from .locale import LOCALES, _translations, explicit_locale, page_locale, render_page, set_page_locale
from . import page_cache
from .page_cache import render_link_page
from .ratelimits import count_link_form
from .store import client_of, get_redis, get_timer_queue
from .subscriptions import Status, subscribed_cats
from .sdk import origin_of
from .tokens import form_token_matches, issue_form_token, issue_manager_token, read_smid, token_in_link

bp = Blueprint("pages", __name__)
PAGE_RULE = "/unsubscribe/<smid>/"  # the page's route, and page_path's pattern
PAGE_ENDPOINT = "pages.unsubscribe_page"
PAGE_ACTIONS = ("unsubscribe", "undo", "start", "cancel", "now")


def evidence():
    """What the ledger keeps about who asked: IP, user agent and page language."""
    return {"ip": request.remote_addr, "user_agent": (request.user_agent.string or "")[:512],
            "locale": set_page_locale()}


def mask_address(record):
    """The address, masked: a••@example.com, +7••••••4567 (plain text; spoken_address makes the pages' form)."""
    address = record["address"]
    if "email" in address:
        local, _, domain = address["email"].partition("@")
        return f"{local[:1]}{'•' * max(2, min(len(local) - 1, 6))}@{domain}"
    phone = address.get("phone") or address.get("cc_data", {}).get("phone")
    if phone:
        # "+" and the first digit, then the last four, or two of a short number: never more than half its digits
        tail = 4 if len(phone) >= 11 else 2
        return f"{phone[:2]}{'•' * (len(phone) - 2 - tail)}{phone[-tail:]}"
    if "provider" in address:
        return address["provider"]
    return "#" + str(address.get("cc_data", {}).get("id", ""))[-4:]


MASK = "•"
_SAID = {}  # language -> the spoken forms' patterns, (email, phone): looked up once per process


def spoken_patterns(locale):
    """The patterns of spoken_address's forms in `locale` (the email's, the phone's), looked up by Flask-Babel
    once per process, in a request whose page language is `locale`; None before that outside one (front.py
    then leaves the page to Flask)."""
    patterns = _SAID.get(locale)
    if patterns is None and has_request_context() and g.get("locale") == locale:
        gettext = _translations().ugettext
        patterns = _SAID[locale] = (gettext("%(start)s… at %(domain)s"), gettext("%(start)s… ending in %(end)s"))
    return patterns


def spoken_address(masked, patterns=None):
    """A masked address (mask_address) as the page shows it, and, for screen readers, a form they read well:
    "a••@example.com" was heard as "a bullet bullet at example dot com". The bullets are hidden from them
    (aria-hidden) and a visually hidden "a… at example.com" (a phone's: "+7… ending in 4567") is read instead,
    in the page's language (`patterns`: spoken_patterns of it; by default g.locale's, set before the view). An
    address without bullets (a push provider, a chat id) is shown as it is. Cheap on the page GET: the patterns
    are kept per language, and escape with an f-string costs a third of Markup.format."""
    start, mark, rest = masked.partition(MASK)
    if not mark:
        return masked
    end = rest.lstrip(MASK)
    patterns = patterns or spoken_patterns(g.locale)
    if end.startswith("@"):
        said = patterns[0] % {"start": start, "domain": end[1:]}
    else:
        said = patterns[1] % {"start": start, "end": end}
    return Markup(f'<span aria-hidden="true">{escape(masked)}</span>'
                  f'<span class="visually-hidden">{escape(said)}</span>')


# Where front.py leaves what its read of a page GET's link gave, (token, Context or the exception it raised),
# when it leaves the page to Flask: the view is counted once, and Redis read once.
PAGE_READ = "unsubscribe.page_read"


def open_page_context(smid, count_view=None, with_pending=False):
    """open_smid plus the page language; raises ServiceError subclasses. With count_view ("GET" or "HEAD") it
    also counts the page view (unsubscribe.record_view) once the SMID is open, in the same round trip, and
    reads the pending timer as with_pending does; or takes what front.py's read of this GET gave (PAGE_READ)."""
    handed = request.environ.pop(PAGE_READ, None)
    if count_view == "GET" and handed is not None and handed[0] == smid:
        if isinstance(handed[1], Exception):
            raise handed[1]  # the front's read ended in it: answered here as if raised here
        ctx = handed[1]
    elif count_view:
        ctx = hotpaths.open_for_page(get_redis(), current_app.extensions["signing_keys"], smid, count_view)
    else:
        ctx = unsubscribe.open_smid(get_redis(), current_app.extensions["signing_keys"], smid, with_pending)
    set_page_locale(ctx.record.get("locale"), ctx.resource.get("default_locale"))
    return ctx


# What the redirect after a page action says was done (`?done=`): each has its notice in page_view. "back" is
# the link back from an answer that changed nothing (an Undo too late, error_page): no notice, but a `done`, so
# that the page does not act by itself as a page first opened does (instant unsubscribes, delayed starts a timer).
DONE_WORDS = ("unsubscribed", "undone", "cancelled", "started", "late", "back")


def link_values(app, ctx, locale, explicit, script_root, patterns=None):
    """The view's values of this link alone (page_cache.LINK_VALUES), on its page in `locale`: the SMID, the
    masked address (spoken in `patterns`, spoken_patterns(locale)), the manager link (in the language the
    person chose, `explicit`: explicit_locale), the form's URL under the app's root and the form's token."""
    ring = app.extensions["signing_keys"]
    smid = ctx.smid
    manager_token = issue_manager_token(ring, smid.db_id, smid.profile_id, smid.hash_id)
    return {
        "smid": ctx.token, "address": spoken_address(mask_address(ctx.record), patterns),
        "manage_url": (manage_url(app.config["PUBLIC_BASE_URL"], manager_token)
                       + (f"?lang={explicit}" if explicit else "")),  # the language the person chose
        # The forms post to the page's path with the page's language in the query: a body too large to read
        # (small_bodies_only's 413) loses the form's `lang` field, and the 413 page is to be in this language.
        "action_url": f"{page_path(ctx.token, script_root)}?lang={locale}",
        "form_token": issue_form_token(ring, ctx.token),
    }


def page_kind_inputs(ctx, done, locale, script_root):
    """What page_view and the page's template read but the link's own values (link_values), for a page GET
    (`done`: a word of DONE_WORDS or None) in `locale` under the app's root: the resource (by identity: its
    decoded object is shared while its stored text is the same, resources.decode_shared), the message's
    category, the record's status, stopped categories and channel. Links with the same inputs have pages
    of one kind (page_cache.kept_kind). None for a page with a pending timer, whose countdown is this
    moment's. tests/test_page_front.py checks pages filled in from these against pages rendered."""
    if ctx.pending_fields:
        return None
    record = ctx.record
    return (id(ctx.resource), ctx.smid.category, record["status"], tuple(record.get("uncats", ())),
            record["channel"], done, locale, script_root)


def kept_page(app, ctx, inputs, locale, explicit, script_root):
    """The page of this link filled in from the kept render of its kind, `inputs` (page_kind_inputs), without
    its view; None where none is kept, or the address's spoken form is not known yet in `locale`."""
    kind = page_cache.kept_kind(app, inputs, ctx.resource)
    patterns = spoken_patterns(locale) if kind is not None else None
    if patterns is None:
        return None
    return page_cache.fill(kind, link_values(app, ctx, locale, explicit, script_root, patterns))


def page_view(ctx, done=None, chosen=None):
    """Ready values for the templates (they only display)."""
    app = current_app._get_current_object()  # one context-local lookup for what is read of the app below
    resource, record = ctx.resource, ctx.record
    status = Status(record["status"])
    cats = resource["categories"]
    stoppable = status in unsubscribe.STOPPABLE_STATUSES  # a paused subscription can still be stopped here
    subscribed = set(subscribed_cats(resource, record)) if stoppable else set()
    message_scope = unsubscribe.resolve_scope(ctx)  # the message's category, if the resource still has it
    category = message_scope["cats"][0] if message_scope["cats"] else None
    # What the person may stop here (unsubscribe.person_may_stop): the message's own category even if it is
    # required; the other required ones continue.
    choosable = [dict(c, checked=(c["api_name"] in chosen if chosen is not None
                                  else c["api_name"] == category if category else True))
                 for c in cats if c["api_name"] in subscribed and unsubscribe.person_may_stop(c, category)]
    required = [c for c in cats if c["api_name"] in subscribed and not unsubscribe.person_may_stop(c, category)]
    # A timer started in delayed mode runs on (and fires) whatever the mode is now, so every page shows it;
    # blocked.html shows only the blocked text, and the firers drop such a timer (scripts.FIRE_TIMERS).
    pending = unsubscribe.read_pending(client_of(app), ctx)
    if status in unsubscribe.FINAL_STATUSES:
        state = "final"
    elif (not stoppable or (category and category not in subscribed)
          or (cats and not choosable and len(subscribed) < len(cats))):
        state = "unsubscribed"  # what this message was about has stopped
    else:
        state = "active"
    if pending and state == "unsubscribed" and stoppable:
        # What this message was about has stopped, but a timer started from another message's link will stop
        # more at its deadline: the page shows that timer (its countdown, Cancel), not "these continue".
        state = "active"
    stopped = [c["title"] for c in cats if c["api_name"] not in subscribed]
    # A delayed page whose link asks for more than the pending timer covers (another category's message) adds
    # it to that timer when shown, as it starts one (unsubscribe.arm_timer widens it, same deadline); not what
    # has stopped already.
    joins = []
    if (pending and ctx.mode == "delayed" and state == "active"
            and unsubscribe.unsubscribed_record(resource, record, message_scope) != record):
        wider = unsubscribe.widened_scope(pending["scope"], message_scope)
        if wider != pending["scope"]:
            now_stops = unsubscribe.describe_scope(resource, pending["scope"])["stops"]
            joins = [t for t in unsubscribe.describe_scope(resource, wider)["stops"] if t not in now_stops]
            joins = joins or unsubscribe.describe_scope(resource, wider)["stops"]
    # `done` (from the redirect after an action) keeps the page from acting again on its own; its notice is
    # shown only while the stored state still agrees (the URL can be typed, or come back from history).
    notice = None
    if done is not None:
        agrees = {"undone": state == "active", "cancelled": state == "active" and not pending,
                  "unsubscribed": bool(stopped), "started": bool(pending), "late": state == "unsubscribed",
                  "back": False}
        notice = done if agrees[done] else None
    return {
        **link_values(app, ctx, g.locale, explicit_locale(), request.script_root),
        "mode": ctx.mode, "resource": resource, "channel": record["channel"], "status": status.word, "state": state,
        "whole": not stoppable,
        "stopped": stopped,
        "continuing": [c["title"] for c in cats if c["api_name"] in subscribed],
        "choosable": choosable, "required": required,
        # What "Unsubscribe now" stops (unsubscribe.now_scope): while a timer is pending, the timer's own scope
        # (one timer per subscription: it may have been started, or widened, from another message's link).
        "scope": unsubscribe.describe_scope(resource, unsubscribe.now_scope(ctx, pending)),
        "message_category": next((c["title"] for c in cats if c["api_name"] == category), None),
        "pending": pending, "joins": joins,
        "seconds_left": unsubscribe.seconds_left(pending, ctx.now) if pending else None,
        "timer_minutes": resource["unsubscribe"]["timer_minutes"],
        "blocked_text": resource["unsubscribe"].get("blocked_text"),
        "done": done, "notice": notice,
        # Undo only where it would restore something: this link's own recent unsubscribe.
        "can_undo": state == "unsubscribed" and unsubscribe.can_undo(client_of(app), ctx),
        "locales": LOCALES,
    }


def page_path(smid, script_root=None):
    """url_for("pages.unsubscribe_page", smid=smid) for a SMID that opened: base64url, which needs no quoting;
    under `script_root` (by default the request's). A URL build through Flask's routing map cost a third of
    page_view."""
    return (request.script_root if script_root is None else script_root) + PAGE_RULE.replace("<smid>", smid)


@bp.app_template_global()
def static_url(filename):
    """url_for("static", filename=filename), remembered per app root (SCRIPT_NAME) and static path: every page
    links the same stylesheet and script."""
    return _static_url(request.script_root, current_app.static_url_path, filename)


@functools.lru_cache(maxsize=64)
def _static_url(root, static_path, filename):
    return url_for("static", filename=filename)  # made under the request whose root and static path are the key


def customer_page_url(ctx):
    """Where the link's page is the customer's own (the resource's page_url, the SDK's page), filled in for this
    link; None where the page is ours, as it always is for a blocked resource. The target comes only from the
    resource's stored settings: no open redirect."""
    page_url = ctx.resource["unsubscribe"].get("page_url")
    if page_url and ctx.mode != "blocked":
        return fill_page_url(page_url, ctx.token, ctx.resource["rtoken"])
    return None


def fill_page_url(template, smid, rtoken):
    return template.replace("{send_message_id}", quote(smid, safe="")).replace("{resource_token}",
                                                                              quote(rtoken, safe=""))


def slash_optional_route(blueprint, rule, **options):
    """blueprint.route for `rule` (ending in "/") and for it without the slash, as links are sent. Werkzeug's
    strict_slashes=False alone serves both, but answers another method on the slashless path 404: it lists
    the allowed methods (the 405 and its Allow) only for a rule that matches the path as it is. URLs are built
    from `rule`, registered first. The link with "index.html" (or ".htm") after it, as someone may complete it,
    is the link too."""
    def register(view):
        view = blueprint.route(rule, strict_slashes=False, **options)(view)
        for index in ("index.html", "index.htm"):
            view = blueprint.route(rule + index, **options)(view)
        return blueprint.route(rule.rstrip("/"), **options)(view)
    return register


@slash_optional_route(bp, PAGE_RULE, methods=["GET", "POST"])
@csrf.exempt
def unsubscribe_page(smid):
    smid = token_in_link(smid)  # a link with a ">", "." or space after it, as mail clients and people leave it
    if request.method == "POST":
        if request.form.get("action") is None:
            return one_click(smid)
        check_link_form(smid)
        count_link_form(smid)  # a 429 before anything is read or changed (the one-click above is never limited)
        return page_action(smid, request.form["action"])
    try:
        # A fetch of the link the message carried counts (GET or HEAD), for the scanner review's get_burst; the
        # page the person's own form led to (`?done=`: the redirect after an action, the way back) does not:
        # confirm, Undo and confirm again is one look at the link and clicks, not a scanner's three fetches.
        ctx = open_page_context(smid, count_view=None if "done" in request.args else request.method,
                                with_pending=True)
    except ServiceError as exc:
        return error_page(exc)
    page_url = customer_page_url(ctx)
    if page_url:
        return redirect(page_url, code=302)
    done = request.args["done"] if "done" in request.args else None
    done = done if done in DONE_WORDS else None
    # A page of a kind many links share is filled in from one render (page_cache.py), without its view where
    # its kind is known by the view's inputs (page_kind_inputs).
    app = current_app._get_current_object()
    inputs = page_kind_inputs(ctx, done, g.locale, request.script_root)
    page = kept_page(app, ctx, inputs, g.locale, explicit_locale(), request.script_root)
    if page is None:
        view = page_view(ctx, done)
        # A page showing an Undo asks the ledger whether this link may undo (unsubscribe.can_undo): not of the
        # view's inputs, so not kept under them.
        page = render_link_page(page_template(ctx, view), view, inputs if view["state"] != "unsubscribed" else None,
                                ctx.resource)
    return no_store(make_response(page))


def page_template(ctx, view):
    """The mode's template; a timer still pending after the sender switched a delayed resource to instant or
    confirm is shown as the delayed page shows it (countdown, Cancel, Unsubscribe now)."""
    if view["pending"] and ctx.mode in ("instant", "confirm"):
        return "unsubscribe/delayed.html"
    return f"unsubscribe/{ctx.mode}.html"


ONE_CLICK_DONE = "Unsubscribed.\n"
# Where front.py leaves the exception its attempt at this request's one-click ended in.
ONE_CLICK_FAILURE = "unsubscribe.one_click_failure"


def one_click(smid):
    """RFC 8058: POST List-Unsubscribe=One-Click (either encoding; an empty or odd body is treated the same,
    since the signed URL is what identifies the recipient). 200 with a tiny body, never a redirect.
    front.py answers the common success case of this in front of Flask, with the same bytes."""
    failure = request.environ.get(ONE_CLICK_FAILURE)
    try:
        if failure is not None:
            raise failure  # the front tried this one-click already: its outcome is answered, not run again
        # open_smid + unsubscribe(resolve_scope(ctx), "one_click"), in two round trips (see hotpaths.py).
        hotpaths.one_click(get_redis(), current_app.extensions["signing_keys"], smid,
                           {"ip": request.remote_addr, "user_agent": (request.user_agent.string or "")[:512]})
    except Blocked:
        return plain("This subscription cannot be cancelled.\n", 403)
    except NotFound:
        return plain("Unknown unsubscribe link.\n", 404)
    return plain(ONE_CLICK_DONE, 200)


def check_link_form(link_token):
    """The CSRF check of a form on a link's page (this one's, and the manager's), before anything is read: the
    form carries this link's form token (tokens.issue_form_token), and the browser, where it says, sent it from
    this service's own origin. Raises CSRFError (400)."""
    origin = request.headers.get("Origin")
    # "null" is what a browser sends from our pages, whose Referrer-Policy is no-referrer.
    if request.headers.get("Sec-Fetch-Site") in ("cross-site", "same-site") or (
            origin not in (None, "null") and origin_of(origin, strict=True) not in (
                origin_of(current_app.config["PUBLIC_BASE_URL"]), origin_of(request.host_url))):
        raise CSRFError("The form was sent from another site.")
    if not form_token_matches(current_app.extensions["signing_keys"], link_token, request.form.get("csrf_token")):
        raise CSRFError("The form's token is missing or is not this page's.")


def plain(text, status):
    resp = make_response(text, status)
    resp.mimetype = "text/plain"
    return no_store(resp)


def no_store(resp):
    resp.headers["Cache-Control"] = "no-store"
    return resp


class PageChoiceError(InvalidInput):
    """A choice on the page the person must make again; its message is written for them, in their language."""


def page_action(smid, action):
    """A form POST from the page: change state, then show the page again (303) or answer JSON to fetch()."""
    r = get_redis()
    try:
        ctx = open_page_context(smid)
        if action not in PAGE_ACTIONS:
            raise InvalidInput("unknown action")
        if action == "unsubscribe":
            cats = request.form.getlist("categories") if ctx.mode == "confirm" else None
            if ctx.mode == "confirm" and not cats and request.form.get("scope") == "categories":
                raise PageChoiceError(_("Choose at least one kind of message to stop."))
            scope = unsubscribe.resolve_scope(ctx, cats or None)
            method = "page_confirm" if ctx.mode == "confirm" else "page_instant"
            if ctx.mode not in ("instant", "confirm"):
                raise InvalidInput("this page does not unsubscribe this way")
            unsubscribe.unsubscribe(r, ctx, scope, method, evidence())
            done = "unsubscribed"
        elif action == "undo":
            unsubscribe.undo(r, ctx, evidence())
            done = "undone"
        elif action == "start":
            if ctx.mode != "delayed":
                raise InvalidInput("this page has no timer")
            queue = get_timer_queue()
            unsubscribe.arm_timer(r, ctx, unsubscribe.resolve_scope(ctx), current_app.config["TIME_UNIT_SECONDS"],
                                  evidence(), on_armed=lambda *key: schedule_timer(queue, *key))
            done = "started"
        elif action == "cancel":
            outcome = unsubscribe.cancel_timer(r, ctx, evidence())
            done = "cancelled" if outcome in ("cancelled", "none") else "late"  # the timer had fired
        else:  # "now": settle the delayed unsubscribe immediately, in the scope the page showed
            # A timer outlives a change of mode, so any page may have offered this; one that fired meanwhile
            # leaves the link's own scope, already stopped (a blocked resource refuses, as for every action).
            unsubscribe.unsubscribe(r, ctx, unsubscribe.now_scope(ctx, unsubscribe.read_pending(r, ctx)), "page_now",
                                    evidence())
            done = "unsubscribed"
    except PageChoiceError as exc:
        if wants_json():
            return jsonify({"error": exc.code, "error_text": exc.message}), exc.status
        # The same page again, its choice to make with the reason next to it: not a page without a way back.
        view = dict(page_view(ctx, chosen=request.form.getlist("categories")), choice_error=exc.message)
        return no_store(make_response(render_page(page_template(ctx, view), **view), exc.status))
    except ServiceError as exc:
        if wants_json():
            return jsonify({"error": exc.code, "error_text": exc.message}), exc.status
        if isinstance(exc, Conflict):  # nothing changed; the page again, as it is now, without acting by itself
            return error_page(exc, back_url=page_back_url(ctx.token))
        return error_page(exc)
    if wants_json():
        return jsonify({"error": 0, "done": done})
    lang = request.form.get("lang")
    return redirect(url_for(PAGE_ENDPOINT, smid=smid, done=done,
                            **({"lang": lang} if lang in LOCALES else {})), code=303)


def page_back_url(smid, lang=None):
    """The way back to the unsubscribe page from an answer that changed nothing: the page as it is now, in this
    page's language (or `lang`, the switcher's), with a `done` ("back") that keeps it from acting by itself as
    a page first opened does."""
    return f"{page_path(smid)}?done=back&lang={lang or page_locale()}"


def language_href(code):
    """The language switcher's link (base.html, every page): this answer again in language `code`.

    At the unsubscribe page's path it must never open the page fresh: there a real browser's instant page
    unsubscribes and a delayed one starts a timer, and the person asked only for another language. So a view
    of the page keeps its `done` (a word of DONE_WORDS, nothing else of the query), and an answer to anything
    else, a form's POST (409, 413, 429, an error page), links to the way back (page_back_url): a repost would
    act again, the bare URL would act as first opened. Only the route's own token and fixed words go in.
    Elsewhere (the manager acts on no GET) the query is kept with `lang` swapped, so a notice survives."""
    req = request._get_current_object()  # one context-local lookup: every page calls this once per language
    args = req.args  # `in` first: werkzeug's get() of a missing key builds and catches an exception
    endpoint, view_args = req.endpoint, req.view_args
    if endpoint is None and isinstance(req.routing_exception, MethodNotAllowed):
        # A method no route takes (a PUT of the page's URL): its 405 page is at the page's path all the same.
        try:
            rule, view_args = current_app.create_url_adapter(req).match(method="GET", return_rule=True)
            endpoint = rule.endpoint
        except HTTPException:
            pass  # a path GET does not take either: no page of ours to act
    if endpoint == PAGE_ENDPOINT:
        if req.method in ("GET", "HEAD"):
            done = args["done"] if "done" in args else None
            return f"?done={done}&lang={code}" if done in DONE_WORDS else f"?lang={code}"
        return page_back_url(token_in_link(view_args["smid"]), code)
    if not args or (len(args) == 1 and "lang" in args):  # most pages: nothing else to keep
        return f"?lang={code}"
    return "?" + urlencode([(k, v) for k, v in args.items(multi=True) if k != "lang"] + [("lang", code)])


def refused_form_page(exc, link_token, read, back_url, **page):
    """The app's page for a link's form refused before anything was read or changed (413: small_bodies_only;
    429: count_link_form), with the way back to the link's page: back_url(token). It is made from the route's
    own path alone (never a Referer or the query), and only for a token the service issued (`read` verifies
    it: read_smid, read_manager_token); any other path gets no link."""
    token = token_in_link(link_token)
    try:
        read(current_app.extensions["signing_keys"], token)
    except BadToken:
        return http_error(exc)
    return http_error(exc, back_url=back_url(token), **page)


@bp.errorhandler(413)
@bp.errorhandler(429)
def form_refused(exc):
    return refused_form_page(exc, request.view_args["smid"], read_smid, page_back_url)


def wants_json():
    return request.accept_mimetypes.best == "application/json"


def error_page(exc, back_url=None):
    """A readable page in the chosen language. Core code's messages are English and written for developers, so
    a page shows its own: the person's choice to make again, or what went wrong. `back_url`: a link back to the
    unsubscribe page, one that does not make it act again (page_back_url)."""
    status = 404 if isinstance(exc, BadToken) else exc.status
    message = None  # the page's own text for its status
    if isinstance(exc, PageChoiceError):
        message = exc.message
    elif isinstance(exc, Conflict):
        message = _("That change is too old to undo, or something changed since.")  # under "Nothing to undo"
    elif isinstance(exc, InvalidInput):  # a page the sender changed since it was opened, or an altered form
        message = _("This page is out of date: the sender has changed this subscription's options since it "
                    "was opened. Please open the link again.")
    gone = isinstance(exc, NotFound) and not isinstance(exc, BadToken)  # the link is whole: do not say it is not
    return no_store(make_response(render_page("message.html", status=status, message=message, gone=gone,
                                                   incomplete=isinstance(exc, IncompleteToken),
                                                   back_url=back_url), status))


# Pages never load third-party code, never leak the SMID in a Referer, never render in frames.
PAGE_SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
)
NOSNIFF = ("X-Content-Type-Options", "nosniff")  # on every answer, API included


@bp.after_app_request
def security_headers(resp):
    # Names looked up in one pass: Headers.setdefault finds a missing name by raising and catching an
    # HTTPException, a few microseconds each on every page.
    present = set(resp.headers.keys(lower=True))
    for name, value in (PAGE_SECURITY_HEADERS if not request.path.startswith("/api/") else ()) + (NOSNIFF,):
        if name.lower() not in present:
            resp.headers.add(name, value)
    return resp
