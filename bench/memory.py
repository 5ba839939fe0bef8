"""Redis memory per subscription at --subscriptions subscriptions (default 1,000,000), with and without ledger.

For each Redis configuration (redis-server's defaults, and the settings `python -m webapp run` starts its
local Redis with, webapp.__main__.REDIS_MEMORY_SETTINGS), in a fresh redis-server:

1. one resource and one subscription are created through the real code (resources.add_resource,
   subscriptions.set_subscription); the record and creation ledger event it stored are the templates;
2. INFO used_memory; then --subscriptions subscriptions, one profile each (profile ids of 8 characters,
   addresses user0000042@example.com), written exactly as set_subscription stores them: the stored record
   (subscriptions.encode_record) in the profile's hash (keys.profile_subscriptions, field =
   subscriptions.make_hash_id) and the profile id in the database's profile set (keys.db_profiles), as RESP
   through `redis-cli --pipe`, not through the API;
   INFO used_memory again;
3. the same for each subscription's creation ledger event (RPUSH to keys.profile_events, XADD to
   keys.events_timeline; the event is set_subscription's, stored as events.encode_event does, with its own
   id, profile, hash_id and SHA-256);
4. a random sample is read back through the real API (POST /api/v1.1/subscriptions/get and events/verify on a
   Flask test client of the same Redis) and must equal what the API answers for the template subscription;
5. MEMORY USAGE and OBJECT ENCODING of sample keys say where the bytes go.

    .venv/bin/python bench/memory.py [--subscriptions 1000000] [--sample 300]
"""
import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import time

import redis

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, Services  # noqa: E402

sys.path.insert(0, ROOT)
from webapp import events, keys, resources, subscriptions  # noqa: E402
from webapp.__main__ import REDIS_MEMORY_SETTINGS  # noqa: E402

CHUNK = 5000
TEMPLATE_PID, TEMPLATE_EMAIL = "t0000000", "tmpl0000000@example.com"
RESOURCE = {"name": "Weekly news", "channels": ["email"], "dbs_ids": [1],
            "categories": [{"title": "News", "api_name": "news"},
                           {"title": "Receipts", "api_name": "receipts", "required": True}],
            "channel_settings": {"email": {"from_email": "news@shop.example", "list_id": "weekly.shop.example"}},
            "unsubscribe": {"mode": "confirm"}}
# Placeholders of the same length as what replaces them, none inside another ("~" occurs nowhere else in a
# record or an event).
P_PID, P_EMAIL, P_HID, P_ID, P_HASH = "~P" + "~" * 6, "~E" + "~" * 21, "~H" + "~" * 6, "~I" + "~" * 20, "~S" + "~" * 62


def profile(i):
    return f"p{i:07d}", f"user{i:07d}@example.com"


def resp(*parts):
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        b = p if isinstance(p, bytes) else str(p).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def templates(r, rid):
    """(record template, stored event template, canonical event template) from the template subscription
    set_subscription stored, with placeholders; each is checked to reproduce the stored original exactly."""
    data = {"db_id": 1, "profile_id": TEMPLATE_PID, "resource_id": rid, "channel": "email", "email": TEMPLATE_EMAIL}
    sub, _is_new = subscriptions.set_subscription(r, data)
    raw_record = r.hget(keys.profile_subscriptions(1, TEMPLATE_PID), sub["hash_id"])
    raw_event = r.lindex(keys.profile_events(1, TEMPLATE_PID), 0)
    event = events.decode_event(raw_event)
    assert subscriptions.decode_record(raw_record)["address"] == {"email": TEMPLATE_EMAIL}
    assert raw_record.count(TEMPLATE_EMAIL) == 1 and len(P_EMAIL) == len(TEMPLATE_EMAIL)
    record_tpl = raw_record.replace(TEMPLATE_EMAIL, P_EMAIL)
    fields = {"id": (P_ID, event["id"]), "profile_id": (P_PID, TEMPLATE_PID), "hash_id": (P_HID, sub["hash_id"])}
    assert all(len(p) == len(v) for p, v in fields.values())
    for name, (placeholder, _value) in fields.items():
        event[name] = placeholder
    original_hash, event["hash"] = event["hash"], P_HASH
    event_tpl = events.encode_event(event)
    canonical_tpl = json.dumps({k: v for k, v in event.items() if k != "hash"}, sort_keys=True, separators=(",", ":"))

    def fill(tpl, values):
        for name, (placeholder, _v) in fields.items():
            tpl = tpl.replace(placeholder, values[name])
        return tpl

    originals = {name: v for name, (_p, v) in fields.items()}
    assert hashlib.sha256(fill(canonical_tpl, originals).encode()).hexdigest() == original_hash
    assert fill(event_tpl, originals).replace(P_HASH, original_hash) == raw_event
    return sub, record_tpl, event_tpl, canonical_tpl


