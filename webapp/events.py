"""The consent ledger: one hash-chained event per change of a subscription's status or categories.

Each profile has its own chain (`keys.profile_events`, a list, oldest first): an event carries `seq`, the
previous event's hash (`prev_hash`) and its own `hash` = SHA-256 of its canonical JSON without `hash`.
Events are appended in the same MULTI/EXEC as the change they describe, so a change without its event (or
the reverse) cannot be stored. A global stream (`keys.events_timeline`) indexes events by time for export.
Events are stored compactly (`encode_event`); every reader gets them back as they were hashed (`decode_event`).
"""
import hashlib
import itertools
import json
import logging
import re
import secrets
import time

from . import keys
from .validation import canonical_json_bytes, compact_json, ms_to_time, time_to_ms

GENESIS_HASH = "0" * 64
LEDGER_PAGE = 100  # ledger entries read per round trip when a ledger is read from its newest entry back

log = logging.getLogger(__name__)


def event_hash(event):
    """SHA-256 of the event's canonical JSON (json.dumps(body, sort_keys=True, separators=(",", ":"))), its
    "hash" left out."""
    # new_event hashes before it adds "hash": no copy without it then
    body = {k: v for k, v in event.items() if k != "hash"} if "hash" in event else event
    return hashlib.sha256(canonical_json_bytes(body)).hexdigest()


def new_event(last, *, db_id, profile_id, resource_id, channel, hash_id, method, before, after,
              smid=None, evidence=None):
    """Build the next event of a profile's chain after `last` (the previous event dict, or None)."""
    ms = time.time_ns() // 1_000_000  # one clock read for its id and its time
    event = {
        "id": f"{ms:013d}-{secrets.token_hex(4)}",
        "at": ms_to_time(ms),
        "db_id": db_id, "profile_id": profile_id, "resource_id": resource_id, "channel": channel,
        "hash_id": hash_id, "method": method, "before": before, "after": after, "smid": smid,
        "evidence": {"ip": None, "user_agent": None, "seconds_since_send": None, "locale": None,
                     **(evidence or {})},
        "seq": last["seq"] + 1 if last else 1,
        "prev_hash": last["hash"] if last else GENESIS_HASH,
    }
    event["hash"] = event_hash(event)
    return event


# The stored form of an event. Events are kept for good, one per change, so the ledger is most of what Redis
# holds at scale (bench/memory.py): one-letter member names, "at" as epoch milliseconds, and members at their
# usual value left out (no `before` or `smid`, the first event's prev_hash, evidence members that are None).
# decode_event(encode_event(e)) == e for every event new_event builds, so hashes verify on what is read; an
# event stored in the long form (it has "seq") reads unchanged. scripts.CLAIM_TIMERS reads "q" and "x".
_EVENT_SHORT = {"id": "i", "at": "a", "db_id": "d", "profile_id": "u", "resource_id": "r", "channel": "c",
                "hash_id": "h", "method": "m", "before": "b", "after": "f", "smid": "s", "evidence": "e",
                "seq": "q", "prev_hash": "p", "hash": "x"}
_EVENT_LONG = {short: name for name, short in _EVENT_SHORT.items()}
_EVENT_DEFAULTS = {"before": None, "smid": None, "prev_hash": GENESIS_HASH}
_EVIDENCE_DEFAULTS = ("ip", "user_agent", "seconds_since_send", "locale")  # None unless the caller knew it


def encode_event(event):
    """The event as stored in its profile's ledger list (compact JSON)."""
    out = {_EVENT_SHORT.get(name, name): value for name, value in event.items()
           if name not in _EVENT_DEFAULTS or value != _EVENT_DEFAULTS[name]}
    if "e" in out:
        evidence = {k: v for k, v in out["e"].items() if not (k in _EVIDENCE_DEFAULTS and v is None)}
        if evidence:
            out["e"] = evidence
        else:
            del out["e"]
    if "a" in out:
        out["a"] = time_to_ms(out["a"])
    return compact_json(out)


def decode_event(raw):
    """The event `encode_event` stored (raw JSON text), exactly as new_event built and hashed it.
    Raises ValueError for text that is not JSON."""
    stored = json.loads(raw)
    if not isinstance(stored, dict) or "seq" in stored:  # the long form (or not an event at all)
        return stored
    event = {}
    for name, short in _EVENT_SHORT.items():  # new_event's member order
        if short in stored:
            value = stored[short]
        elif name in _EVENT_DEFAULTS:
            value = _EVENT_DEFAULTS[name]
        elif name == "evidence":
            value = {}
        else:
            continue
        if name == "at" and type(value) is int:
            value = ms_to_time(value)
        elif name == "evidence" and isinstance(value, dict):  # anything else: a damaged entry, left to verify
            value = {**dict.fromkeys(_EVIDENCE_DEFAULTS), **value}
        event[name] = value
    event.update((k, v) for k, v in stored.items() if k not in _EVENT_LONG)
    return event


