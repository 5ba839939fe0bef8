"""Every Redis key the service uses, in one place. A key that does not come from here is a bug.

All keys start with PREFIX. One profile's keys share the hash tag `{db_id:profile_id}` so that they
live in one Redis Cluster slot and can be changed together in one MULTI/EXEC or Lua call.

| key                                    | type   | written by                    | expires |
|----------------------------------------|--------|-------------------------------|---------|
| us:resource:next_id                    | string | resources.add (INCR)          | never   |
| us:resources                           | zset   | resources.add/delete          | never   |
| us:resource:<rid>                      | string | resources.add/update (JSON)   | never   |
| us:db:<db_id>:profiles                 | set    | subscriptions (first sub)     | never   |
| us:{<db_id>:<pid>}:subs                | hash   | subscriptions (hash_id->record, encode_record) | never |
| us:{<db_id>:<pid>}:events              | list   | events.queue_append (encode_event, chained) | never |
| us:{<db_id>:<pid>}:pending:<hash_id>   | hash   | unsubscribe.arm_timer: deadline, armed_at, scope, smid, evidence; `lease` (1 s claim by a firer) | never (deleted when settled) |
| us:pending:due                         | zset   | delayed timers: member "db|pid|hash_id", score = deadline | never (members removed when settled) |
| us:{<db_id>:<pid>}:manager_undo        | hash   | preferences (last manager change, and the link that made it) | 10 minutes |
| us:suspensions:due                     | zset   | every save of a record paused with an end (subscriptions.index_pause): "db|pid|hash_id" by end time | never (members removed on resume) |
| us:events:timeline                     | stream | events.queue_append (global index, webhook outbox) | never |
| us:views:<sha256(smid)[:24]>           | hash   | pages GET/HEAD: {GET: n, HEAD: n} (scanner evidence) | 10 minutes |
| us:webhooks                            | hash   | webhooks.add_webhook (id -> JSON) | never |
| us:webhook:next_id                     | string | webhooks.add_webhook (INCR)   | never   |
| us:delivery:<group>:lock               | string | workers.jobs.deliver_target (SET NX EX, refreshed) | timeout + 5 s |
| us:delivery:<group>:queued             | string | workers.housekeeping (SET NX EX) | 60 s |
| us:delivery:<group>                    | hash   | webhooks.deliver: last error/success, failures, next attempt | never (removed with its target) |
| us:housekeeping:alive                  | string | who does housekeeping: "thread" (python -m workers) or "chain" (RQ ticks) | 10 s |
| us:ratelimit:LIMITER/...               | string | Flask-Limiter counters (ratelimits.py): per client address, or per link by its tokens.link_digest | end of the window |

Delivery targets read us:events:timeline through consumer groups (names inside the stream, not keys), and
`<group>` in the us:delivery:* keys is that name: `wh:<webhook id>` for a webhook, `called_url:<rid>` for a
resource's list-unsubscribe call URL (see webhooks.py; older versions' one shared `called_url` group is
upgraded away).

Subscriptions are stored one compact JSON document per hash field (short member names, defaults left out:
subscriptions.encode_record), keyed by `hash_id`, a short stable hash of
(resource_id, channel, address): the SMID names it, so no address appears in a URL.
"""

PREFIX = "us"


def _profile_tag(db_id, profile_id):
    # Hash tag: everything of one profile hashes to one cluster slot.
    return f"{{{db_id}:{profile_id}}}"


def resource_next_id():
    """String counter (INCR) for new resource ids."""
    return f"{PREFIX}:resource:next_id"


def resource_index():
    """Sorted set of resource ids scored by id, for paged listing."""
    return f"{PREFIX}:resources"


def resource(resource_id):
    """String: the resource as JSON."""
    return f"{PREFIX}:resource:{resource_id}"


def db_profiles(db_id):
    """Set of profile ids of one database that have (or had) a subscription."""
    return f"{PREFIX}:db:{db_id}:profiles"


def profile_subscriptions(db_id, profile_id):
    """Hash: hash_id -> the subscription as subscriptions.encode_record stores it, for one profile."""
    return f"{PREFIX}:{_profile_tag(db_id, profile_id)}:subs"


def profile_events(db_id, profile_id):
    """List: the profile's hash-chained events as events.encode_event stores them, oldest first (append-only)."""
    return f"{PREFIX}:{_profile_tag(db_id, profile_id)}:events"


def pending_unsubscribe(db_id, profile_id, hash_id):
    """Hash: one pending delayed unsubscribe of a subscription (deadline, scope, evidence)."""
    return f"{PREFIX}:{_profile_tag(db_id, profile_id)}:pending:{hash_id}"


def pending_due():
    """Sorted set of every pending timer (pending_due_member) scored by its deadline, for the sweeper.

    The one index that spans profiles; under Redis Cluster it would be split per shard.
    """
    return f"{PREFIX}:pending:due"


def pending_due_member(db_id, profile_id, hash_id):
    """A timer's member of pending_due: "db_id|profile_id|hash_id"."""
    return f"{db_id}|{profile_id}|{hash_id}"


def manager_undo(db_id, profile_id):
    """Hash: the subscription record as it was before the profile's last change in the manager
    (fields hash_id, record, after, and link: the manager link that made it, preferences.undo_link), kept for
    the undo window."""
    return f"{PREFIX}:{_profile_tag(db_id, profile_id)}:manager_undo"


def suspensions_due():
    """Sorted set of suspended subscriptions (suspension_member) scored by the time they resume. Every saved
    record that is paused with an end has its member here (subscriptions.ProfileChange.flush); a member whose
    record is no longer so is dropped by the sweeper when it comes to it."""
    return f"{PREFIX}:suspensions:due"


def suspension_member(db_id, profile_id, hash_id):
    """A pause's member of suspensions_due: "db_id|profile_id|hash_id"."""
    return f"{db_id}|{profile_id}|{hash_id}"


def events_timeline():
    """Stream: a global, time-ordered index of events (profile reference + sequence number)."""
    return f"{PREFIX}:events:timeline"


def rate_limits():
    """Prefix of the rate-limit counters of the SDK endpoint and the page and manager forms (Flask-Limiter's own
    key layout follows it)."""
    return f"{PREFIX}:ratelimit"


def webhooks():
    """Hash: webhook id -> JSON {id, url, resource_id, secret, created_at}."""
    return f"{PREFIX}:webhooks"


def webhook_next_id():
    """String counter (INCR) for webhook ids."""
    return f"{PREFIX}:webhook:next_id"


def delivery_state(group):
    """Hash: one delivery target's state (last_error, last_error_at, last_success_at, failures,
    next_attempt_at). The target's read position lives in its consumer group on the timeline."""
    return f"{PREFIX}:delivery:{group}"


def housekeeping_alive():
    """String: housekeeping is being done ("thread": a python -m workers Housekeeper; "chain": housekeeping
    ticks under a plain rq worker); refreshed by whoever does it (see delayed.ensure_housekeeping)."""
    return f"{PREFIX}:housekeeping:alive"


def page_views(digest):
    """Hash: recent GET/HEAD counts of one SMID's page, keyed by a digest of the SMID (telemetry only)."""
    return f"{PREFIX}:views:{digest}"


def delivery_lock(group):
    """String: held by the one delivery job running for a target (SET NX EX; a killed job's lock expires)."""
    return f"{PREFIX}:delivery:{group}:lock"


def delivery_queued(group):
    """String: a delivery job for the target is queued (cleared when it starts; expires if it is lost)."""
    return f"{PREFIX}:delivery:{group}:queued"
