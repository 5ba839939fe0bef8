"""Subscriptions: one profile's subscription to one resource over one channel and address.

Storage: all subscriptions of a profile sit in one hash (`keys.profile_subscriptions`), hash_id -> the record
in its stored form (`encode_record`: short member names, defaults left out, times as epoch milliseconds).
Every write goes through `update_profile`, which WATCHes the profile's keys, lets a change function edit
records, and writes the records and their ledger events in one MULTI/EXEC (a concurrent writer makes it
retry on fresh data). Categories are stored as the ones opted out of (`uncats`), so a category added to
the resource later reaches existing subscribers (but for one deleted and created again: an opt-out of it is
kept, `uncats_keeping`); the API shows `cats`, the categories still subscribed.
"""
import hashlib
import json
import logging
import time
from enum import IntEnum

from . import events, keys, scripts
from .errors import Conflict, DamagedData, InvalidInput, NoSuchSubscription, or_none_if_damaged
from .resources import (MAX_CATEGORIES, PHONE_CC_CHANNELS, current_field_values, get_resource, get_resources,
                        subscription_fields, validate_field_value)
from .validation import (as_chat_id, as_datetime, as_email, as_int, as_ip, as_language, as_list, as_object,
                         as_phone, as_profile_id, as_text, as_url, blank_or, compact_json, is_int, is_object,
                         is_optional_text, is_text, list_of, ms_to_time, no_unknown_keys, now_iso, require,
                         time_to_ms, MS_RANGE)

log = logging.getLogger(__name__)


class Status(IntEnum):
    SUBSCRIBED = 0
    UNSUBSCRIBED = 1
    COMPLAINED = 2
    HARDBOUNCED = 3
    UNCONFIRMED = 4
    SUSPENDED = 5
    INVALID = 6

    @property
    def word(self):
        return self.name.lower()


# Statuses in which no message comes, nor will without someone subscribing it again.
STOPPED_STATUSES = (Status.UNSUBSCRIBED, Status.COMPLAINED, Status.HARDBOUNCED, Status.INVALID)


def parse_status(value, field="status"):
    """Accept the word ("subscribed") or the number (0, "0")."""
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        try:
            return Status[value.strip().upper()]
        except KeyError:
            pass
    else:
        try:
            return Status(as_int(value, field))
        except (ValueError, InvalidInput):
            pass
    words = ", ".join(f"{s.word} ({s.value})" for s in Status)
    raise InvalidInput(f"{field} must be one of {words}", field=field)


IDENTITY_FIELDS = ("db_id", "profile_id", "resource_id", "channel", "email", "phone", "provider",
                   "subscription_id", "cc_data")
SET_FIELDS = IDENTITY_FIELDS + ("status", "priority", "cats", "custom_fields", "date", "ip", "url", "locale", "token")


def read_address(channel, data):
    """Return (stored address dict, identity string) of the channel's address fields in `data`."""
    if channel == "email":
        email = as_email(require(data, "email"))
        return {"email": email}, email
    if channel == "sms":
        phone = as_phone(require(data, "phone"))
        return {"phone": phone}, phone
    if channel == "push":
        provider = as_text(require(data, "provider"), "provider", 64, allow_empty=False)
        sub_id = as_text(require(data, "subscription_id"), "subscription_id", 1024, allow_empty=False)
        return {"provider": provider, "subscription_id": sub_id}, f"{provider}\x00{sub_id}"
    cc = as_object(require(data, "cc_data"), "cc_data")
    if channel in PHONE_CC_CHANNELS:
        phone = as_phone(require(cc, "phone", "cc_data."), "cc_data.phone")
        return {"cc_data": {"phone": phone}}, phone
    chat_id = as_chat_id(require(cc, "id", "cc_data."))
    return {"cc_data": {"id": int(chat_id)}}, chat_id


# The stored form of a record. At a million subscriptions every byte of the record counts (bench/memory.py):
# one-letter member names, members at their default value left out, the channel's one address as a plain
# string, reg_info flattened, and times as epoch milliseconds whenever that gives back the exact same text.
# decode_record(encode_record(rec)) == rec for every record; a record stored in the old long form (it has
# "resource_id") reads unchanged. Lua that looks inside a stored record (hotpaths.READ) uses the short names.
_SHORT = {"resource_id": "r", "channel": "c", "address": "a", "status": "s", "priority": "p", "uncats": "u",
          "custom_fields": "f", "is_delete": "x", "updated_at": "t", "suspended_until": "z", "locale": "g"}
