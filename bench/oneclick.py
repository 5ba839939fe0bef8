"""RFC 8058 one-click unsubscribe POST: throughput and latency against a bare Flask 204 endpoint, same run.

Starts a redis-server and two gunicorn apps with the same settings (--workers sync workers each, no access
log): the service, and bench/baseline_app.py whose POST /nothing answers 204 without touching Redis. Creates
--subscriptions subscriptions (one profile each; categories news, offers and a required receipts) through the
API and issues one message link per subscription (category "news"). wrk POSTs `List-Unsubscribe=One-Click`
as application/x-www-form-urlencoded to the unsubscribe URLs. Two kinds of one-click are measured apart:

- first unsubscribes: every request goes to a link not used before, so it really unsubscribes ("news" stops;
  the record, a chained ledger event and a timeline entry are written: two round trips). This is what a mail
  provider's one-click is, one per person, so it is the headline figure. The links are split into slices, one
  per round, and the table says how many of these requests changed something (all of them, unless the links
  ran out: then raise --subscriptions; requests still in flight when a round ends can add a few);
- replays: the links those rounds completed, again: idempotent (reads only, one round trip), as a provider's
  retries are (a link whose request was cut off when a round ended may still unsubscribe here).

1. max rate: wrk, closed loop with --connections connections, for each kind against /nothing; the two apps
   alternate in --rounds rounds (a shared machine's slow spells then hit both), and each ratio is the median
   of the per-round ratios.
2. half load, first unsubscribes: wrk paced by its Lua delay() hook to half of each app's own median max rate
   (evenly spaced sends from one schedule, with many idle connections so that a send never waits for an
   earlier reply: open loop), on fresh links, again alternating in --rounds rounds, --seconds per app in all;
   p50/p99 from sending a request to the end of its reply, from the round with the median p99 (every
   round's p99 is printed too).

With --floor, each kind is also compared with bare endpoints making as many Redis round trips as it needs (two,
one) and nothing else: one in Flask on redis-py, and one in a WSGI layer in front of Flask on webapp/direct.py,
as the service's one-click is answered. The second is the ratio no one-click of this design could beat here.

    .venv/bin/python bench/oneclick.py [--seconds 10] [--rounds 3] [--subscriptions 70000] [--workers N] [--floor]
"""
import argparse
import os
import sys
import time

import redis

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (Services, add_load_arguments, compare_half_load, compare_max, print_comparison,  # noqa: E402
                    median_ratio, run_title, run_wrk, setup_note, start_service_and_baseline, write_wrk_script,
                    wrk_requested)
from webapp.keys import events_timeline  # noqa: E402  (common put the repository on sys.path)

