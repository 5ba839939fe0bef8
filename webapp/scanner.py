"""Scanner review: find changes whose evidence looks automated, and revert them in bulk.

Link scanners (Safe Links, Barracuda, Mimecast...) fetch every URL in a message, some with HEAD, some
several times, some running the page's script within seconds of delivery; after a scanner update they hit a
whole recipient domain at once. Each change's evidence (unsubscribe._evidence) keeps the seconds since the
send, the page's recent GET/HEAD counts and the recipient's domain; this module reads the ledger over a
time range and flags:
- `fast`: the change came less than FAST_SECONDS after the send;
- `head_request`: the page was fetched with HEAD (browsers do not navigate with HEAD);
- `get_burst`: the page was fetched GET_BURST or more times shortly before the change;
- `headless`: the browser said it was headless (HeadlessChrome, PhantomJS in its user agent): the pages no
  longer act by themselves there, so such a change was a click by a script;
- `domain_burst`: DOMAIN_BURST or more changes for one resource and recipient domain within DOMAIN_WINDOW
  seconds, each within DOMAIN_WINDOW of its send.
Only changes made by a browser are reviewed (pages, SDK, and timers they started); RFC 8058 one-click and
the API are a mailbox provider's or a platform's explicit request and are never flagged.
"""
import re

from . import keys
from .errors import InvalidInput
from .events import export_events, id_ms, newest_first, read_event
from .resources import get_resources
from .subscriptions import Status, state_of, update_profile, with_state
from .unsubscribe import FINAL_STATUSES

REVIEWED_METHODS = ("page_instant", "page_confirm", "page_now", "sdk", "timer")
FAST_SECONDS = 30
GET_BURST = 3
DOMAIN_BURST = 10
DOMAIN_WINDOW = 600
HEADLESS_AGENT = re.compile(r"HeadlessChrome|PhantomJS|\bHeadless\b")


def flags_of(event):
    """The per-event flags (everything but domain_burst, which needs the neighbours)."""
    evidence = event.get("evidence") or {}
    flags = []
    seconds = evidence.get("seconds_since_send")
    if seconds is not None and seconds < FAST_SECONDS:
        flags.append("fast")
    views = evidence.get("page_views") or {}
    if views.get("HEAD"):
        flags.append("head_request")
    if views.get("GET", 0) + views.get("HEAD", 0) >= GET_BURST:
        flags.append("get_burst")
    if HEADLESS_AGENT.search(evidence.get("user_agent") or ""):
        flags.append("headless")
    return flags


_STATUS_WORDS = frozenset(s.word for s in Status)
# The evidence members the review reads, and the types unsubscribe._evidence writes them with (or None).
_EVIDENCE_TYPES = {"seconds_since_send": (int, float), "page_views": dict, "user_agent": str,
                   "recipient_domain": str}


def reviewable(event):
    """Whether a ledger event has every member the review and the revert read, of the types new_event writes:
    an entry that still reads as JSON but was altered past that (by hand, or damaged storage; events/verify
    names it) is passed over, as unreadable entries are, rather than answered with a 500."""
    evidence = event.get("evidence")
    return (id_ms(event) is not None and type(event.get("seq")) is int and type(event.get("db_id")) is int
            and type(event.get("profile_id")) is str and type(event.get("hash_id")) is str
            and type(event.get("resource_id")) in (int, str) and _is_state(event.get("before"))
            and (event.get("after") is None or _is_state(event["after"])) and isinstance(evidence, dict)
            and all(evidence.get(name) is None or isinstance(evidence[name], kind)
                    for name, kind in _EVIDENCE_TYPES.items())
            and all(type(n) is int for n in (evidence.get("page_views") or {}).values()))


def _is_state(state):
    """A ledger state as state_of writes it: {"status": a status word, "cats": [api names]}."""
    return (isinstance(state, dict) and type(state.get("status")) is str and state["status"] in _STATUS_WORDS
            and type(state.get("cats")) is list and all(type(name) is str for name in state["cats"]))


def review(events, thresholds=None):
    """[(event, flags)] for the reviewed events that carry at least one flag, oldest first."""
    t = {"DOMAIN_BURST": DOMAIN_BURST, "DOMAIN_WINDOW": DOMAIN_WINDOW, **(thresholds or {})}
    reviewed = [e for e in events if e.get("method") in REVIEWED_METHODS and e.get("before")
                and e["after"] != e["before"] and reviewable(e)]
    flagged = {e["id"]: flags_of(e) for e in reviewed}
    groups = {}
    for e in reviewed:
        ev = e.get("evidence") or {}
        seconds = ev.get("seconds_since_send")
        if ev.get("recipient_domain") and seconds is not None and seconds < t["DOMAIN_WINDOW"]:
            groups.setdefault((e["resource_id"], ev["recipient_domain"]), []).append(e)
    for members in groups.values():
        members.sort(key=lambda e: e["id"])
        times = [int(e["id"][:13]) / 1000 for e in members]
        start = 0
        for end in range(len(members)):  # sliding window over change times
            while times[end] - times[start] > t["DOMAIN_WINDOW"]:
                start += 1
            if end - start + 1 >= t["DOMAIN_BURST"]:
                for e in members[start:end + 1]:
                    if "domain_burst" not in flagged[e["id"]]:
                        flagged[e["id"]].append("domain_burst")
    return [(e, flagged[e["id"]]) for e in reviewed if flagged[e["id"]]]