_LONG = {short: name for name, short in _SHORT.items()}
_DEFAULTS = {"status": 0, "priority": 0, "uncats": [], "custom_fields": {}, "is_delete": False}
_REG_SHORT = {"date": "d", "ip": "i", "url": "l", "source": "o"}
_REG_LONG = {short: name for name, short in _REG_SHORT.items()}
_REG_DEFAULTS = {"ip": None, "url": None, "source": "api"}
_TIMES = ("updated_at", "suspended_until")  # text (validation.format_time) or None, as is reg_info's date
_STRING_ADDRESS = {"email": "email", "sms": "phone"}  # channel -> the address's one member


def _is_default(value, default):
    return value == default and isinstance(value, bool) == isinstance(default, bool)


def encode_record(record):
    """The record as stored in Redis (compact JSON)."""
    out = {}
    one_member = _STRING_ADDRESS.get(record.get("channel"))
    for name, value in record.items():
        if name in _DEFAULTS and _is_default(value, _DEFAULTS[name]):
            continue
        if name == "address" and isinstance(value, dict) and list(value) == [one_member] and isinstance(
                value[one_member], str):  # decode_record expands only a string (a null stays {"email": null})
            value = value[one_member]
        if name == "reg_info" and isinstance(value, dict) and set(value) == set(_REG_SHORT):
            for reg_name, short in _REG_SHORT.items():
                if reg_name not in _REG_DEFAULTS or not _is_default(value[reg_name], _REG_DEFAULTS[reg_name]):
                    out[short] = time_to_ms(value[reg_name]) if short == "d" else value[reg_name]
            continue
        if name in _TIMES:
            value = time_to_ms(value)
        out[_SHORT.get(name, name)] = value
    return compact_json(out)


class DamagedRecord(DamagedData):
    """Stored text that is not a subscription record as the service writes it (altered in Redis by hand, or
    damaged): every reader but events/verify takes it as no record (readable_record)."""


# What the code relies on of a record's members, by long name (a member a record lacks takes its default).
_SHAPES = {"resource_id": is_int, "channel": is_text, "address": is_object,
           "status": lambda v: isinstance(v, int) and v in _WORDS, "priority": is_int, "uncats": list_of(is_text),
           "custom_fields": is_object, "is_delete": lambda v: isinstance(v, int),
           "updated_at": is_optional_text, "suspended_until": is_optional_text, "locale": is_optional_text,
           "reg_info": is_object}
_REQUIRED = ("resource_id", "channel", "address")


def _stored_time(value):
    return is_optional_text(value) or (type(value) is int and value in MS_RANGE)  # ms_to_time's text, when read


# The same, of the stored members (decode_for_change checks them without decoding the record).
_STORED_SHAPES = {**{_SHORT[name]: fits for name, fits in _SHAPES.items() if name in _SHORT},
                  "a": lambda v: is_object(v) or is_text(v), "t": _stored_time, "z": _stored_time}
_STORED_REQUIRED = tuple(_SHORT[name] for name in _REQUIRED)


def _check_shape(record):
    if not all(name in record for name in _REQUIRED):
        raise DamagedRecord("a stored subscription record lacks a member it must have")
    for name, fits in _SHAPES.items():
        if name in record and not fits(record[name]):
            raise DamagedRecord(f"a stored subscription record's {name} is not of its type")
    return record


def decode_record(raw):
    """The record `encode_record` stored (raw JSON text), as the code works with it. Raises DamagedRecord for
    text that is not one."""
    try:
        stored = json.loads(raw)
    except (ValueError, RecursionError):
        raise DamagedRecord("a stored subscription record is not JSON") from None
    if type(stored) is not dict:
        raise DamagedRecord("a stored subscription record is not a JSON object")
    if "resource_id" in stored:  # the long form
        return _check_shape(stored)
    record = dict(_DEFAULTS, uncats=[], custom_fields={})
    reg_info = None
    for short, value in stored.items():
        reg_name = _REG_LONG.get(short)
        if reg_name:
            reg_info = reg_info or {"date": None, **_REG_DEFAULTS}
            reg_info[reg_name] = ms_to_time(value) if short == "d" and type(value) is int else value
            continue
        name = _LONG.get(short, short)
        if name in _TIMES and type(value) is int:
            value = ms_to_time(value)
        record[name] = value
    if isinstance(record.get("address"), str) and type(record.get("channel")) is str and (
            record["channel"] in _STRING_ADDRESS):
        record["address"] = {_STRING_ADDRESS[record["channel"]]: record["address"]}
    if reg_info is not None:
        record["reg_info"] = reg_info
    return _check_shape(record)


