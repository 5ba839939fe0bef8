"""The AkUnsub JS SDK (contract §5): the script at /ak_list_unsubscribe.js and the JSON endpoint it calls.

GET /ak_list_unsubscribe.js?id=<base64 of "account|resource">
    static/ak_list_unsubscribe.js with the resource's defaults filled in (pxl_domain = PUBLIC_BASE_URL, resource
    id). Public and cacheable (5 minutes, ETag); 404 with a JS comment for an unknown or malformed id (503 likewise
    while Redis is down: webapp/__init__.py). The rtoken
    is never put in the script: it is a secret of the customer's server.

POST /sdk/v1/<resource_id>/unsubscribe   {"smid", "action": "confirm"|"cancel"|"show"|"state", "categories"?, "rtoken"?}
    The resource is in the path so that a preflight, which has no body, can be answered for exactly that
    resource's origins. Checks, all before any change: the Origin header is one of the resource's URLs
    (`url`, `urls`; scheme://host[:port] compared exactly) else 403; Content-Type is application/json else 415
    (a form or text/plain POST is a CORS "simple request" that skips the preflight); the SMID verifies (404),
    belongs to this resource (403), and the rtoken, when given, matches (403). Blocked resources answer 403.
    Answers {"error": 0, "mode", "result", "status", "cats", "categories", "message_category", "pending"}; errors
    {"error": <http status>, "error_text": <readable>, "reason": <word>}. `pending` is the subscription's
    pending delayed timer in any mode (it outlives a switch of mode), null when none: {"deadline",
    "seconds_left", "cats", "whole", "stops", "continues"}, with the timer's own scope, not the link's.
OPTIONS on the same URL: the preflight; Access-Control-Allow-Origin is the exact origin, only when allowed.
GET /sdk/v1/<resource_id>/origin
    Read-only {"origin", "allowed"} for any origin, with Access-Control-Allow-Origin: * on every answer, errors
    too. A refused preflight, a network error and an answer without CORS headers (a 503 while Redis is down)
    look the same to a script; after a failed fetch the SDK asks this to tell the page which one it was: an
    origin the resource does not list, an unknown resource (404), a service that is unavailable (503).

Every /sdk/ response carries `Vary: Origin`. Cookies are never used (the SDK fetches with credentials 'omit'),
so the blueprint is exempt from CSRF; the Origin allow-list plus the forced preflight stand in for it, and the
signed SMID is the authorization (a non-browser client can forge Origin, never a SMID).

Rate limits (ratelimits.py: Flask-Limiter, Redis storage under keys.rate_limits()): POSTs per client IP and per
SMID (taken from the JSON body, counted under its digest), checked after the origin (check_origin_first: a POST
refused for its origin or resource counts against nothing), from the settings SDK_RATE_LIMIT_PER_IP /
SDK_RATE_LIMIT_PER_SMID (config.py), read from app config on every request. Over the limit: 429 JSON with
Retry-After (seconds until the breached window resets). While Redis refuses writes but serves reads (out of memory
under noeviction, a failed snapshot, a replica), the limiter cannot count: `show` and `state` then go through
uncounted and answer as usual (a `show` that would act, in instant or delayed mode, meets the same refusal: 503,
nothing written), and `confirm` and `cancel` answer 503 {"reason": "unavailable"}, with CORS headers, having
written nothing. A Redis that is down or stalled answers 503 (without CORS headers, see add_cors_headers), having
been waited for once.
"""
import base64
import binascii
import hashlib
import json
import os
import re
from urllib.parse import urlsplit

from flask import Blueprint, current_app, g, jsonify, make_response, request

from . import keys, unsubscribe
from .delayed import schedule_timer
from .errors import BadToken, Blocked, InvalidInput, NoSuchResource, NotFound, ServiceError
from .locale import choose_locale, request_accept_language
from .ratelimits import client_ip
from .resources import get_resource
from .store import get_redis, get_timer_queue
from .subscriptions import readable_record, state_of
from .tokens import SMID_MAX_CHARS, link_digest, same_secret
from .validation import idna_ascii, json_object

bp = Blueprint("sdk", __name__)

