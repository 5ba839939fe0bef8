"""Resources: what a person subscribes to, over which channels, with which categories, custom fields and
unsubscribe mode. Validation and storage (one JSON document per resource, see keys.py).

Rules kept here:
- at most 8 channels; known channels have their own settings, custom channels are named ^[a-z][a-z0-9_]*$;
- category and custom-field api_names are fixed after creation: an update must list every existing
  api_name (or name it in `delete_categories` / a channel's `delete_fields`), and a field keeps its type;
  a custom field's api_name is not one of the channel's system fields (`system_fields`);
- the email channel's List-ID follows RFC 2919 (dot-atom-text label, <= 255 octets) and its domain is the
  sender's domain or a subdomain of it;
- unsubscribe: mode instant|confirm|blocked|delayed, timer_minutes 1..30 (delayed), page_url may use only
  {send_message_id} (which it must contain) and {resource_token}.
"""
import functools
import json
import logging
import re

from . import keys
from .errors import DamagedData, InvalidInput, NoSuchResource, or_none_if_damaged
from .tokens import new_resource_token
from .validation import (DOT_ATOM_RE, as_api_name, as_bool, as_email, as_float, as_hostname, as_int,
                         as_list, as_object, as_text, as_url, blank_or, is_flag, is_int, is_object, is_optional_text,
                         is_text, list_of, no_unknown_keys, now_iso, object_of, require)

log = logging.getLogger(__name__)

MAX_CHANNELS = 8
# Bounds of a resource (the seed sets none): a resource document is read whole by every page and link, and a
# record's values decoded on every request. openapi.py states the same numbers.
MAX_CATEGORIES = 200
MAX_FIELDS = 100  # custom fields per channel
MAX_LINE_LENGTH = 1024  # characters of a `line` field's value
KNOWN_CHANNELS = ("email", "sms", "push", "telegram_bot", "whatsapp", "viber", "notify")
CUSTOM_CHANNEL_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}\Z")
FIELD_TYPES = ("int", "float", "line", "bool")
MODES = ("instant", "confirm", "blocked", "delayed")
LOCALES = ("en", "ru")
PAGE_URL_PLACEHOLDERS = ("send_message_id", "resource_token")
DEFAULT_TIMER_MINUTES = 10

# Per-channel settings besides `fields`: name -> max length (all strings).
CHANNEL_SETTINGS = {
    "email": {"from_name": 255, "from_email": 254, "replyto_name": 255, "replyto_email": 254, "list_id": 1024},
    "sms": {"sender": 64},
    "push": {},  # `providers`: list of names, handled below
    "telegram_bot": {"bot_token": 256},
    "whatsapp": {"connection": 255, "sender": 255},
    "viber": {"connection": 255, "sender": 255},
    "notify": {"connection": 255, "sender": 255},
}
CUSTOM_CHANNEL_SETTINGS = {"connection": 255, "sender": 255}

TOP_LEVEL_FIELDS = ("name", "description", "url", "urls", "dbs_ids", "trk_domain", "increase_priority",
                    "categories", "channels", "channel_settings", "unsubscribe", "default_locale")
UPDATE_ONLY_FIELDS = ("id", "delete_categories", "regenerate_rtoken")


def validate_list_id(list_id, from_email, field="channel_settings.email.list_id"):
    """RFC 2919 list-id = list-label "." namespace, <= 255 octets, namespace = sender domain (or below it)."""
    if len(list_id.encode()) > 255:
        raise InvalidInput(f"{field} must not be longer than 255 octets (RFC 2919)", field=field)
    if not DOT_ATOM_RE.match(list_id) or "." not in list_id:
        raise InvalidInput(f"{field} must be label.domain without < > or spaces (RFC 2919)", field=field)
    lowered = list_id.lower()
    if lowered.endswith(".localhost"):
        return list_id
    domain = from_email.rpartition("@")[2] if from_email else ""
    if not domain or not lowered.endswith("." + domain) or lowered == "." + domain:
        raise InvalidInput(f"{field} must end with the sender's domain ({domain or 'from_email is not set'}), "
                           "e.g. news." + (domain or "example.com"), field=field)
    return list_id


def _or_default(value, default):
    """An optional value given as null is not given (README, API notes): its default."""
    return default if value is None else value