def readable_record(raw, where):
    """decode_record(raw), or None (logged, naming `where`) for a DamagedRecord: no reader but events/verify
    stops at one, and subscriptions/set writes a new record in its place."""
    return or_none_if_damaged(decode_record, raw, log, where)


def readable_records(raw_records, where):
    """{hash_id: record} of a profile's stored records, those that are not readable left out (readable_record)."""
    records = {}
    for hash_id, raw in raw_records.items():
        record = readable_record(raw, f"{where}, subscription {hash_id}")
        if record is not None:
            records[hash_id] = record
    return records


def decode_for_change(stored):
    """What an unsubscribe reads of a record (unsubscribe.unsubscribed_record, state_of, its ledger event):
    decode_record's status, uncats, resource_id, channel and address, from `stored` (json.loads of the stored
    text) without decoding the rest, which encode_changed carries over as stored. None for the long form, and
    for a record decode_record refuses (DamagedRecord: tests/test_subscriptions_api.py checks they agree)."""
    if "resource_id" in stored:
        return None
    for short, value in stored.items():
        fits = _STORED_SHAPES.get(short)
        if fits is not None and not fits(value):
            return None  # damaged: decode_record, on the full path, says so
    channel, address = stored.get("c"), stored.get("a")
    if isinstance(address, str):
        if channel not in _STRING_ADDRESS:
            return None
        address = {_STRING_ADDRESS[channel]: address}
    if not all(short in stored for short in _STORED_REQUIRED):
        return None
    return {"status": stored.get("s", 0), "uncats": stored.get("u", []), "resource_id": stored.get("r"),
            "channel": channel, "address": address}


_LEADING = {name: _SHORT[name] for name in _DEFAULTS}  # the members decode_record puts first, in its order


def encode_changed(stored, status, uncats, updated_ms):
    """encode_record's text of the record stored as `stored` (decode_for_change's) with its status, uncats and
    updated_at (as epoch ms) changed, built from the stored members (times stay numbers): the same text,
    members in the same order, at a third of the cost of decoding and encoding the record (a first one-click
    does this on every request; tests/test_subscriptions_api.py compares the two)."""
    out = {}
    changed = {"s": status, "u": uncats}
    for name, short in _LEADING.items():
        value = changed[short] if short in changed else stored.get(short, _DEFAULTS[name])
        if not _is_default(value, _DEFAULTS[name]):
            out[short] = value
    reg_info = {}
    for short, value in stored.items():
        if short in _REG_LONG:
            reg_info[short] = value
        elif short == "t":
            out["t"] = updated_ms
        elif _LONG.get(short) not in _DEFAULTS:
            out[short] = value
    if reg_info:  # decode_record gathers these into reg_info, its last member: written last, its date always
        out["d"] = reg_info.get("d")
        for reg_name, short in _REG_SHORT.items():
            if reg_name in _REG_DEFAULTS and not _is_default(reg_info.get(short, _REG_DEFAULTS[reg_name]),
                                                             _REG_DEFAULTS[reg_name]):
                out[short] = reg_info[short]
    out["t"] = updated_ms  # in its place when it was stored, else after everything (a member added last)
    return compact_json(out)


def identity_key(resource_id, channel, identity):
    """The text that names a subscription (resource, channel, address `identity` as read_address gives it):
    make_hash_id digests it."""
    return f"{resource_id}\x00{channel}\x00{identity}"


def make_hash_id(resource_id, channel, identity):
    """8 hex chars naming a subscription within its profile (the SMID carries it instead of the address). Two
    addresses of one profile can have the same (user6340@ and user46395@example.com on resource 1): the record
    stored under a hash_id is that subscription's only when `holds` says so."""
    return hashlib.sha256(identity_key(resource_id, channel, identity).encode()).hexdigest()[:8]


def holds(record, resource_id, channel, identity):
    """Whether `record` is the subscription (resource, channel, address `identity`) names, and not another
    address's whose hash_id is the same. A chat is one identity however its id was spelt when stored."""
    if record["resource_id"] != resource_id or record["channel"] != channel:
        return False
    address = record["address"]
    if channel == "email":
        return address.get("email") == identity
    if channel == "sms":
        return address.get("phone") == identity
    if channel == "push":
        return f"{address.get('provider')}\x00{address.get('subscription_id')}" == identity
    cc = address.get("cc_data") or {}
    return cc.get("phone") == identity if channel in PHONE_CC_CHANNELS else cc.get("id") == int(identity)