ACTIONS = ("confirm", "cancel", "show", "state")
READ_ONLY_ACTIONS = ("show", "state")  # let through uncounted while Redis refuses writes (see init_rate_limits)
PREFLIGHT_MAX_AGE = 7200  # Chromium caps Access-Control-Max-Age at 2 hours
SCRIPT_MAX_AGE = 300
SCRIPT_FILE = "ak_list_unsubscribe.js"
DEFAULTS_MARKER = "/*@ak-defaults*/null"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_SCRIPT_ID_RE = re.compile(r"^[A-Za-z0-9+/_-]{1,64}={0,2}\Z")


class SdkError(ServiceError):
    """A refusal with a machine-readable `reason` next to the readable message."""

    def __init__(self, status, reason, message):
        super().__init__(message)
        self.status = self.code = status
        self.reason = reason


# -- origins ------------------------------------------------------------------------------------------

def origin_of(url, strict=False):
    """scheme://host[:port] of an http(s) URL, lower-cased, default port dropped; None if it is not one.

    strict: `url` is an Origin header value, so it must be exactly an origin (no path, query or user)."""
    if not isinstance(url, str):
        return None
    try:
        parts = urlsplit(url.strip())
        scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError:
        return None
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    if strict and (parts.path or parts.query or parts.fragment or parts.username or parts.password):
        return None
    if not host.isascii():
        try:
            host = idna_ascii(host)
        except UnicodeError:
            return None
    if ":" in host:
        host = f"[{host}]"  # IPv6 literal
    if port == _DEFAULT_PORTS[scheme]:
        port = None
    return f"{scheme}://{host}" + (f":{port}" if port else "")


def allowed_origins(resource):
    """The origins of the resource's `url` and `urls`: the customer's own sites."""
    found = (origin_of(u) for u in [resource.get("url"), *(resource.get("urls") or [])] if u)
    return {o for o in found if o}


def request_origin():
    """The caller's Origin, normalised; None when absent or not an http(s) origin (e.g. "null")."""
    return origin_of(request.headers.get("Origin"), strict=True)


def _load_resource(resource_id):
    """The resource of this request, read once per request; None when it does not exist."""
    if "sdk_resource" not in g:
        try:
            g.sdk_resource = get_resource(get_redis(), resource_id)
        except NoSuchResource:
            g.sdk_resource = None
    return g.sdk_resource


def cors_allowed_origin():
    """The request's Origin if the resource named in the URL lists it, else None."""
    resource_id = (request.view_args or {}).get("resource_id")
    origin = request_origin()
    if resource_id is None or origin is None:
        return None
    resource = _load_resource(resource_id)
    return origin if resource and origin in allowed_origins(resource) else None


@bp.before_request
def check_origin_first():
    """For the endpoint, before anything else looks at the request (only the body size check comes earlier):
    answer the preflight, and refuse (403, or 404 for an unknown resource) a POST from an origin the resource
    does not list. The rate limiter's hook comes after this one (ratelimits.init_app appends it to the
    blueprint's hooks, registered before it), so a refused request counts against no limit: a page on another
    site cannot use up a person's allowance, per address or per SMID. The response headers are added by
    add_cors_headers."""
    if request.endpoint != "sdk.sdk_unsubscribe":
        return None
    resource_id = request.view_args["resource_id"]
    try:
        resource = _load_resource(resource_id)
        if resource is None:
            raise SdkError(404, "unknown_resource", f"Unknown resource {resource_id}: check the script's id")
        origin = request_origin()
        if origin is None:
            raise SdkError(403, "forbidden_origin",
                           "This request has no web page origin: the SDK must be used from a page of one of "
                           "the resource's sites")
        if origin not in allowed_origins(resource):
            raise SdkError(403, "forbidden_origin",
                           f"The origin {origin} is not allowed for this resource: add it to the resource's URLs")
    except SdkError as exc:
        return error_response(exc)
    if request.method == "OPTIONS":
        resp = make_response("", 204)
        del resp.headers["Content-Type"]
        resp.headers["Access-Control-Allow-Methods"] = "POST"
        resp.headers["Access-Control-Allow-Headers"] = "Content-Type"
        resp.headers["Access-Control-Max-Age"] = str(PREFLIGHT_MAX_AGE)
        return resp
    return None