def queue_append(pipe, event):
    """Add the event's writes to a MULTI pipeline."""
    pipe.rpush(keys.profile_events(event["db_id"], event["profile_id"]), encode_event(event))
    # rid and method show on the timeline itself what each entry is (XRANGE); deliverers decide on the event.
    pipe.xadd(keys.events_timeline(), {"ref": f"{event['db_id']}|{event['profile_id']}|{event['seq']}",
                                       "rid": event["resource_id"], "method": event["method"]})


def last_event(client, db_id, profile_id):
    """What the profile's next event follows (new_event's `last`): see chain_tip."""
    return chain_tip(client, db_id, profile_id, client.lindex(keys.profile_events(db_id, profile_id), -1))


def chain_tip(client, db_id, profile_id, newest_raw):
    """What the next event of a profile's chain follows, given its ledger's newest entry as stored (None for an
    empty ledger; "" is an entry, a damaged one): that event's {seq, hash} (all new_event uses), or None.

    A newest entry that cannot be read as an event (damaged storage) must not stop the change: an unsubscribe
    is honoured whatever the ledger holds. The chain goes on past it: the stand-in {seq, hash} returned makes
    the next event link to the SHA-256 of the entry's stored text, with the seq after the places of the damaged
    entries that follow the newest readable event (its seq + their count; their count with none readable).
    That is the event's place in the list when no entry was removed (where load_refs looks first), and a seq
    not used before unless entries were also removed from among the damaged ones (the list cannot tell). The
    damaged entry stays where it is, and verify_chain names it. The ledger is read back (through `client`: a
    Redis client, or a pipeline that WATCHes) only in that case."""
    if newest_raw is None:
        return None
    link = _link_of(newest_raw)
    if link is not None:
        return link
    key = keys.profile_events(db_id, profile_id)
    damaged = 0
    for raw in newest_first(client, key):
        link = _link_of(raw)
        if link is not None:
            break
        damaged += 1
    else:
        link = {"seq": 0}
    log.warning("the newest ledger entry of profile %s|%s is not an event: the change is chained after it "
                "(events/verify names it)", db_id, profile_id)
    text = newest_raw.encode() if isinstance(newest_raw, str) else newest_raw
    return {"seq": link["seq"] + damaged, "hash": hashlib.sha256(text).hexdigest()}


# How every entry encode_event writes ends: its seq, prev_hash (but the first event's) and hash, the last three
# of new_event's members. Searched in the entry's last characters only: what it finds is all a chained event's
# place needs, and is what decoding the whole entry gives.
_ENTRY_END = re.compile(r',"q":([1-9][0-9]{0,17}),(?:"p":"[0-9a-f]{64}",)?"x":"([0-9a-f]{64})"\}\Z')
_ENTRY_END_CHARS = 170  # ,"q":<18 digits>,"p":"<64>","x":"<64>"}


def _link_of(raw):
    """{seq, hash} of a ledger entry that can be chained after (is_link of its read_event), else None: those
    two members as decode_event gives them, without rebuilding the whole event (chain_tip runs on every change).
    An entry that ends as encode_event ends every event (_ENTRY_END) is not parsed further: a damaged entry
    that still ends so (its start altered, say) is chained after by the seq and hash it ends with, and
    verify_chain names it all the same."""
    end = _ENTRY_END.search(raw, len(raw) - _ENTRY_END_CHARS) if type(raw) is str else None
    if end is not None:
        return {"seq": int(end.group(1)), "hash": end.group(2)}
    try:
        stored = json.loads(raw) if raw else None
    except ValueError:
        return None
    if not isinstance(stored, dict):
        return None
    if "seq" in stored:  # the long form
        link = {"seq": stored["seq"], "hash": stored.get("hash")}
    else:  # as decode_event, a member "hash" (no short name) wins over "x"
        link = {"seq": stored.get(_EVENT_SHORT["seq"]),
                "hash": stored.get("hash", stored.get(_EVENT_SHORT["hash"]))}
    return link if is_link(link) else None


def id_ms(event):
    """When an event was made, in epoch ms, from its id (13 digits, a dash, random hex: new_event's); None for an
    entry whose id was altered past reading (verify_chain names it), which the pages pass over, not a 500."""
    event_id = event.get("id")
    return int(event_id[:13]) if isinstance(event_id, str) and event_id[:13].isdigit() else None


def read_chained_event(raw):
    """read_event of a ledger entry that is an event of the chain (is_link), else None: readers pass damaged
    entries over (verify_chain names them)."""
    event = read_event(raw)
    return event if is_link(event) else None