def locate(r, data):
    """Validate the identifying fields; return (resource, db_id, profile_id, channel, address, identity). The
    subscription's hash_id is stored_hash_id's, worked out from the reads each caller makes anyway."""
    db_id = as_int(require(data, "db_id"), "db_id", 1, 2 ** 31)
    profile_id = as_profile_id(require(data, "profile_id"))
    resource = get_resource(r, as_int(require(data, "resource_id"), "resource_id", 1))
    channel = require(data, "channel")
    if channel not in resource["channels"]:
        raise InvalidInput(f"channel {channel!r} is not a channel of resource {resource['id']}", field="channel")
    address, identity = read_address(channel, data)
    return resource, db_id, profile_id, channel, address, identity


def is_chat(channel):
    """Whether the channel's address is a chat id (telegram_bot, max_bot): not email, SMS, push or a phone."""
    return channel not in ("email", "sms", "push") and channel not in PHONE_CC_CHANNELS


def stored_hash_id(records, resource_id, channel, identity):
    """make_hash_id of the subscription (resource, channel, address `identity`) names, as it is stored among
    `records` (hash_id -> record). A chat id is one identity however it is written ("007" is chat 7); a chat's
    subscription stored before that was hashed under the spelling it was given: it is found by its stored chat
    id, whatever the spelling used now. `records` is a profile's whole hash, or, for a chat, just the record
    under the canonical hash_id when that one `holds` it (scripts.subscription_or_all): no read of its own.
    The record under the hash_id returned may still be another address's (see holds)."""
    hash_id = make_hash_id(resource_id, channel, identity)
    if not is_chat(channel) or (hash_id in records and holds(records[hash_id], resource_id, channel, identity)):
        return hash_id
    for other, record in records.items():
        if holds(record, resource_id, channel, identity):
            return other
    return hash_id


def find_subscription(records, resource_id, channel, identity):
    """(hash_id, record, taken) of the subscription (resource, channel, address `identity`) among `records`, as
    stored_hash_id reads them: record is None when it is not there, and then `taken` tells whether its hash_id
    holds another address's record (holds), which is never returned as this one's."""
    hash_id = stored_hash_id(records, resource_id, channel, identity)
    record = records.get(hash_id)
    if record is not None and not holds(record, resource_id, channel, identity):
        return hash_id, None, True
    return hash_id, record, False


def read_subscription(r, db_id, profile_id, resource_id, channel, identity):
    """(hash_id, record or None) of the subscription (resource, channel, address `identity`): one round trip
    for every channel, a chat stored under an older spelling of its id included (stored_hash_id); two for a
    chat whose canonical hash_id another chat holds. None also when the record under the hash_id is another
    address's (holds)."""
    subs_key = keys.profile_subscriptions(db_id, profile_id)
    hash_id = make_hash_id(resource_id, channel, identity)
    if not is_chat(channel):
        raw = r.hget(subs_key, hash_id)
        records = {} if raw is None else readable_records({hash_id: raw}, subs_key)
    else:
        records = readable_records(scripts.subscription_or_all(r, subs_key, hash_id), subs_key)
        if hash_id in records and not holds(records[hash_id], resource_id, channel, identity):
            records = load_records(r, db_id, profile_id)   # another chat's: this one may be under an older spelling
    hash_id, record, _taken = find_subscription(records, resource_id, channel, identity)
    return hash_id, record


def subscription_hash_id(r, db_id, profile_id, resource_id, channel, identity):
    """The stored hash_id of the subscription (resource, channel, address `identity`) names (stored_hash_id)."""
    if not is_chat(channel):
        return make_hash_id(resource_id, channel, identity)
    return read_subscription(r, db_id, profile_id, resource_id, channel, identity)[0]


def subscribed_cats(resource, record):
    off = set(record.get("uncats", ()))
    return [c["api_name"] for c in resource["categories"] if c["api_name"] not in off]


_WORDS = {int(s): s.word for s in Status}  # Status(n).word, without the enum lookup (every change asks twice)


def state_of(resource, record):
    """The part of a subscription the ledger tracks."""
    if record is None:
        return None
    status = record["status"]
    word = _WORDS.get(status) if type(status) is int else None
    return {"status": word or Status(status).word, "cats": subscribed_cats(resource, record)}