@bp.after_app_request
def add_cors_headers(resp):
    """Vary: Origin on every /sdk/ answer; Access-Control-Allow-Origin only for an allowed origin (429s too,
    so that the page can read why)."""
    if not request.path.startswith("/sdk/"):
        return resp
    resp.vary.add("Origin")
    resp.headers.setdefault("Cache-Control", "no-store")
    if request.endpoint == "sdk.sdk_origin":
        resp.headers["Access-Control-Allow-Origin"] = "*"  # read-only, no credentials: any page may ask, errors too
        return resp
    # A 503 before the resource was read means Redis is down or stalled: asking it again would fail again (after
    # another timeout), so that answer goes without Access-Control-Allow-Origin. The page sees a network error,
    # and the SDK's question to /origin, which any page may read, tells it the service is unavailable. A Redis
    # that refused the limiter's write still answers reads, so that 503 is made readable to the page.
    if "Access-Control-Allow-Origin" not in resp.headers and (
            resp.status_code != 503 or "sdk_resource" in g or g.get("sdk_writes_refused")):
        origin = cors_allowed_origin()
        if origin:
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Access-Control-Expose-Headers"] = "Retry-After"
    return resp


def error_response(exc):
    if isinstance(exc, SdkError):
        reason = exc.reason
    elif isinstance(exc, Blocked):
        reason = "blocked"
    elif isinstance(exc, BadToken):
        reason = "unknown_smid"
    elif isinstance(exc, NotFound):
        reason = "not_found"
    elif isinstance(exc, InvalidInput):
        reason = "invalid"
    else:  # no other refusal is raised on this path (Forbidden's are SdkErrors or Blocked); the README lists these
        reason = "error"
    message = exc.message
    if isinstance(exc, BadToken):
        message = "Unknown or invalid SMID (message id): it was altered or cut, or it is not a SMID"
    return jsonify({"error": exc.status, "error_text": message, "reason": reason}), exc.status


# -- the endpoint -------------------------------------------------------------------------------------

def sdk_evidence(ctx):
    """What the ledger keeps about who asked: IP, user agent, and the language the person's page would use."""
    locale = choose_locale(None, ctx.record.get("locale"), ctx.resource.get("default_locale"),
                           request_accept_language(), current_app.config["DEFAULT_LOCALE"])
    return {"ip": request.remote_addr, "user_agent": (request.user_agent.string or "")[:512], "locale": locale}


def _json_body():
    """The request's JSON object, read once per request (the rate limiter's key reads it before the view)."""
    if "sdk_body" not in g:
        g.sdk_body = _read_json_body()
    if isinstance(g.sdk_body, SdkError):
        raise g.sdk_body
    return g.sdk_body


def _read_json_body():
    """The body as a JSON object, or the SdkError that answers it."""
    if request.mimetype != "application/json":
        return SdkError(415, "unsupported_media_type", "Send the request as Content-Type: application/json")
    try:
        return json_object(request.get_data(cache=True), "The request body")
    except InvalidInput as exc:
        return SdkError(400, "invalid", exc.message)


def _action(body):
    return body.get("action", "confirm")


def _state(r, ctx, result):
    with r.pipeline(transaction=False) as pipe:  # the record, the pending timer and the clock, in one round trip
        pipe.hget(keys.profile_subscriptions(*ctx.key[:2]), ctx.smid.hash_id)
        pipe.hgetall(keys.pending_unsubscribe(*ctx.key))
        pipe.time()
        raw, ctx.pending_fields, (seconds, micros) = pipe.execute()
    ctx.now = seconds + micros / 1_000_000
    record = (readable_record(raw, f"subscription {ctx.smid.hash_id} of a link") if raw else None) or ctx.record
    state = state_of(ctx.resource, record)
    pending = unsubscribe.read_pending(r, ctx)  # in every mode: a timer outlives a change of mode, and fires
    stoppable = record["status"] in unsubscribe.STOPPABLE_STATUSES  # a paused one's categories come back too
    own = unsubscribe.message_category(ctx)
    return {
        "error": 0, "mode": ctx.mode, "result": result, "status": state["status"], "cats": state["cats"],
        # choosable: confirm may name it in `categories` from this link (the message's own category, even a
        # required one, and every category that is not required)
        "categories": [{"api_name": c["api_name"], "title": c["title"], "required": c["required"],
                        "subscribed": c["api_name"] in state["cats"] and stoppable,
                        "choosable": unsubscribe.person_may_stop(c, own)}
                       for c in ctx.resource["categories"]],
        "message_category": own,  # what a category link's page should pre-select
        "pending": _pending_state(ctx, pending),
    }


