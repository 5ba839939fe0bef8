"""RFC 8058 one-click unsubscribe POST: throughput and latency against a bare Flask 204 endpoint, same run.

Starts a redis-server and two gunicorn apps with the same settings (--workers sync workers each, no access
log): the service, and bench/baseline_app.py whose POST /nothing answers 204 without touching Redis. Creates
--subscriptions subscriptions (one profile each; categories news, offers and a required receipts) through the
API and issues one message link per subscription (category "news"), then:

1. max rate: wrk, closed loop with --connections connections, POSTs `List-Unsubscribe=One-Click` as
   application/x-www-form-urlencoded to the unsubscribe URLs, cycling through all of them; the same against
   /nothing. The two alternate in --rounds rounds (a shared machine's slow spells then hit both), and the
   ratio is the median of the per-round ratios. The first pass over the links really unsubscribes ("news"
   stops; the record, a chained ledger event and a timeline entry are written); later passes are idempotent
   replays, as a provider's retries are. The table says how many requests changed something.
2. half load: wrk paced by its Lua delay() hook to half of each app's own median max rate (evenly spaced
   sends from one schedule, with many idle connections so that a send never waits for an earlier reply:
   open loop), again alternating in --rounds rounds, --seconds per app in all; p50/p99 from sending a request
   to the end of its reply, from the round with the median p99 (every round's p99 is printed too).

    .venv/bin/python bench/oneclick.py [--seconds 10] [--rounds 3] [--subscriptions 10000] [--workers N] [--floor]
"""
import argparse
import os
import sys
import time

import redis

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (Services, add_load_arguments, compare_half_load, compare_max, print_comparison,  # noqa: E402
                    run_title, run_wrk, setup_note, start_service_and_baseline, write_wrk_script)

BODY = "List-Unsubscribe=One-Click"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_arguments(parser)
    parser.add_argument("--floor", action="store_true",
                        help="also measure the max rate of a bare endpoint making one redis-py call (~+seconds)")
    args = parser.parse_args()
    started = time.perf_counter()
    with Services() as services:
        base, proc, bare_base, bare_proc, paths, setup = start_service_and_baseline(services, args, "instant")
        r = redis.Redis.from_url(services.redis_url, decode_responses=True)
        script = write_wrk_script(services.dir, "oneclick.lua", "POST", paths, BODY, FORM)
        bare_script = write_wrk_script(services.dir, "nothing.lua", "POST", ["/nothing"], BODY, FORM)
        # Warm-up (imports, Jinja, connection pools) on links the measured runs reuse anyway.
        run_wrk(base, script, 1, args.connections)
        run_wrk(bare_base, bare_script, 1, args.connections)
        events0 = r.xlen("us:events:timeline")
        runs = {"svc": (base, script, proc.pid), "bare": (bare_base, bare_script, bare_proc.pid)}
        if args.floor:
            runs["floor"] = (bare_base, write_wrk_script(services.dir, "floor.lua", "POST", ["/one_redis_call"], BODY,
                                                         FORM), bare_proc.pid)
        res = compare_max(runs, args.seconds, args.rounds, args.connections)
        svc, bare = res["svc"], res["bare"]
        changed = r.xlen("us:events:timeline") - events0
        measured = sum(x * args.seconds / args.rounds for x in svc["rps_rounds"])
        svc_half, bare_half = compare_half_load(services, args, "POST", ("svc", base, paths, svc),
                                                ("bare", bare_base, ["/nothing"], bare), BODY, FORM)
    print_comparison(
        run_title("one-click POST", args, paths),
        svc, bare, svc_half, bare_half, 0.8,
        notes=[f"\nmax-rate requests that unsubscribed (wrote record + ledger event): {changed:,} of ~{measured:,.0f}; "
               f"the rest were idempotent replays",
               *([f"floor: bare Flask endpoint making one redis-py call: {res['floor']['rps']:,.0f} req/s, "
                  f"{res['floor']['rps'] / bare['rps']:.2f} of the baseline, "
                  f"{res['floor']['cpu_ms']:.2f} ms server CPU per request"] if args.floor else []),
               setup_note(paths, setup, started)])


if __name__ == "__main__":
    main()