def _validate_field_value(ftype, value, field):
    """Check one custom-field value against its type; returns the stored value."""
    if ftype == "int":
        return as_int(value, field, -(2 ** 63), 2 ** 63 - 1, allow_text=False)
    if ftype == "float":
        return as_float(value, field)
    if ftype == "bool":
        return as_bool(value, field)
    return as_text(value, field, max_len=MAX_LINE_LENGTH)


FIELD_VALUE_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "line": (str,)}


def subscription_fields(resource, channel):
    """The fields a subscription's custom_fields may hold on the channel, api_name -> definition: the channel's
    standard fields (STANDARD_FIELDS), then the resource's custom fields."""
    standard = {name: {"title": title, "api_name": name, "type": ftype, "default": None, "required": False,
                       "in_manager": False} for name, title, ftype in STANDARD_FIELDS.get(channel, ())}
    return {**standard, **{f["api_name"]: f for f in resource["channel_settings"].get(channel, {}).get("fields", [])}}


def current_field_values(resource, channel, values):
    """The stored custom-field values the channel still has a field for, each still of that field's type: a
    field deleted (or deleted and added again with another type) leaves values behind in the records. Only
    the type is looked at: a value stored under older rules of content stays."""
    defs = subscription_fields(resource, channel)
    return {name: value for name, value in values.items() if name in defs and (
        value is None or (isinstance(value, FIELD_VALUE_TYPES[defs[name]["type"]])
                          and (defs[name]["type"] == "bool") == isinstance(value, bool)))}


def validate_field_value(field_def, value, where):
    return _validate_field_value(field_def["type"], value, f"{where}{field_def['api_name']}")


def _validate_fields(channel, items, old_fields, deletions, where):
    """Validate a channel's custom-field list against the stored one (api_name and type are fixed)."""
    old = {f["api_name"]: f for f in old_fields}
    system_names = {name for name, _title, _type, _required in system_fields(channel)}
    out, seen = [], set()
    for i, item in enumerate(as_list(items, f"{where}fields", max_items=MAX_FIELDS)):
        at = f"{where}fields[{i}]."
        as_object(item, at[:-1])
        no_unknown_keys(item, ("title", "api_name", "type", "default", "required", "in_manager"), at)
        api_name = as_api_name(require(item, "api_name", at), f"{at}api_name")
        if api_name in seen:
            raise InvalidInput(f"{at}api_name {api_name!r} is used twice", field=f"{at}api_name")
        seen.add(api_name)
        # fields_get would list two fields of that name. One stored before this rule keeps its fixed name.
        if api_name in system_names and api_name not in old:
            raise InvalidInput(f"{at}api_name {api_name!r} is the name of a system field of the {channel} channel",
                               field=f"{at}api_name")
        ftype = require(item, "type", at)
        if ftype not in FIELD_TYPES:
            raise InvalidInput(f"{at}type must be one of {', '.join(FIELD_TYPES)}", field=f"{at}type")
        if api_name in old and old[api_name]["type"] != ftype:
            raise InvalidInput(f"{at}type of existing field {api_name!r} cannot change", field=f"{at}type")
        default = item.get("default")
        if default is not None:
            default = _validate_field_value(ftype, default, f"{at}default")
        out.append({
            "title": as_text(_or_default(item.get("title"), api_name), f"{at}title", allow_empty=False),
            "api_name": api_name, "type": ftype, "default": default,
            "required": as_bool(item.get("required", False), f"{at}required"),
            "in_manager": as_bool(item.get("in_manager", False), f"{at}in_manager"),
        })
    _check_nothing_renamed(old, seen, deletions, f"{where}fields", "delete_fields")
    return out


def _check_nothing_renamed(old, seen, deletions, field, deletion_key):
    for name in deletions:
        if name in seen:
            raise InvalidInput(f"{name!r} is both kept and deleted", field=deletion_key)
    missing = sorted(set(old) - seen - set(deletions))
    if missing:
        raise InvalidInput(f"{field} must keep api_name {missing[0]!r}: api names are fixed after creation "
                           f"(list it in {deletion_key} to remove it)", field=field)