def _pending_state(ctx, pending):
    """The pending timer as the page shows it: when, and its own scope (it may have been started, or widened,
    from another message's link): "cats" (api names, null for the whole subscription), and the titles of what
    stops and what continues."""
    if not pending:
        return None
    scope = unsubscribe.describe_scope(ctx.resource, pending["scope"])
    return {"deadline": pending["deadline"], "seconds_left": unsubscribe.seconds_left(pending, ctx.now),
            "cats": pending["scope"]["cats"], "whole": scope["whole"], "stops": scope["stops"],
            "continues": scope["continues"]}


@bp.route("/sdk/v1/<int:resource_id>/unsubscribe", methods=["POST", "OPTIONS"], provide_automatic_options=False)
def sdk_unsubscribe(resource_id):
    resource = g.sdk_resource  # read, and the origin checked, by check_origin_first (which answers the OPTIONS)
    r = get_redis()
    try:
        body = _json_body()
        action = _action(body)
        if action not in ACTIONS:
            raise SdkError(400, "invalid", "action must be one of: " + ", ".join(ACTIONS))
        if "resource_id" in body and body["resource_id"] != resource["id"]:
            raise SdkError(400, "invalid", "resource_id does not match the script's resource")
        smid = body.get("smid")
        if not isinstance(smid, str) or not smid:
            raise SdkError(400, "invalid", "smid is required (the message id from the page's URL)")
        # A show may act on the pending timer (see show): it is read in the same round trip as the SMID's record.
        ctx = unsubscribe.open_smid(r, current_app.extensions["signing_keys"], smid, with_pending=action == "show")
        if ctx.resource["id"] != resource["id"]:
            raise SdkError(403, "wrong_resource", "This message was not sent for this resource")
        rtoken = body.get("rtoken")
        if rtoken is not None and not same_secret(rtoken, ctx.resource["rtoken"]):
            raise SdkError(403, "bad_rtoken", "The resource token (rtoken) does not match this resource")
        categories = body.get("categories")
        if action == "confirm":
            scope = unsubscribe.resolve_scope(ctx, categories)
            unsubscribe.unsubscribe(r, ctx, scope, "sdk", sdk_evidence(ctx))
            result = "unsubscribed"
        elif action == "cancel":
            if categories is not None:  # checked, but a cancel stops the whole pending timer
                unsubscribe.resolve_scope(ctx, categories, by_person=False)
            result = unsubscribe.cancel_timer(r, ctx, sdk_evidence(ctx))
        else:  # "show": what the hosted page does when a real browser displays it; "state": the same, acting on
            # nothing (what the script asks in a browser an automation drives: a link scanner's)
            result = show(r, ctx, act=action == "show")
    except ServiceError as exc:
        return error_response(exc)
    return jsonify(_state(r, ctx, result))


def show(r, ctx, act=True):
    if ctx.mode == "blocked":
        raise Blocked(ctx.resource["unsubscribe"].get("blocked_text") or "This subscription cannot be cancelled")
    scope = unsubscribe.resolve_scope(ctx)
    if not act:
        return "waiting"  # until confirmUnsub, as in confirm mode
    if ctx.mode == "instant":
        if unsubscribe.read_pending(r, ctx):  # as read with the SMID (open_smid's with_pending)
            return "pending"  # a timer started before the sender switched to instant: shown as the page shows it
        unsubscribe.unsubscribe(r, ctx, scope, "sdk", sdk_evidence(ctx))
        return "unsubscribed"
    if ctx.mode == "delayed":
        queue = get_timer_queue()
        armed = unsubscribe.arm_timer(r, ctx, scope, current_app.config["TIME_UNIT_SECONDS"], sdk_evidence(ctx),
                                      on_armed=lambda *key: schedule_timer(queue, *key))
        return armed["state"]
    return "waiting"  # confirm: nothing changes until confirmUnsub


@bp.route("/sdk/v1/<int:resource_id>/origin", methods=["GET"])
def sdk_origin(resource_id):
    resource = _load_resource(resource_id)
    if resource is None:
        return error_response(SdkError(404, "unknown_resource", f"Unknown resource {resource_id}"))
    origin = request_origin()
    return jsonify({"origin": origin, "allowed": bool(origin and origin in allowed_origins(resource))})