def uncats_keeping(resource, record, kept):
    """The record's opt-outs (`uncats`) rewritten so that it stays subscribed to the categories `kept`: every
    other category of the resource, and the record's opt-outs of categories the resource no longer has that
    `kept` does not name. Those are the person's: kept, a rewrite of the categories leaves a record as one left
    alone, and the opt-out is honoured if the sender creates the category again."""
    names = [c["api_name"] for c in resource["categories"]]
    deleted = [c for c in record.get("uncats", ()) if c not in names and c not in kept]
    return [name for name in names if name not in kept] + deleted


def with_state(resource, record, state):
    """The record set back to a ledger state {"status": word, "cats": [...]} (for undo and revert)."""
    restored = dict(record, status=int(Status[state["status"].upper()]), updated_at=now_iso())
    restored["uncats"] = uncats_keeping(resource, record, set(state["cats"]))
    # A pause the person took (it has an end; unsubscribes keep it) comes back only with its end still ahead;
    # one that would have ended meanwhile comes back as what its end makes it, subscribed. A suspension with no
    # end is the sender's (subscriptions/set, suspend_all) and lasts until the sender lifts it: it comes back so.
    until = restored.get("suspended_until")
    if restored["status"] == Status.SUSPENDED and until and time_to_ms(until) <= time.time() * 1000:
        restored["status"] = int(Status.SUBSCRIBED)
    if restored["status"] != Status.SUSPENDED:
        restored.pop("suspended_until", None)
    return restored


def extended_form(resource, db_id, profile_id, hash_id, record):
    """The seed's extended subscription object (status as a word, cats still subscribed)."""
    out = {"resource_id": record["resource_id"], "db_id": db_id, "profile_id": profile_id,
           "channel": record["channel"]}
    address = record["address"]
    out.update(address)
    if "email" in address:
        email = address["email"]
        out["email_data"] = {"email": email, "domain": email.rpartition("@")[2],
                             "md5": hashlib.md5(email.encode()).hexdigest()}
    phone = address.get("phone") or (address.get("cc_data") or {}).get("phone")
    if phone:  # the seed: phone_data for SMS, Viber and WhatsApp
        out["phone_data"] = {"phone": phone}
    out.update({
        "status": Status(record["status"]).word,
        "priority": record["priority"],
        "cats": subscribed_cats(resource, record),
        "custom_fields": current_field_values(resource, record["channel"], record.get("custom_fields", {})),
        "reg_info": record["reg_info"],
        "hash_id": hash_id,
        "is_delete": record.get("is_delete", False),
    })
    if record.get("suspended_until") and record["status"] == Status.SUSPENDED:
        out["suspended_until"] = record["suspended_until"]
    if record.get("locale"):
        out["locale"] = record["locale"]
    return out


class ProfileChange:
    """What a change function sees: the profile's records, and `save` to stage a changed one. `unreadable`: the
    hash_ids whose stored text is not a record (readable_record), which `records` leaves out."""

    def __init__(self, pipe, db_id, profile_id, records, unreadable=frozenset()):
        self.pipe, self.db_id, self.profile_id = pipe, db_id, profile_id
        self.records = records
        self.unreadable = unreadable
        self._status_read = {h: rec["status"] for h, rec in records.items()}
        self._uncats_read = {h: set(rec.get("uncats", ())) for h, rec in records.items()}
        self._saved = {}
        self._resources = {}  # hash_id -> the resource its saved record was checked against
        self.timer_checked = set()  # hash_ids whose pending timer the change function settled itself, if due
        self._events = []
        self._extra = []
        self._last_event = None
        self._last_loaded = False

    def save(self, hash_id, record, resource, method=None, smid=None, evidence=None):
        """Stage `record`; when its status or categories change, stage a ledger event too."""
        before = state_of(resource, self.records.get(hash_id))
        after = state_of(resource, record)
        self.records[hash_id] = record
        self._saved[hash_id] = record
        self._resources[hash_id] = resource
        if method and before != after:
            if not self._last_loaded:
                self._last_event = events.last_event(self.pipe, self.db_id, self.profile_id)
                self._last_loaded = True
            event = events.new_event(self._last_event, db_id=self.db_id, profile_id=self.profile_id,
                                     resource_id=record["resource_id"], channel=record["channel"],
                                     hash_id=hash_id, method=method, before=before, after=after,
                                     smid=smid, evidence=evidence)
            self._events.append(event)
            self._last_event = event
        return record

    def also(self, fn):
        """Stage another write: fn(pipe) runs inside the same MULTI."""
        self._extra.append(fn)

    @property
    def events(self):
        return list(self._events)

    def _timers_to_settle(self):
        """The saved subscriptions whose delayed unsubscribe this change settles. A change by another path that
        stops the subscription (an unsubscribe, a complaint, a bounce) settles it: else the timer, still
        pending, would stop it again after a later resubscribe. So does one that stops categories (the
        manager's boxes, the API's `cats`) when that leaves the timer nothing to stop (a timer for those
        categories): else switching them back on would be undone at the deadline. A pause, its end, a
        confirmation, or a change that leaves the timer something to stop leaves it waiting."""
        from .unsubscribe import timer_settled  # unsubscribe.py builds on this module
        settle = []
        for hash_id, record in self._saved.items():
            if record["status"] in STOPPED_STATUSES:
                if self._status_read.get(hash_id) != record["status"]:
                    settle.append(hash_id)
            elif (hash_id not in self.timer_checked
                  and set(record.get("uncats", ())) - self._uncats_read.get(hash_id, set())):
                pending_key = keys.pending_unsubscribe(self.db_id, self.profile_id, hash_id)
                self.pipe.watch(pending_key)  # a timer armed or widened meanwhile makes the transaction retry
                scope = self.pipe.hget(pending_key, "scope")
                if scope is not None and timer_settled(self._resources[hash_id], record, scope):
                    settle.append(hash_id)
        return settle

    def flush(self):
        pipe = self.pipe
        settle = self._timers_to_settle()  # reads, so before MULTI
        pipe.multi()
        if self._saved:
            pipe.hset(keys.profile_subscriptions(self.db_id, self.profile_id),
                      mapping={h: encode_record(rec) for h, rec in self._saved.items()})
            pipe.sadd(keys.db_profiles(self.db_id), self.profile_id)
        for hash_id in settle:
            drop_pending(pipe, self.db_id, self.profile_id, hash_id)
        for hash_id, record in self._saved.items():
            index_pause(pipe, self.db_id, self.profile_id, hash_id, record)
        for event in self._events:
            events.queue_append(pipe, event)
        for fn in self._extra:
            fn(pipe)


