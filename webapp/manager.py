"""Blueprint /manage/<token>: the subscription manager, one page for all of a profile's subscriptions.

The token is a signed, non-expiring manager token (tokens.py): it names the profile, and the subscription
whose message carried it (which alone may be resubscribed from `unsubscribed`). GET only reads; every
change is a POST followed by a 303 back to the page. Its CSRF token is bound to the manager link, as an
unsubscribe page's is to its SMID (pages.check_link_form): no session cookie, so its forms work in a mail app's
browser that blocks cookies, and across a rotation of the signing keys.
"""
import re
from urllib.parse import urlsplit

from flask import Blueprint, current_app, g, make_response, redirect, request, url_for
from flask_babel import gettext

from . import preferences
from .errors import BadToken, IncompleteToken, InvalidFields, ServiceError
from .locale import page_locale, render_page, set_page_locale
from .pages import (check_link_form, evidence, mask_address, no_store, refused_form_page, slash_optional_route,
                    spoken_address)
from .ratelimits import count_link_form
from .resources import current_field_values
from .store import ensure_housekeeping, get_redis
from .subscriptions import Status, subscribed_cats
from .tokens import issue_form_token, read_manager_token, token_in_link

bp = Blueprint("manager", __name__)
ACTIONS = ("save", "unsubscribe", "suspend", "resume", "resubscribe", "undo")
CHANNEL_LABELS = {"sms": "SMS", "telegram_bot": "Telegram", "whatsapp": "WhatsApp", "viber": "Viber",
                  "notify": "Notify"}


def channel_label(channel):
    """The channel's name in the page's language: email and push are words, the others names (the same in every
    language)."""
    if channel == "email":
        return gettext("Email")
    if channel == "push":
        return gettext("Push notifications")
    return CHANNEL_LABELS.get(channel, channel)


def source_label(reg_info):
    """Where the subscription came from, for "Why am I getting this?": a site's host, else how it was added."""
    url = reg_info.get("url")
    if url:
        return urlsplit(url).hostname or url
    return None


def subscription_view(token, hash_id, record, resource, errors=None, entered=None):
    """The card of one subscription. `entered` (a form refused for its fields: entered_form) is what the person
    chose in it, shown again, boxes too, so that correcting the field and saving keeps their other choices."""
    status = Status(record["status"])
    blocked = resource["unsubscribe"]["mode"] == "blocked"
    on = set(subscribed_cats(resource, record))
    stored_on = set(on)
    if entered is not None:
        shown = entered["shown_categories"]
        on = {c["api_name"] for c in resource["categories"] if (
            c["api_name"] in entered["categories"] if shown is None or c["api_name"] in shown
            else c["api_name"] in on)}
    fields, stored = [], current_field_values(resource, record["channel"], record.get("custom_fields", {}))
    for fdef in resource["channel_settings"].get(record["channel"], {}).get("fields", []):
        if fdef["in_manager"]:
            name, value = fdef["api_name"], stored.get(fdef["api_name"])
            if entered is not None and (entered["shown_fields"] is None or name in entered["shown_fields"]):
                value = (name in entered["fields"]) if fdef["type"] == "bool" else entered["fields"].get(name, value)
            fields.append({**fdef, "value": value, "error": (errors or {}).get(name)})
    return {
        "hash_id": hash_id, "resource": resource, "channel": record["channel"],
        "channel_label": channel_label(record["channel"]),
        "address": spoken_address(mask_address(record)), "status": status.word, "blocked": blocked,
        "categories": [{**c, "on": c["api_name"] in on or preferences.category_locked(c, blocked,
                                                                                    c["api_name"] in stored_on),
                        "locked": preferences.category_locked(c, blocked, c["api_name"] in stored_on)}
                       for c in resource["categories"] if c["in_manager"]],
        "fields": fields,
        "can_unsubscribe": not blocked and status in (Status.SUBSCRIBED, Status.SUSPENDED, Status.UNCONFIRMED),
        "can_suspend": not blocked and status == Status.SUBSCRIBED,
        "can_resume": status == Status.SUSPENDED,
        "can_resubscribe": status == Status.UNSUBSCRIBED and token.hash_id == hash_id,
        "needs_own_link": status == Status.UNSUBSCRIBED and token.hash_id != hash_id,
        "is_final": status in preferences.NOT_RESUBSCRIBABLE,
        "suspended_until": record.get("suspended_until"),
        "registered": record["reg_info"].get("date"), "source": source_label(record["reg_info"]),
        "updated_at": record.get("updated_at"),
    }


def entered_form():
    """A card's Save form as sent: the categories ticked, the field values (`field.<api_name>`; a bool's
    unchecked box sends nothing), and what the form showed (`shown_categories`, `shown_fields`: None for a page
    from before they were sent, which showed everything)."""
    return {"categories": request.form.getlist("categories"),
            "fields": {k[6:]: v for k, v in request.form.items() if k.startswith("field.")},
            **{name: None if request.form.get(name) is None else request.form[name].split()
               for name in ("shown_categories", "shown_fields")}}


def read_token(token):
    return read_manager_token(current_app.extensions["signing_keys"], token)