def _validate_categories(items, old_categories, deletions):
    old = {c["api_name"]: c for c in old_categories}
    out, seen = [], set()
    for i, item in enumerate(as_list(items, "categories", max_items=MAX_CATEGORIES)):
        at = f"categories[{i}]."
        as_object(item, at[:-1])
        no_unknown_keys(item, ("title", "api_name", "in_manager", "required"), at)
        api_name = as_api_name(require(item, "api_name", at), f"{at}api_name")
        if api_name in seen:
            raise InvalidInput(f"{at}api_name {api_name!r} is used twice", field=f"{at}api_name")
        seen.add(api_name)
        out.append({
            "title": as_text(_or_default(item.get("title"), api_name), f"{at}title", allow_empty=False),
            "api_name": api_name,
            "in_manager": as_bool(item.get("in_manager", True), f"{at}in_manager"),
            "required": as_bool(item.get("required", False), f"{at}required"),
        })
    _check_nothing_renamed(old, seen, deletions, "categories", "delete_categories")
    return out


def _validate_channel_settings(channel, settings, old_settings):
    where = f"channel_settings.{channel}."
    settings = as_object({} if settings is None else settings, where[:-1])
    allowed = CHANNEL_SETTINGS.get(channel, CUSTOM_CHANNEL_SETTINGS)
    extra = ("fields", "delete_fields") + (("providers",) if channel == "push" else ())
    no_unknown_keys(settings, tuple(allowed) + extra, where)
    merged = {k: v for k, v in (old_settings or {}).items() if k != "fields"}
    for key, max_len in allowed.items():
        if key in settings:
            merged[key] = as_text(settings[key] if settings[key] is not None else "", where + key, max_len)
        merged.setdefault(key, "")
    if channel == "push":
        providers = as_list(settings.get("providers", merged.get("providers", [])), where + "providers", 32)
        merged["providers"] = [as_text(p, f"{where}providers", 64, allow_empty=False) for p in providers]
    if channel == "email":
        for key in ("from_email", "replyto_email"):
            if merged[key]:
                merged[key] = as_email(merged[key], where + key)
        if merged["list_id"]:
            validate_list_id(merged["list_id"], merged["from_email"], where + "list_id")
    deletions = [as_api_name(name, where + "delete_fields")
                 for name in as_list(settings.get("delete_fields", []), where + "delete_fields")]
    old_fields = (old_settings or {}).get("fields", [])
    fields = settings["fields"] if "fields" in settings else [f for f in old_fields if f["api_name"] not in deletions]
    merged["fields"] = _validate_fields(channel, fields, old_fields, deletions, where)
    return merged


def _validate_unsubscribe(value, old):
    value = as_object(value, "unsubscribe")
    no_unknown_keys(value, ("mode", "timer_minutes", "page_url", "blocked_text", "list_unsubscribe"), "unsubscribe.")
    merged = dict(old or {"mode": "instant", "timer_minutes": DEFAULT_TIMER_MINUTES, "page_url": None,
                          "blocked_text": None, "list_unsubscribe": {"enabled": True, "called_url": None}})
    merged.update({k: v for k, v in value.items() if k != "list_unsubscribe"})
    if merged["mode"] not in MODES:
        raise InvalidInput(f"unsubscribe.mode must be one of {', '.join(MODES)}", field="unsubscribe.mode")
    timer_minutes = merged.get("timer_minutes")
    merged["timer_minutes"] = as_int(DEFAULT_TIMER_MINUTES if timer_minutes is None else timer_minutes,
                                     "unsubscribe.timer_minutes", 1, 30)
    if merged.get("page_url") is not None:
        as_url(merged["page_url"], "unsubscribe.page_url", PAGE_URL_PLACEHOLDERS)
        # The seed makes it a required parameter: a page without it cannot tell whose subscription to stop.
        # Checked when given: a resource stored before this rule can still be updated in its other parts.
        if "{send_message_id}" not in merged["page_url"] and value.get("page_url") is not None:
            raise InvalidInput("unsubscribe.page_url must contain {send_message_id}, which names the message "
                               "(and so the subscription) to unsubscribe", field="unsubscribe.page_url")
    if merged.get("blocked_text") is not None:
        as_text(merged["blocked_text"], "unsubscribe.blocked_text", max_len=2000)
    lu = dict(merged.get("list_unsubscribe") or {})
    if "list_unsubscribe" in value:
        given = as_object(value["list_unsubscribe"], "unsubscribe.list_unsubscribe")
        no_unknown_keys(given, ("enabled", "called_url"), "unsubscribe.list_unsubscribe.")
        lu.update(given)
    lu["enabled"] = as_bool(lu.get("enabled", True), "unsubscribe.list_unsubscribe.enabled")
    if lu.get("called_url") is not None:
        lu["called_url"] = as_url(lu["called_url"], "unsubscribe.list_unsubscribe.called_url", sendable=True)
    merged["list_unsubscribe"] = {"enabled": lu["enabled"], "called_url": lu.get("called_url")}
    return merged