def index_pause(pipe, db_id, profile_id, hash_id, record):
    """Stage the pause's entry in keys.suspensions_due, scored by its end, if the record is paused with an end.
    Whichever writer saves it (the manager, an Undo, a revert), the entry is written with the record: the
    sweeper may have dropped it meanwhile (the record was not paused when it looked), and a pause left out of
    the index would never end."""
    until = record.get("suspended_until")
    if record["status"] == Status.SUSPENDED and until:
        member = keys.suspension_member(db_id, profile_id, hash_id)
        pipe.zadd(keys.suspensions_due(), {member: time_to_ms(until) / 1000})


def drop_pending(pipe, db_id, profile_id, hash_id):
    """Stage the removal of the subscription's delayed unsubscribe, if one is pending (unsubscribe.py)."""
    pipe.delete(keys.pending_unsubscribe(db_id, profile_id, hash_id))
    pipe.zrem(keys.pending_due(), keys.pending_due_member(db_id, profile_id, hash_id))


def load_records(r, db_id, profile_id):
    subs_key = keys.profile_subscriptions(db_id, profile_id)
    return readable_records(r.hgetall(subs_key), subs_key)


def update_profile(r, db_id, profile_id, change, watch=()):
    """Run change(ProfileChange) atomically against one profile; return what it returns.

    The change function reads (through `pc.pipe` for extra keys it named in `watch`) and stages writes;
    they are applied in one MULTI/EXEC, retried from scratch if any watched key changed meanwhile.
    Exceptions raised by the change function abort without writing anything.
    """
    subs_key = keys.profile_subscriptions(db_id, profile_id)
    events_key = keys.profile_events(db_id, profile_id)

    def attempt(pipe):
        stored = pipe.hgetall(subs_key)
        records = readable_records(stored, subs_key)
        pc = ProfileChange(pipe, db_id, profile_id, records, stored.keys() - records.keys())
        result = change(pc)
        pc.flush()
        return result, pc.events

    return r.transaction(attempt, subs_key, events_key, *watch, value_from_callable=True)


def _validate_cats(resource, cats):
    """The categories `cats` names to stay subscribed to, each one of the resource's."""
    names = {c["api_name"] for c in resource["categories"]}
    cats = as_list(cats, "cats", max_items=MAX_CATEGORIES)
    for i, cat in enumerate(cats):
        if not isinstance(cat, str) or cat not in names:
            raise InvalidInput(f"cats[{i}] {cat!r} is not a category of resource {resource['id']}", field="cats")
    return set(cats)