def flagged_changes(r, start_ms, end_ms, thresholds=None):
    return review(export_events(r, start_ms, end_ms), thresholds)


def later_change(client, db_id, profile_id, hash_id, reverted_ids, first_seq):
    """The seq of the subscription's newest ledger event from `first_seq` on that is not one of `reverted_ids`
    (a change since them), or 0 when there is none. Read from the ledger's end back (events.newest_first, a
    page a round trip), and only as far as needed: to that event, or to `first_seq`. Entries are known by their
    own seq, not by their places (after one was removed from the list the later ones have moved up); an
    unreadable entry is passed over (events/verify names it). `client` reads at once: a Redis client, or a
    pipeline that WATCHes."""
    for raw in newest_first(client, keys.profile_events(db_id, profile_id)):
        event = read_event(raw)
        seq = event.get("seq") if event is not None else None
        if type(seq) is not int:
            continue
        if seq < first_seq:
            return 0
        if event.get("hash_id") == hash_id and event.get("id") not in reverted_ids:
            return seq
    return 0


def revert(r, flagged, only_ids=None):
    """Put each flagged change's subscription back to its `before` state, if it is still in the `after` state and
    its ledger has no change of it since but flagged ones being reverted too (a later change by the person wins,
    also one back to that state: later_change). Returns (reverted ids, [{id, reason}] skipped), in `flagged`'s order.

    A subscription's flagged changes are undone together, newest first: each one is undone only if the state
    reached so far is its `after` (so a flagged change after it counts as a change since only when it is not
    being reverted too), and the run lands on its earliest change's `before` in one write and one `revert`
    event. Undone one by one, oldest first, the older would find the newer's state and be skipped.
    """
    wanted = set(only_ids) if only_ids is not None else None
    if wanted is not None:
        unknown = wanted - {e["id"] for e, _ in flagged}
        if unknown:
            raise InvalidInput(f"event {sorted(unknown)[0]} is not a flagged change in this range", field="ids")
    resources = get_resources(r, [e["resource_id"] for e, _ in flagged])
    by_subscription = {}  # (db_id, profile_id, hash_id) -> [(event, flags)], oldest first as `flagged` is
    for event, flags in flagged:
        if wanted is None or event["id"] in wanted:
            key = (event["db_id"], event["profile_id"], event["hash_id"])
            by_subscription.setdefault(key, []).append((event, flags))
    reasons = {}  # event id -> why it was skipped, None when reverted
    for (db_id, profile_id, hash_id), changes in by_subscription.items():
        resource = resources.get(changes[0][0]["resource_id"])
        if resource is None:
            reasons.update((event["id"], "resource deleted") for event, _ in changes)
            continue

        def change(pc, hash_id=hash_id, changes=changes, resource=resource):
            record = pc.records.get(hash_id)
            if record is None:
                return {event["id"]: "subscription deleted" for event, _ in changes}
            # A later change of the person's counts as a change since even when it brought the subscription back
            # to the flagged change's `after` (resubscribed, then unsubscribed again): the ledger says so, the
            # state alone would not.
            later = later_change(pc.pipe, db_id, profile_id, hash_id, {event["id"] for event, _ in changes},
                                 min(event["seq"] for event, _ in changes))
            state, run = state_of(resource, record), []
            for event, flags in sorted(changes, key=lambda change: change[0]["seq"], reverse=True):
                if event["seq"] < later or event["after"] != state:  # changed since: by the person, or by a
                    break                                              # change not reverted
                run.append((event, flags))
                state = event["before"]
            outcome = {event["id"]: "changed since" for event, _ in changes}
            if not run:
                return outcome
            if Status(record["status"]) in FINAL_STATUSES:
                return outcome | {event["id"]: "final status" for event, _ in run}
            earliest = run[-1][0]
            pc.save(hash_id, with_state(resource, record, state), resource, method="revert",
                    smid=earliest.get("smid"),
                    evidence={"reverted_events": [{"id": e["id"], "flags": flags} for e, flags in reversed(run)]})
            return outcome | {event["id"]: None for event, _ in run}

        reasons.update(update_profile(r, db_id, profile_id, change)[0])
    reverted = [e["id"] for e, _ in flagged if e["id"] in reasons and reasons[e["id"]] is None]
    skipped = [{"id": e["id"], "reason": reasons[e["id"]]} for e, _ in flagged if reasons.get(e["id"])]
    return reverted, skipped


def to_json(flagged):
    return [{"event": e, "flags": flags} for e, flags in flagged]