def validate_resource(data, old=None):
    """Return the normalised resource built from `data` (a full add, or a partial update of `old`).

    Raises InvalidInput naming the first field that breaks a rule.
    """
    data = as_object(data, "request")
    no_unknown_keys(data, TOP_LEVEL_FIELDS + (UPDATE_ONLY_FIELDS if old else ()) + ("token",))
    res = dict(old or {})
    if old is None or "name" in data:
        res["name"] = as_text(require(data, "name"), "name", allow_empty=False, for_header=True)  # List-ID
    description = data.get("description", res.get("description"))
    res["description"] = as_text("" if description is None else description, "description", 2000)
    if "url" in data or old is None:
        res["url"] = blank_or(data.get("url"), as_url, "url")
    urls = data.get("urls", res.get("urls", []))
    res["urls"] = [as_url(u, f"urls[{i}]") for i, u in enumerate(as_list(urls, "urls", 50))]
    dbs = data.get("dbs_ids", res.get("dbs_ids", []))
    res["dbs_ids"] = sorted({as_int(d, "dbs_ids", 1, 2 ** 31) for d in as_list(dbs, "dbs_ids", 1000)})
    res["trk_domain"] = blank_or(data.get("trk_domain", res.get("trk_domain")), as_hostname, "trk_domain")
    res["increase_priority"] = as_bool(data.get("increase_priority", res.get("increase_priority", False)),
                                       "increase_priority")
    # None: the visitor's Accept-Language decides (a resource default would always win over it).
    locale = data.get("default_locale", res.get("default_locale"))
    if locale is not None and locale not in LOCALES:
        raise InvalidInput(f"default_locale must be one of {', '.join(LOCALES)}", field="default_locale")
    res["default_locale"] = locale

    deletions = [as_api_name(name, "delete_categories")
                 for name in as_list(data.get("delete_categories", []), "delete_categories")]
    old_cats = (old or {}).get("categories", [])
    cats = data["categories"] if "categories" in data else [c for c in old_cats if c["api_name"] not in deletions]
    res["categories"] = _validate_categories(cats, old_cats, deletions)

    channels = data.get("channels", res.get("channels"))
    if channels is None:
        raise InvalidInput("channels is required", field="channels")
    channels = as_list(channels, "channels")
    if not channels:
        raise InvalidInput("channels must name at least one channel", field="channels")
    if len(channels) > MAX_CHANNELS:
        raise InvalidInput(f"a resource has at most {MAX_CHANNELS} channels", field="channels")
    for ch in channels:
        if not isinstance(ch, str) or not (ch in KNOWN_CHANNELS or CUSTOM_CHANNEL_RE.match(ch)):
            raise InvalidInput(f"channel {ch!r} is not a channel name", field="channels")
    if len(set(channels)) != len(channels):
        raise InvalidInput("channels lists a channel twice", field="channels")
    given_settings = as_object(data.get("channel_settings", {}), "channel_settings")
    for name in given_settings:
        if name not in channels:
            raise InvalidInput(f"channel_settings.{name} is not one of the resource's channels",
                               field=f"channel_settings.{name}")
    old_settings = res.get("channel_settings", {})
    res["channels"] = channels
    res["channel_settings"] = {ch: _validate_channel_settings(ch, given_settings.get(ch), old_settings.get(ch))
                               for ch in channels}
    res["unsubscribe"] = _validate_unsubscribe(data.get("unsubscribe", {}), res.get("unsubscribe"))
    return res


class DamagedResource(DamagedData):
    """Stored text that is not a resource as the service writes it (edited in Redis by hand, or damaged
    storage): every reader takes it as no resource (readable), and resources/delete removes it."""