def _validate_custom_fields(resource, channel, given, existing, is_new):
    defs = subscription_fields(resource, channel)
    given = as_object(given, "custom_fields")
    values = current_field_values(resource, channel, existing)
    for name, value in given.items():
        if name not in defs:
            raise InvalidInput(f"custom_fields.{name} is not a field of the {channel} channel",
                               field=f"custom_fields.{name}")
        values[name] = None if value is None else validate_field_value(defs[name], value, "custom_fields.")
    for name, fdef in defs.items():  # a default is for "no value given": on a new subscription, and for a
        # required field added to the resource since (the subscriptions made before it get the value it asks for)
        if values.get(name) is None and fdef["default"] is not None and (is_new or fdef["required"]):
            values[name] = fdef["default"]
    # `required` holds a subscription when it is made, and an edit only in the fields it gives: a required field
    # the resource gains later without a default must not stop a bounce or a complaint being recorded on the
    # subscriptions made before it.
    for name, fdef in defs.items():
        if fdef["required"] and (is_new or name in given) and _is_empty(values.get(name)):
            raise InvalidInput(f"custom_fields.{name} is required", field=f"custom_fields.{name}")
    return values


def _is_empty(value):
    """No value for a required field: none, or text of nothing but spaces (as the manager's form reads it)."""
    return value is None or (isinstance(value, str) and not value.strip())


def _check_provider(resource, provider):
    """A push subscription's provider is one the resource's push channel lists (as the subscription names it,
    e.g. android-firebase), when it lists any."""
    providers = resource["channel_settings"]["push"].get("providers", [])
    if providers and provider not in providers:
        raise InvalidInput(f"provider {provider!r} is not one of the push providers of resource {resource['id']}: "
                           + ", ".join(providers), field="provider")


def set_subscription(r, data):
    """Add or edit a subscription (Altcraft subscriptions/set); return its extended form and whether it is new.

    A new subscription takes the highest priority (0) and moves the profile's other subscriptions to the
    same resource and channel down by one when the resource has increase_priority and the request gives
    no priority; an explicit priority leaves the others unchanged. Raises InvalidInput, NoSuchResource.
    """
    data = as_object(data, "request")
    no_unknown_keys(data, SET_FIELDS)
    resource, db_id, profile_id, channel, address, identity = locate(r, data)
    status = parse_status(data["status"]) if data.get("status") is not None else None
    priority = as_int(data["priority"], "priority", 0, 2 ** 31) if data.get("priority") is not None else None
    kept_cats = _validate_cats(resource, data["cats"]) if data.get("cats") is not None else None
    reg_date = blank_or(data.get("date"), as_datetime, "date")
    reg_ip = blank_or(data.get("ip"), as_ip, "ip")
    reg_url = blank_or(data.get("url"), as_url, "url")
    # The person's language, as the sender knows it: the pages' choice after ?lang= (contract §4). "" clears it.
    locale = (as_language(data["locale"]) if data["locale"] != "" else "") if data.get("locale") is not None else None

    def change(pc):
        hash_id, old, taken = find_subscription(pc.records, resource["id"], channel, identity)
        if taken:
            raise Conflict(f"another address of profile {profile_id} already has hash_id {hash_id} (8 hex "
                           "characters of resource, channel and address): this address cannot be subscribed in "
                           "this profile", field="profile_id")
        is_new = old is None
        # dbs_ids names the databases whose profiles may subscribe: checked when a subscription is made or
        # subscribed again (out of a stopped status), not when one made before its database left the list
        # records a bounce, a complaint, an unsubscribe or a pause.
        subscribing = is_new or (old["status"] in STOPPED_STATUSES and status is not None
                                 and status not in STOPPED_STATUSES)
        if subscribing and resource["dbs_ids"] and db_id not in resource["dbs_ids"]:
            raise InvalidInput(f"profiles of database {db_id} may not subscribe to resource {resource['id']} "
                               f"(dbs_ids: {resource['dbs_ids']})", field="db_id")
        if subscribing and channel == "push":  # the same for the push providers the resource lists
            _check_provider(resource, address["provider"])
        record = dict(old) if old else {
            "resource_id": resource["id"], "channel": channel, "address": address,
            "status": Status.SUBSCRIBED, "priority": 0, "uncats": [], "custom_fields": {},
            "reg_info": {"date": reg_date or now_iso(), "ip": reg_ip, "url": reg_url, "source": "api"},
            "is_delete": False,
        }
        record["custom_fields"] = _validate_custom_fields(resource, channel, data.get("custom_fields", {}),
                                                          record["custom_fields"], is_new)
        if status is not None:
            record["status"] = int(status)
            # A pause's end belongs to a manager pause (kept through an unsubscribe for its Undo); a status set
            # here, a suspension too, has none: the API's suspension lasts until the API lifts it, as
            # suspend_all's. (The sweeper drops the pause's entry in the due index when it comes to it.)
            record.pop("suspended_until", None)
        if kept_cats is not None:
            record["uncats"] = uncats_keeping(resource, record, kept_cats)
        if locale:
            record["locale"] = locale
        elif locale == "":
            record.pop("locale", None)
        siblings = [(h, rec) for h, rec in pc.records.items() if h != hash_id
                    and rec["resource_id"] == resource["id"] and rec["channel"] == channel]
        if priority is not None:
            record["priority"] = priority
        elif is_new and resource["increase_priority"]:
            record["priority"] = 0
            for h, rec in siblings:
                pc.save(h, {**rec, "priority": rec["priority"] + 1}, resource)
        elif is_new:
            record["priority"] = max((rec["priority"] for _, rec in siblings), default=-1) + 1
        record["updated_at"] = now_iso()
        pc.save(hash_id, record, resource, method="api")
        return extended_form(resource, db_id, profile_id, hash_id, record), is_new

    (result, _events) = update_profile(r, db_id, profile_id, change)
    return result


