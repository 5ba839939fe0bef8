"""Unsubscribe page GET (confirm mode): throughput and latency against a bare Flask template render, same run.

Starts a redis-server and two gunicorn apps with the same settings (--workers sync workers each, no access
log): the service, and bench/baseline_app.py whose GET /page renders a one-line template without touching
Redis. Creates --subscriptions subscriptions (one profile each; categories news, offers and a required
receipts) to a resource in confirm mode through the API and issues one message link per subscription
(category "news"), then:

1. max rate: wrk, closed loop with --connections connections, GETs the unsubscribe pages, cycling through all
   of them (the page the person sees before confirming: three categories, the CSRF-protected form, the
   manager link), and the same against /page. The two alternate in --rounds rounds (a shared machine's slow
   spells then hit both); the ratio is the median of the per-round ratios. A third app run in the same
   rounds, GET /page_same_template, renders the service's own confirm template (same size) from fixed values:
   what the page costs without its Redis read, token checks, language choice and form token.
2. half load: wrk paced by its Lua delay() hook to half of each app's own median max rate (evenly spaced
   sends from one schedule, with many idle connections so that a send never waits for an earlier reply:
   open loop), again alternating in --rounds rounds, --seconds per app in all; p50/p99 from sending a request
   to the end of its reply, from the round with the median p99 (every round's p99 is printed too).

    .venv/bin/python bench/page.py [--seconds 10] [--rounds 3] [--subscriptions 10000] [--workers N]
                                   [--baseline-path /page_compiled_per_request] [--no-render]
"""
import argparse
import os
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (Services, add_load_arguments, compare_half_load, compare_max, print_comparison,  # noqa: E402
                    median_ratio, run_title, run_wrk, setup_note, start_service_and_baseline, write_wrk_script)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_arguments(parser)
    parser.add_argument("--baseline-path", default="/page", choices=["/page", "/page_compiled_per_request"],
                        help="the baseline: a cached template (default), or the template compiled on every request "
                             "(render_template_string, the first version of bench/baseline_app.py's /page)")
    parser.add_argument("--no-render", action="store_true",
                        help="also measure the service with rendering replaced by a constant string "
                             "(bench/no_render_app.py): the ratio no template work could beat")
    args = parser.parse_args()
    started = time.perf_counter()
    with Services() as services:
        base, proc, bare_base, bare_proc, paths, setup = start_service_and_baseline(services, args, "confirm")
        with urllib.request.urlopen(base + paths[0], timeout=10) as resp:
            page_bytes = len(resp.read())
            assert b'name="csrf_token"' in urllib.request.urlopen(base + paths[1], timeout=10).read()
        with urllib.request.urlopen(bare_base + args.baseline_path, timeout=10) as resp:
            bare_bytes = len(resp.read())
        script = write_wrk_script(services.dir, "page.lua", "GET", paths)
        bare_script = write_wrk_script(services.dir, "bare.lua", "GET", [args.baseline_path])
        run_wrk(base, script, 1, args.connections)  # warm-up
        run_wrk(bare_base, bare_script, 1, args.connections)
        same_script = write_wrk_script(services.dir, "same.lua", "GET", ["/page_same_template"])
        with urllib.request.urlopen(bare_base + "/page_same_template", timeout=10) as resp:
            same_bytes = len(resp.read())
        run_wrk(bare_base, same_script, 1, args.connections)
        runs = {"svc": (base, script, proc.pid), "bare": (bare_base, bare_script, bare_proc.pid),
                "same": (bare_base, same_script, bare_proc.pid)}
        if args.no_render:
            no_render_base, no_render_proc = services.gunicorn("bench.no_render_app:app", workers=args.workers,
                                                               worker_class=args.worker_class, threads=args.threads)
            with urllib.request.urlopen(no_render_base + paths[0], timeout=10) as resp:
                assert set(resp.read()) == {ord("x")}  # the variant's constant page: nothing rendered
            run_wrk(no_render_base, script, 1, args.connections)
            runs["no_render"] = (no_render_base, script, no_render_proc.pid)
        res = compare_max(runs, args.seconds, args.rounds, args.connections, services.redis_proc.pid)
        svc, bare, same = res["svc"], res["bare"], res["same"]
        svc_half, bare_half = compare_half_load(services, args, "GET", ("svc", base, paths, svc),
                                                ("bare", bare_base, [args.baseline_path], bare))
    print_comparison(
        run_title("unsubscribe page GET (confirm mode)", args, paths),
        [(None, svc, bare)], svc_half, bare_half, 0.7,
        notes=[f"\nbaseline GET {args.baseline_path}; page sizes: service {page_bytes:,} bytes, "
               f"baseline {bare_bytes:,} bytes",
               f"the service's confirm template rendered bare (GET /page_same_template, {same_bytes:,} bytes): "
               f"{same['rps']:,.0f} req/s, {same['cpu_ms']:.2f} ms server CPU per request; service/that: "
               f"{median_ratio(svc, same):.2f} (median of the per-round ratios; goal >= 0.70 against this "
               f"baseline: {'MET' if median_ratio(svc, same) >= 0.7 else 'NOT MET'})",
               *([f"the service with rendering replaced by a constant string (bench/no_render_app.py): "
                  f"{res['no_render']['rps']:,.0f} req/s, {res['no_render']['cpu_ms']:.2f} ms server CPU per request; "
                  f"that/baseline: {median_ratio(res['no_render'], bare):.2f}"]
                 if args.no_render else []),
               setup_note(paths, setup, started)])


if __name__ == "__main__":
    main()