def pipe_in(redis_url, chunks):
    """Send RESP commands through `redis-cli --pipe` (mass insertion); return its summary line."""
    proc = subprocess.Popen(["redis-cli", "-s", redis_url.removeprefix("unix://"), "--pipe"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for chunk in chunks:
        proc.stdin.write(chunk)
    proc.stdin.close()
    out = proc.stdout.read().decode()
    if proc.wait(timeout=600) != 0 or "errors: 0" not in out:
        raise RuntimeError(f"redis-cli --pipe failed: {out}")
    return out.strip().splitlines()[-1]


def subscription_commands(n, rid, record_tpl):
    profiles_key = keys.db_profiles(1)
    for start in range(0, n, CHUNK):
        parts, members = [], []
        for i in range(start, min(n, start + CHUNK)):
            pid, email = profile(i)
            hash_id = subscriptions.make_hash_id(rid, "email", email)
            parts.append(resp("HSET", keys.profile_subscriptions(1, pid), hash_id, record_tpl.replace(P_EMAIL, email)))
            members.append(pid)
        # set_subscription adds the profile id with one SADD per write; one SADD per chunk stores the same set.
        parts.append(resp("SADD", profiles_key, *members))
        yield b"".join(parts)


def event_commands(n, rid, event_tpl, canonical_tpl):
    timeline, ms = keys.events_timeline(), int(time.time() * 1000)
    for start in range(0, n, CHUNK):
        parts = []
        for i in range(start, min(n, start + CHUNK)):
            pid, email = profile(i)
            hash_id = subscriptions.make_hash_id(rid, "email", email)
            event_id = f"{ms:013d}-{i:08x}"
            canonical = canonical_tpl.replace(P_ID, event_id).replace(P_PID, pid).replace(P_HID, hash_id)
            digest = hashlib.sha256(canonical.encode()).hexdigest()
            stored = (event_tpl.replace(P_ID, event_id).replace(P_PID, pid).replace(P_HID, hash_id)
                      .replace(P_HASH, digest))
            parts.append(resp("RPUSH", keys.profile_events(1, pid), stored))
            parts.append(resp("XADD", timeline, "*", "ref", f"1|{pid}|1", "rid", rid, "method", "api"))
        yield b"".join(parts)


def used_memory(r):
    return r.info("memory")["used_memory"]


def verify_sample(services, r, n, sample, template_sub):
    """Read a random sample back through the real API; returns how many were checked."""
    from webapp import create_app
    app = create_app({"TESTING": True, "REDIS_URL": services.redis_url, "API_TOKEN": "bench-api-token",
                      "SIGNING_KEYS": "b1:bench-secret", "PUBLIC_BASE_URL": "https://unsub.example",
                      "VAR_DIR": services.dir})
    client = app.test_client()

    def call(path, **body):
        reply = client.post(f"/api/v1.1/{path}", json={"token": "bench-api-token", **body}).get_json()
        assert reply["error"] == 0, reply
        return reply["data"]

    expected_template = call("subscriptions/get", db_id=1, profile_id=TEMPLATE_PID,
                             resource_id=template_sub["resource_id"], channel="email", email=TEMPLATE_EMAIL)
    picks = random.Random(42).sample(range(n), min(sample, n))
    for i in picks:
        pid, email = profile(i)
        got = call("subscriptions/get", db_id=1, profile_id=pid, resource_id=template_sub["resource_id"],
                   channel="email", email=email)
        expected = dict(expected_template, profile_id=pid, email=email, hash_id=got["hash_id"],
                        email_data={"email": email, "domain": "example.com",
                                    "md5": hashlib.md5(email.encode()).hexdigest()})
        assert got == expected, (got, expected)
        assert got["hash_id"] == subscriptions.make_hash_id(template_sub["resource_id"], "email", email)
        if r.exists(keys.profile_events(1, pid)):
            assert call("events/verify", db_id=1, profile_id=pid) == {"ok": True, "first_bad": None}
            assert events.list_events(r, 1, pid)[0][0]["method"] == "api"
    app.extensions["redis"].close()
    return len(picks)


def breakdown(r, n):
    pid, _email = profile(n // 2)
    rows = []
    for label, key, share in (("profile hash (keys.profile_subscriptions)", keys.profile_subscriptions(1, pid), 1),
                              ("db profile set (keys.db_profiles), per member", keys.db_profiles(1), n + 1),
                              ("ledger list (keys.profile_events)", keys.profile_events(1, pid), 1),
                              ("events timeline stream, per entry", keys.events_timeline(), n + 1)):
        if r.exists(key):
            rows.append((label, r.object("encoding", key), r.memory_usage(key, samples=0) / share))
    return rows


def measure(args, label, redis_args):
    t0 = time.perf_counter()
    with Services(redis_args=redis_args) as services:
        r = redis.Redis.from_url(services.redis_url, decode_responses=True)
        rid = resources.add_resource(r, RESOURCE)["id"]
        template_sub, record_tpl, event_tpl, canonical_tpl = templates(r, rid)
        m0 = used_memory(r)
        pipe_in(services.redis_url, subscription_commands(args.subscriptions, rid, record_tpl))
        m1 = used_memory(r)
        subs_only = breakdown(r, args.subscriptions)
        pipe_in(services.redis_url, event_commands(args.subscriptions, rid, event_tpl, canonical_tpl))
        m2 = used_memory(r)
        with_ledger = breakdown(r, args.subscriptions)
        checked = verify_sample(services, r, args.subscriptions, args.sample, template_sub)
        n = args.subscriptions
        hlp = r.config_get("hash-max-listpack-*")
        record_bytes = len(record_tpl.replace(P_EMAIL, profile(0)[1]))
        keyspace = r.info("keyspace").get("db0", {}).get("keys")
    return {"label": label, "settings": " ".join(redis_args) or "(none)", "hlp": hlp, "subs": (m1 - m0) / n,
            "ledger": (m2 - m1) / n, "total": (m2 - m0) / n, "rows": with_ledger, "subs_rows": subs_only,
            "checked": checked, "record_bytes": record_bytes, "keys": keyspace, "seconds": time.perf_counter() - t0}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscriptions", type=int, default=1_000_000)
    parser.add_argument("--sample", type=int, default=300, help="subscriptions read back through the API")
    args = parser.parse_args()
    started = time.perf_counter()
    results = [measure(args, "redis-server defaults", ()),
               measure(args, "python -m webapp run", REDIS_MEMORY_SETTINGS)]
    n = args.subscriptions
    w = 30
    print(f"\nRedis memory per subscription at {n:,} subscriptions (one profile each), INFO used_memory "
          f"after minus before the bulk load")
    print(f"{'':46}" + "".join(f"{res['label']:>{w}}" for res in results))
    print(f"{'extra redis-server settings':46}" + "".join(f"{res['settings']:>{w}}" for res in results))
    print(f"{'hash-max-listpack-entries / -value':46}" + "".join(
        f"{res['hlp']['hash-max-listpack-entries'] + ' / ' + res['hlp']['hash-max-listpack-value']:>{w}}"
        for res in results))
    print(f"{'bytes per subscription, without ledger':46}" + "".join(f"{res['subs']:>{w},.0f}" for res in results))
    print(f"{'bytes per creation ledger event':46}" + "".join(f"{res['ledger']:>{w},.0f}" for res in results))
    print(f"{'bytes per subscription, with its ledger event':46}" + "".join(f"{res['total']:>{w},.0f}"
                                                                           for res in results))
    print(f"{'goal <= 300 bytes (without / with ledger)':46}" + "".join(
        f"{('MET' if res['subs'] <= 300 else 'NOT MET') + ' / ' + ('MET' if res['total'] <= 300 else 'NOT MET'):>{w}}"
        for res in results))
    for res in results:
        print(f"\nwhere the bytes go ({res['label']}): MEMORY USAGE of a sample key (with ledger loaded)")
        for label, encoding, size in res["rows"]:
            print(f"  {label:50}{encoding:>12}{size:10,.0f} B")
        print(f"  stored record {res['record_bytes']} B; keys in db: {res['keys']:,}; sample read back through the "
              f"API: {res['checked']} subscriptions, all equal, ledger chains verified; {res['seconds']:.0f}s")
    print(f"\nwhole run {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