def is_link(event):
    """Whether a read entry (read_event) can be chained after: it has its seq and hash."""
    return event is not None and type(event.get("seq")) is int and isinstance(event.get("hash"), str)


def newest_first(client, key, page_size=LEDGER_PAGE):
    """A ledger's entries as stored, newest first, read page_size at a time and only as far as iterated."""
    for page in itertools.count():  # LRANGE -100 -1, then -200 -101, ...
        entries = client.lrange(key, -(page + 1) * page_size, -page * page_size - 1)
        yield from reversed(entries)
        if len(entries) < page_size:  # the ledger's start
            return


def list_events(r, db_id, profile_id, from_seq=None, limit=50):
    """A profile's events newest first, starting at seq <= from_seq; returns (events, next_from_seq). An entry
    that is not an event (damaged storage) is listed in its place as {db_id, profile_id, seq, damaged: true},
    seq being its place, as export names a missing one: the history around it stays readable, and
    verify_chain says what is wrong with it."""
    key = keys.profile_events(db_id, profile_id)
    total = r.llen(key)
    top = total if from_seq is None else min(int(from_seq), total)
    if top <= 0:
        return [], None
    start = max(0, top - limit)
    items = [read_chained_event(raw)
             or {"db_id": db_id, "profile_id": profile_id, "seq": start + i + 1, "damaged": True}
             for i, raw in enumerate(r.lrange(key, start, top - 1))][::-1]
    return items, (start if start > 0 else None)


def verify_chain(r, db_id, profile_id):
    """Walk one profile's chain; return None when intact, else {seq, id, problem} of the first bad entry.

    A hash chain cannot tell that entries were cut from its end (or the whole list deleted), so the chain is
    anchored in what it describes: every subscription of the profile must have an event, and its last event's
    `after.status` must be the status its record holds now (categories are not compared: a resource's category
    change alters its subscribers' cats without an event). Such a problem also names the subscription
    (`hash_id`); its seq is where the missing entry would be (the ledger's length + 1). Ledger and records are
    read in one MULTI, so a change committed meanwhile cannot make them disagree.
    """
    with r.pipeline(transaction=True) as pipe:
        pipe.lrange(keys.profile_events(db_id, profile_id), 0, -1)
        pipe.hgetall(keys.profile_subscriptions(db_id, profile_id))
        entries, records = pipe.execute()
    prev_hash, expected_seq, previous = GENESIS_HASH, 1, None
    last_of = {}  # hash_id -> its last event
    for i, raw in enumerate(entries):
        event = read_event(raw)
        if event is None:
            return {"seq": expected_seq, "id": None, "problem": "entry is not JSON"}
        if event.get("seq") != expected_seq:
            return {"seq": expected_seq, "id": event.get("id"), "problem": "entry missing or out of order"}
        if event.get("prev_hash") != prev_hash:
            if previous is not None and _rehashed(previous, event, entries[i + 1] if i + 1 < len(entries) else None):
                return {"seq": previous["seq"], "id": previous.get("id"),
                        "problem": "entry was altered (its hash recomputed: the next entry does not link to it)"}
            return {"seq": expected_seq, "id": event.get("id"), "problem": "prev_hash does not match"}
        if event_hash(event) != event.get("hash"):
            return {"seq": expected_seq, "id": event.get("id"), "problem": "entry was altered"}
        last_of[event.get("hash_id")] = event
        prev_hash, expected_seq, previous = event["hash"], expected_seq + 1, event
    return _unanchored(records, last_of, expected_seq)


def _rehashed(previous, event, following_raw):
    """Whether `previous` (whose hash matches its content) rather than `event` (which does not link to it) is the
    entry that was altered: `event` is as it was written (its own hash covers the prev_hash it has, and the entry
    after it, if any, links to it), so `previous` was rewritten with its hash recomputed (the chain is not keyed).
    Otherwise `event` itself was edited (its prev_hash, its hash recomputed or not), and it is the one named."""
    if event_hash(event) != event.get("hash"):
        return False
    following = read_event(following_raw) if following_raw is not None else None
    return following_raw is None or (following is not None and following.get("prev_hash") == event.get("hash"))


def _unanchored(records, last_of, next_seq):
    """The first subscription (by hash_id) whose record the ledger's end does not account for, or None."""
    from .subscriptions import Status, decode_record  # subscriptions imports this module
    for hash_id in sorted(records):
        try:
            status = Status(decode_record(records[hash_id])["status"]).word
        except (ValueError, TypeError, KeyError, AttributeError):
            return {"seq": next_seq, "id": None, "hash_id": hash_id,
                    "problem": f"subscription {hash_id}: its record is not readable"}
        last = last_of.get(hash_id)
        if last is None:
            return {"seq": next_seq, "id": None, "hash_id": hash_id,
                    "problem": f"subscription {hash_id} has no event: entries missing from the ledger's end"}
        after = last.get("after")
        said = after.get("status") if isinstance(after, dict) else None
        if said != status:
            return {"seq": next_seq, "id": None, "hash_id": hash_id,
                    "problem": f"subscription {hash_id} is {status} but its last event (seq {last['seq']}) says "
                               f"{said}: entries missing from the ledger's end, or that event altered"}
    return None