# -- the script ---------------------------------------------------------------------------------------

def _script_source():
    path = os.path.join(current_app.static_folder, SCRIPT_FILE)
    stamp = os.stat(path).st_mtime_ns
    cached = current_app.extensions.get("sdk_script")
    if cached is None or cached[0] != stamp:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        if DEFAULTS_MARKER not in source:
            raise RuntimeError(f"{SCRIPT_FILE} lost its defaults marker {DEFAULTS_MARKER}")
        cached = current_app.extensions["sdk_script"] = (stamp, source)
    return cached[1]


def parse_script_id(value):
    """The resource id of an `id` parameter: base64 (standard or URL-safe, padding optional) of "1|<id>"."""
    if not isinstance(value, str) or not _SCRIPT_ID_RE.match(value):
        return None
    value = value.rstrip("=").replace("-", "+").replace("_", "/")
    try:
        text = base64.b64decode(value + "=" * (-len(value) % 4), validate=True).decode("ascii")
    except (binascii.Error, ValueError):
        return None
    account, sep, resource = text.partition("|")
    if account != "1" or not sep or not resource.isdigit() or len(resource) > 12 or resource.startswith("0"):
        return None
    return int(resource)


def _js(body, status):
    resp = make_response(body, status)
    resp.headers["Content-Type"] = "application/javascript; charset=utf-8"
    return resp


@bp.route("/ak_list_unsubscribe.js", methods=["GET"])
def sdk_script():
    resource_id = parse_script_id(request.args.get("id"))
    resource = _load_resource(resource_id) if resource_id is not None else None
    if resource is None:
        resp = _js("/* AkUnsub: unknown or malformed resource id */\n", 404)
        resp.headers["Cache-Control"] = "no-store"
        return resp
    defaults = {"pxl_domain": current_app.config["PUBLIC_BASE_URL"].rstrip("/"), "resource_id": resource["id"]}
    # From config and the store only, never from the Host header: this answer is cached publicly.
    literal = json.dumps(defaults, separators=(",", ":")).replace("<", "\\u003c")
    body = _script_source().replace(DEFAULTS_MARKER, literal, 1)
    resp = _js(body, 200)
    resp.headers["Cache-Control"] = f"public, max-age={SCRIPT_MAX_AGE}"
    resp.headers["Cross-Origin-Resource-Policy"] = "cross-origin"  # loadable from pages that require CORP
    resp.headers["Access-Control-Allow-Origin"] = "*"  # and with crossorigin="anonymous" (SRI): public, no cookies
    resp.set_etag(hashlib.sha256(body.encode()).hexdigest()[:32])
    return resp.make_conditional(request)


# -- rate limits --------------------------------------------------------------------------------------

def _smid_key():
    """The per-SMID counter's key: a digest of the SMID, as no Redis key holds a whole token (keys.py)."""
    try:
        smid = _json_body().get("smid")
    except SdkError:
        smid = None
    if not isinstance(smid, str) or not 0 < len(smid) <= SMID_MAX_CHARS:
        return "-"
    return link_digest(smid)


def _read_only_while_writes_refused():
    """Whether this request may go on uncounted while Redis refuses the limiter's writes: a read-only action,
    as the page GET goes without its view count (hotpaths._read_for_page)."""
    g.sdk_writes_refused = True  # reads still work: the 503 may carry CORS headers (add_cors_headers)
    try:
        action = _action(_json_body())
    except SdkError:  # a body the view would refuse: it acts on nothing, and the 503 stands
        return False
    return action in READ_ONLY_ACTIONS


def init_rate_limits(limiter):
    """The endpoint's limits on the blueprint, checked before the view (ratelimits.init_app hooks them)."""
    limiter.limit(lambda: current_app.config["SDK_RATE_LIMIT_PER_IP"], key_func=client_ip, methods=["POST"],
                  scope="sdk-ip", error_message="Too many requests from this address")(bp)
    limiter.limit(lambda: current_app.config["SDK_RATE_LIMIT_PER_SMID"], key_func=_smid_key, methods=["POST"],
                  scope="sdk-smid", error_message="Too many requests for this message")(bp)
    limiter.uncounted_while_writes_refused[bp.name] = _read_only_while_writes_refused