def get_subscription(r, data):
    """Return the extended form of the subscription `data` identifies. Raises NoSuchSubscription."""
    data = as_object(data, "request")
    no_unknown_keys(data, IDENTITY_FIELDS + ("token",))
    resource, db_id, profile_id, channel, _address, identity = locate(r, data)
    hash_id, record = read_subscription(r, db_id, profile_id, resource["id"], channel, identity)
    if record is None:
        raise NoSuchSubscription("no such subscription")
    return extended_form(resource, db_id, profile_id, hash_id, record)


def list_subscriptions(r, db_id, profile_id, resource_id=None, channel=None):
    """All subscriptions of a profile (optionally one resource and/or channel), by resource, channel, priority."""
    records = load_records(r, db_id, profile_id)
    res = get_resources(r, [rec["resource_id"] for rec in records.values()])
    items = [extended_form(res[rec["resource_id"]], db_id, profile_id, h, rec)
             for h, rec in records.items()
             if rec["resource_id"] in res  # a deleted resource's subscriptions are kept but out of service
             and (resource_id is None or rec["resource_id"] == resource_id)
             and (channel is None or rec["channel"] == channel)]
    return sorted(items, key=lambda s: (s["resource_id"], s["channel"], s["priority"], s["hash_id"]))


def set_deleted(r, data, deleted):
    """Soft delete (or undelete) one subscription; return its extended form."""
    data = as_object(data, "request")
    no_unknown_keys(data, IDENTITY_FIELDS + ("token",))
    resource, db_id, profile_id, channel, _address, identity = locate(r, data)

    def change(pc):
        hash_id, record, _taken = find_subscription(pc.records, resource["id"], channel, identity)
        if record is None:
            raise NoSuchSubscription("no such subscription")
        record = pc.save(hash_id, {**record, "is_delete": deleted, "updated_at": now_iso()}, resource)
        return extended_form(resource, db_id, profile_id, hash_id, record)

    return update_profile(r, db_id, profile_id, change)[0]


def set_status_where(r, db_id, profile_ids, from_status, to_status, method, resource_id=None, channel=None):
    """Move every matching subscription in `from_status` to `to_status`; return how many changed."""
    updated = 0
    for profile_id in profile_ids:
        def change(pc):
            matching = [(h, rec) for h, rec in pc.records.items()
                        if rec["status"] == from_status and not rec.get("is_delete")
                        and (resource_id is None or rec["resource_id"] == resource_id)
                        and (channel is None or rec["channel"] == channel)]
            res = get_resources(r, [rec["resource_id"] for _, rec in matching])
            matching = [(h, rec) for h, rec in matching if rec["resource_id"] in res]  # none of a deleted resource
            for h, rec in matching:
                new = {**rec, "status": int(to_status), "updated_at": now_iso()}
                new.pop("suspended_until", None)
                pc.save(h, new, res[rec["resource_id"]], method=method)
            return len(matching)
        updated += update_profile(r, db_id, profile_id, change)[0]
    return updated


def profiles_of_db(r, db_id):
    """Iterate a database's profile ids without loading the whole set at once."""
    for profile_id in r.sscan_iter(keys.db_profiles(db_id), count=500):
        yield profile_id