def read_event(raw):
    """decode_event of a ledger entry, or None for one that is not an event (damaged: verify_chain names it)."""
    try:
        event = decode_event(raw) if raw else None
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def load_refs(r, refs):
    """Events for [(db_id, profile_id, seq)] (None where an entry is gone), one round trip when the ledgers are
    whole. The entry at a seq's place in its list is that event only if its seq says so: after an entry was
    removed the later ones have moved up, and are looked for in their profile's whole list (a second round trip,
    only then)."""
    with r.pipeline(transaction=False) as pipe:
        for db_id, profile_id, seq in refs:
            pipe.lindex(keys.profile_events(db_id, profile_id), int(seq) - 1)
        found = [read_event(raw) for raw in pipe.execute()]
    moved = sorted({(int(db_id), profile_id) for (db_id, profile_id, seq), event in zip(refs, found)
                    if event is None or event.get("seq") != int(seq)})
    if not moved:
        return found
    with r.pipeline(transaction=False) as pipe:
        for db_id, profile_id in moved:
            pipe.lrange(keys.profile_events(db_id, profile_id), 0, -1)
        by_seq = {}
        for (db_id, profile_id), entries in zip(moved, pipe.execute()):
            for event in map(read_event, entries):
                if event is not None:
                    by_seq.setdefault((db_id, profile_id, event.get("seq")), event)
    return [event if event is not None and event.get("seq") == int(seq)
            else by_seq.get((int(db_id), profile_id, int(seq)))
            for (db_id, profile_id, seq), event in zip(refs, found)]


# An event's `at` is taken on the app host before its MULTI/EXEC, its timeline entry's id at the commit on the
# Redis host: export reads the timeline this much wider on each side and keeps the events whose own `at` is in
# the range (an event committed more than a minute after it was built is the one it can miss).
EXPORT_MARGIN_MS = 60_000


def _event_ms(event, entry_id):
    """The event's own time in ms; its timeline entry's time for an entry that is gone or has no readable `at`."""
    at = time_to_ms(event.get("at")) if isinstance(event, dict) else None
    return at if type(at) is int else int(entry_id.split("-")[0])


def export_events(r, start_ms, end_ms, batch=500):
    """Yield every event whose `at` is between two times (ms since the epoch, inclusive), in timeline (commit)
    order; an entry whose event is gone is named {db_id, profile_id, seq, missing: true} by its commit time."""
    start_ms, end_ms = int(start_ms), int(end_ms)
    cursor = f"{max(0, start_ms - EXPORT_MARGIN_MS)}-0"
    end = f"{end_ms + EXPORT_MARGIN_MS}-{2 ** 64 - 1}"
    while True:
        entries = r.xrange(keys.events_timeline(), cursor, end, count=batch)
        if not entries:
            return
        refs = [fields["ref"].split("|") for _id, fields in entries]
        for (entry_id, _fields), (db_id, profile_id, seq), event in zip(entries, refs, load_refs(r, refs)):
            if start_ms <= _event_ms(event, entry_id) <= end_ms:
                yield event or {"db_id": int(db_id), "profile_id": profile_id, "seq": int(seq), "missing": True}
        if len(entries) < batch:
            return
        last_ms, last_seq = entries[-1][0].split("-")
        cursor = f"{last_ms}-{int(last_seq) + 1}"


def verify_all(r, db_id=None, profile_id=None):
    """Verify one profile's chain, or every chain; return None or the first problem with its profile.
    Every profile with a ledger or with subscriptions is verified: one whose ledger was deleted as well."""
    if profile_id is not None:
        targets = [(db_id, profile_id)]
    else:
        pattern = f"{keys.PREFIX}:{{{db_id if db_id is not None else '*'}:*}}:*"
        targets = set()
        for key in r.scan_iter(match=pattern, count=1000):
            end = key.index("}")
            if key[end + 2:] not in ("events", "subs"):  # a profile's other keys (pending timers, undo)
                continue
            db, _, pid = key[len(keys.PREFIX) + 2:end].partition(":")
            targets.add((int(db), pid))
        targets = sorted(targets)
    for db, pid in targets:
        problem = verify_chain(r, db, pid)
        if problem:
            return {"db_id": db, "profile_id": pid, **problem}
    return None