# What the readers rely on of a stored resource (validate_resource writes every member; a resource stored by
# an older version may lack some of the optional ones).
_ITEM = {"api_name": is_text, "title": is_text, "in_manager": is_flag, "required": is_flag}
_STORED = object_of({
    "id": is_int, "name": is_text, "rtoken": is_text, "channels": list_of(is_text),
    "categories": list_of(object_of(_ITEM, ("api_name", "title", "required"))),
    "channel_settings": is_object, "default_locale": lambda v: v is None or v in LOCALES,
    "unsubscribe": object_of({"mode": lambda v: v in MODES, "timer_minutes": is_int,
                              "page_url": is_optional_text, "blocked_text": is_optional_text,
                              "list_unsubscribe": object_of({"enabled": is_flag, "called_url": is_optional_text})},
                             ("mode", "timer_minutes", "list_unsubscribe")),
}, ("id", "name", "channels", "categories", "channel_settings", "unsubscribe"))
_FIELD = object_of({**_ITEM, "type": lambda v: v in FIELD_TYPES}, ("api_name", "title", "type", "required"))
_CHANNEL_SETTINGS = object_of({"fields": list_of(_FIELD)}, ("fields",))


def _check(resource):
    if not _STORED(resource) or not all(_CHANNEL_SETTINGS(resource["channel_settings"].get(name))
                                        for name in resource["channels"]):
        raise DamagedResource("a stored resource is not one the service writes")
    return resource


def parse_stored(raw):
    """The resource stored as `raw` (JSON text), a new dict. Raises DamagedResource for text that is not one."""
    try:
        return _check(json.loads(raw))
    except (ValueError, RecursionError):  # not JSON (DamagedResource is a ValueError too)
        raise DamagedResource("a stored resource is not one the service writes") from None


def readable(raw, resource_id, decode=parse_stored):
    """decode(raw), or None (logged, naming the resource) for a DamagedResource."""
    return or_none_if_damaged(decode, raw, log, f"resource {resource_id}")


def _load(raw, resource_id):
    resource = None if raw is None else readable(raw, resource_id)
    if resource is None:
        raise NoSuchResource(f"resource {resource_id} does not exist")
    return resource


def add_resource(r, data):
    """Validate and store a new resource; return it with its id and rtoken."""
    res = validate_resource(data)
    res["id"] = r.incr(keys.resource_next_id())
    res["rtoken"] = new_resource_token()
    res["created_at"] = res["updated_at"] = now_iso()
    with r.pipeline() as pipe:  # MULTI/EXEC: the document and its index appear together
        pipe.set(keys.resource(res["id"]), json.dumps(res, separators=(",", ":")))
        pipe.zadd(keys.resource_index(), {res["id"]: res["id"]})
        pipe.execute()
    return res


def update_resource(r, resource_id, data):
    """Apply a partial update; `regenerate_rtoken: true` issues a new rtoken. Returns (the resource as it was, as
    it is now). Raises NoSuchResource."""
    key = keys.resource(resource_id)

    def change(pipe):
        before = _load(pipe.get(key), resource_id)
        res = validate_resource(data, before)
        if as_bool(data.get("regenerate_rtoken", False), "regenerate_rtoken"):
            res["rtoken"] = new_resource_token()
        res["updated_at"] = now_iso()
        pipe.multi()
        pipe.set(key, json.dumps(res, separators=(",", ":")))
        return before, res

    # WATCH/MULTI: a concurrent update makes this one retry on fresh data instead of overwriting it.
    return r.transaction(change, key, value_from_callable=True)


def get_resource(r, resource_id):
    """Return the resource or raise NoSuchResource."""
    return _load(r.get(keys.resource(resource_id)), resource_id)


class ReadOnlyDict(dict):
    """A dict that refuses changes: part of a resource decode_shared hands to every request of a process.
    A copy (dict(x), copy.copy, copy.deepcopy) is a plain dict again."""
    __slots__ = ()

    def _refuse(self, *args, **kwargs):
        raise TypeError("a resource from decode_shared is shared and read-only: change a copy")

    __setitem__ = __delitem__ = __ior__ = setdefault = update = pop = popitem = clear = _refuse

    def __reduce__(self):
        return dict, (dict(self),)


class ReadOnlyList(list):
    """A list that refuses changes (see ReadOnlyDict); a copy is a plain list."""
    __slots__ = ()
    __setitem__ = __delitem__ = __iadd__ = __imul__ = ReadOnlyDict._refuse
    append = extend = insert = pop = remove = clear = sort = reverse = ReadOnlyDict._refuse

    def __reduce__(self):
        return list, (list(self),)