def render_manager(token_str, token, status=200, errors=None, entered=None, failed_hash=None, message=None,
                   done=None, done_hash=None, done_at=None):
    r = get_redis()
    items = preferences.overview(r, token.db_id, token.profile_id)
    if not items:
        return not_found(gone=True)  # a valid link whose subscriptions the sender removed
    # The language of the subscription whose message carried the link (its profile's, its resource's), as its
    # unsubscribe page chose it: not that of whichever subscription comes first by name.
    _, own_record, own_resource = next((item for item in items if item[0] == token.hash_id), items[0])
    set_page_locale(own_record.get("locale"), own_resource.get("default_locale"))
    subs = [subscription_view(token, h, rec, res, errors if h == failed_hash else None,
                              entered if h == failed_hash else None) for h, rec, res in items]
    groups = []
    for sub in subs:
        if not groups or groups[-1]["resource"]["id"] != sub["resource"]["id"]:
            groups.append({"resource": sub["resource"], "subscriptions": []})
        groups[-1]["subscriptions"].append(sub)
    if not done_agrees(next((sub for sub in subs if sub["hash_id"] == done_hash), None), done_at):
        done = done_hash = None
    undo_hash = preferences.undo_available(r, token.db_id, token.profile_id, token.hash_id)  # this link's own
    # The page's language in the forms' URL, as on the unsubscribe page: a 413 answers before the body (and its
    # `lang` field) is read.
    html = render_page("manage.html", groups=groups, action_url=url_for("manager.manage", token=token_str,
                                                                        lang=g.locale),
                           form_token=issue_form_token(current_app.extensions["signing_keys"], token_str),
                           undo_hash=undo_hash,
                           failed_hash=failed_hash, message=message, done=done, done_hash=done_hash,
                           suspend_days=preferences.SUSPEND_DAYS)
    return no_store(make_response(html, status))


def done_agrees(sub, done_at):
    """Whether the stored state still agrees with `?done=<action>&saved=<hash_id>&at=<updated_at>`, the
    redirect after a change: the card is still as that change left it. The URL can be typed, or come back from
    history (or keep its notice across a language link): its notice must not say what did not happen."""
    return sub is not None and bool(done_at) and sub["updated_at"] == done_at


def not_found(gone=False, incomplete=False):
    set_page_locale()
    return no_store(make_response(render_page("message.html", status=404, gone=gone, incomplete=incomplete), 404))


def manager_back_url(token):
    """The way back to the manager from an answer that changed nothing: its own link, in this page's language (a
    GET of the manager only reads)."""
    return url_for("manager.manage", token=token, lang=page_locale())


@bp.errorhandler(413)
@bp.errorhandler(429)
def form_refused(exc):
    return refused_form_page(exc, request.view_args["token"], read_manager_token, manager_back_url,
                             back_to="manager")


@slash_optional_route(bp, "/manage/<token>/", methods=["GET", "POST"])
def manage(token):
    token = token_in_link(token)  # a link with a ">", "." or space after it, as mail clients and people leave it
    try:
        parsed = read_token(token)
    except BadToken as exc:
        return not_found(incomplete=isinstance(exc, IncompleteToken))  # a link cut short says so
    if request.method != "POST":  # GET, and HEAD (Flask routes it here too): it only reads, whatever it carries
        done = request.args.get("done")
        return render_manager(token, parsed, done=done if done in ACTIONS else None,
                              done_hash=request.args.get("saved"), done_at=request.args.get("at"))
    check_link_form(token)  # CSRF: the form token bound to this manager link (no session cookie needed)
    count_link_form(token)  # a 429 before anything is read or changed
    action, hash_id = request.form.get("action"), request.form.get("hash_id", "")
    if action not in ACTIONS:
        return render_manager(token, parsed, status=400, message="unknown")
    r, ev = get_redis(), evidence()
    db_id, profile_id, link = parsed.db_id, parsed.profile_id, parsed.hash_id  # link: whose Undo the change is
    try:
        if action == "save":
            form = entered_form()
            record, _ = preferences.save_preferences(r, db_id, profile_id, hash_id, form["categories"],
                                                     form["fields"], ev, link, form["shown_categories"],
                                                     form["shown_fields"])
        elif action == "unsubscribe":
            record, _ = preferences.unsubscribe_all(r, db_id, profile_id, hash_id, ev, link)
        elif action == "suspend":
            days = request.form.get("days", "")
            record, _ = preferences.suspend(r, db_id, profile_id, hash_id,
                                            int(days) if re.fullmatch("[0-9]{1,3}", days) else 0,
                                            current_app.config["SUSPEND_DAY_SECONDS"], ev, link)
        elif action == "resume":
            record, _ = preferences.resume(r, db_id, profile_id, hash_id, ev, link)
        elif action == "resubscribe":
            record, _ = preferences.resubscribe(r, db_id, profile_id, hash_id, link, ev)
        else:
            record, _ = preferences.undo(r, db_id, profile_id, link, ev)
        if record.get("status") == Status.SUSPENDED:  # a pause (a suspend, an Undo that restores one): someone
            ensure_housekeeping()                     # must end it, also under a plain rq worker
    except InvalidFields as exc:
        return render_manager(token, parsed, status=400, errors=exc.errors, entered=entered_form(),
                              failed_hash=hash_id, message="InvalidFields")
    except ServiceError as exc:
        return render_manager(token, parsed, status=exc.status, failed_hash=hash_id,
                              message=type(exc).__name__)
    lang = request.form.get("lang")
    # The page opens at the changed card, so "Saved." is shown in it (`saved`), where the person looks, while the
    # card is as this change left it (`at`, done_agrees).
    where = {"saved": hash_id, "at": record.get("updated_at") or "", "_anchor": f"sub-{hash_id}"} if hash_id else {}
    return redirect(url_for("manager.manage", token=token, done=action, **where,
                            **({"lang": lang} if lang in ("en", "ru") else {})), code=303)