BODY = "List-Unsubscribe=One-Click"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_arguments(parser)
    parser.set_defaults(subscriptions=70000)  # fresh links for every first-unsubscribe round (up to ~4,500 req/s)
    parser.add_argument("--floor", action="store_true",
                        help="also measure bare endpoints making two and one Redis round trips (a first unsubscribe's "
                             "and a replay's): through Flask and redis-py, and in front of Flask on webapp/direct.py")
    args = parser.parse_args()
    started = time.perf_counter()
    with Services() as services:
        base, proc, bare_base, bare_proc, paths, setup = start_service_and_baseline(services, args, "instant")
        r = redis.Redis.from_url(services.redis_url, decode_responses=True)

        def events_written():  # every change writes one ledger event and one timeline entry
            return r.xlen(events_timeline())

        # Links: a few for the warm-up, then per round a slice for the max rate and half as many for half load.
        warm = max(1, min(500, len(paths) // 20))
        per_round = (len(paths) - warm) // (3 * args.rounds)
        max_slices = [paths[warm + 3 * i * per_round:][:2 * per_round] for i in range(args.rounds)]
        half_slices = [paths[warm + (3 * i + 2) * per_round:][:per_round] for i in range(args.rounds)]
        first_scripts = [write_wrk_script(services.dir, f"first{i}.lua", "POST", s, BODY, FORM)
                         for i, s in enumerate(max_slices)]
        bare_script = write_wrk_script(services.dir, "nothing.lua", "POST", ["/nothing"], BODY, FORM)
        # Warm-up (imports, connection pools, Lua scripts) on links of its own.
        run_wrk(base, write_wrk_script(services.dir, "warm.lua", "POST", paths[:warm], BODY, FORM), 1,
                args.connections)
        run_wrk(bare_base, bare_script, 1, args.connections)
        redis_pid = services.redis_proc.pid
        events0 = events_written()
        runs = {"svc": (base, first_scripts, proc.pid), "bare": (bare_base, bare_script, bare_proc.pid)}
        if args.floor:
            runs.update(floor_runs(services, bare_base, bare_proc, "/two_redis_calls", "/two_direct_calls"))
        first = compare_max(runs, args.seconds, args.rounds, args.connections, redis_pid)
        changed = events_written() - events0
        # Replays: the links the first-unsubscribe rounds completed requests to (all of them unsubscribed).
        used = [p for n, s in zip(first["svc"]["requests_rounds"], max_slices) for p in wrk_requested(s, n)]
        replay_script = write_wrk_script(services.dir, "replay.lua", "POST", used, BODY, FORM)
        runs = {"svc": (base, replay_script, proc.pid), "bare": (bare_base, bare_script, bare_proc.pid)}
        if args.floor:
            runs.update(floor_runs(services, bare_base, bare_proc, "/one_redis_call", "/one_direct_call"))
        events0 = events_written()
        replays = compare_max(runs, args.seconds, args.rounds, args.connections, redis_pid)
        replays_changed = events_written() - events0
        events0 = events_written()
        svc_half, bare_half = compare_half_load(services, args, "POST", ("svc", base, half_slices, first["svc"]),
                                                ("bare", bare_base, ["/nothing"], first["bare"]), BODY, FORM)
        half_changed = events_written() - events0
    first_requests, half_requests = sum(first["svc"]["requests_rounds"]), sum(svc_half["requests_rounds"])
    ran_out = any(n > len(s) for figs, slices in ((first["svc"], max_slices), (svc_half, half_slices))
                  for n, s in zip(figs["requests_rounds"], slices))
    print_comparison(
        run_title("one-click POST", args, paths),
        [("first unsubscribes", first["svc"], first["bare"]), ("replays", replays["svc"], replays["bare"])],
        svc_half, bare_half, 0.8,
        notes=[f"\nrequests that unsubscribed (wrote record + ledger event): first-unsubscribe rounds {changed:,} of "
               f"{first_requests:,}; replay rounds {replays_changed:,}; half load {half_changed:,} of {half_requests:,}"
               + ("  (links ran out: raise --subscriptions)" if ran_out else ""),
               *([floor_note("Flask endpoint making two redis-py calls (a first unsubscribe's round trips)", first,
                             "floor"),
                  floor_note("WSGI layer in front of Flask making two calls on webapp/direct.py (the one-click's "
                             "own architecture)", first, "floor_direct"),
                  floor_note("Flask endpoint making one redis-py call (a replay's round trip)", replays, "floor"),
                  floor_note("WSGI layer in front of Flask making one call on webapp/direct.py", replays,
                             "floor_direct")] if args.floor else []),
               setup_note(paths, setup, started)])


def floor_runs(services, bare_base, bare_proc, flask_path, direct_path):
    """compare_max runs of the two floors of bench/baseline_app.py: through Flask and redis-py, and in front of
    Flask on webapp/direct.py."""
    return {name: (bare_base, write_wrk_script(services.dir, f"{path.strip('/')}.lua", "POST", [path], BODY, FORM),
                   bare_proc.pid)
            for name, path in (("floor", flask_path), ("floor_direct", direct_path))}


def floor_note(what, res, name):
    return (f"floor: bare {what}: {res[name]['rps']:,.0f} req/s, "
            f"{median_ratio(res[name], res['bare']):.2f} of the baseline (median of the per-round ratios), "
            f"{res[name]['cpu_ms']:.2f} ms server CPU per request")


if __name__ == "__main__":
    main()