def _read_only(value):
    if isinstance(value, dict):
        return ReadOnlyDict((k, _read_only(v)) for k, v in value.items())
    if isinstance(value, list):
        return ReadOnlyList(_read_only(v) for v in value)
    return value


SHARED_MAX = 256


# A campaign's pages and one-clicks all open the same resource, and decoding its JSON was a tenth of a
# one-click replay's CPU. Keyed by the stored text itself, so an updated resource (new text) is decoded afresh
# and never served stale.
@functools.lru_cache(maxsize=SHARED_MAX)
def decode_shared(raw):
    """The resource stored as `raw` (JSON text), decoded once per process and shared, read-only, by every
    caller (ReadOnlyDict: changing it raises TypeError; change a copy). Raises DamagedResource (not kept)."""
    return _read_only(parse_stored(raw))


def get_resources(r, resource_ids):
    """Return {id: resource} for the ids that exist (one MGET)."""
    ids = list(dict.fromkeys(resource_ids))
    raws = r.mget([keys.resource(i) for i in ids]) if ids else []
    found = {i: readable(raw, i) for i, raw in zip(ids, raws) if raw is not None}
    return {i: resource for i, resource in found.items() if resource is not None}


def list_resources(r, from_id=0, limit=20):
    """One page of resources with id >= from_id; returns (items, next_from_id or None, total)."""
    ids = r.zrangebyscore(keys.resource_index(), from_id, "+inf", start=0, num=limit + 1)
    ids = [int(i) for i in ids]
    next_from_id = ids[limit] if len(ids) > limit else None
    items = list(get_resources(r, ids[:limit]).values())
    return items, next_from_id, r.zcard(keys.resource_index())


def delete_resource(r, resource_id):
    """Remove a resource and return it as it was. Its subscriptions stay stored; its links then answer 404."""
    key = keys.resource(resource_id)

    def remove(pipe):
        raw = pipe.get(key)
        res = _load(raw, resource_id) if raw is None else readable(raw, resource_id)  # a damaged one goes too
        pipe.multi()
        pipe.delete(key)
        pipe.zrem(keys.resource_index(), resource_id)
        return res

    # WATCH/MULTI: what it returns is what it removed, not an older version a concurrent update replaced.
    return r.transaction(remove, key, value_from_callable=True)


SYSTEM_FIELDS = {
    "email": [("email", "Email", "line")],
    "sms": [("phone", "Phone", "line")],
    "push": [("provider", "Provider", "line"), ("subscription_id", "Subscription ID", "line")],
    "telegram_bot": [("cc_data.id", "Chat ID", "line")],
}
# The channel's standard subscription fields: set in custom_fields beside the resource's own fields, as the
# seed's push example does ("Standard and additional subscription fields"), but listed as system fields and
# neither defined nor deleted by the sender (a leading "_" keeps them apart from any custom api_name).
STANDARD_FIELDS = {
    "push": [("_browser_name", "Browser name", "line"), ("_device_type", "Device type", "line")],
}
PHONE_CC_CHANNELS = ("whatsapp", "viber", "notify")


def system_fields(channel):
    """(name, title, type, required) of the channel's system fields: its address, status, priority and its
    standard fields."""
    address = SYSTEM_FIELDS.get(channel) or (
        [("cc_data.phone", "Phone", "line")] if channel in PHONE_CC_CHANNELS else [("cc_data.id", "ID", "line")])
    return ([(n, t, ty, True) for n, t, ty in address]
            + [("status", "Status", "line", False), ("priority", "Priority", "int", False)]
            + [(n, t, ty, False) for n, t, ty in STANDARD_FIELDS.get(channel, ())])


def field_descriptors(resource, channel):
    """The fields_get answer: system fields of the channel, then its custom fields."""
    if channel not in resource["channels"]:
        raise InvalidInput(f"channel {channel!r} is not a channel of resource {resource['id']}", field="channel")
    out = [{"category": "system", "title": t, "name": n, "required": req, "type": ty}
           for n, t, ty, req in system_fields(channel)]
    out += [{"category": "custom", "title": f["title"], "name": f["api_name"], "required": f["required"],
             "type": f["type"]} for f in resource["channel_settings"][channel]["fields"]]
    return out
