"""Two versions of the service run alternately in one run: first one-click unsubscribes (or, with --page, the
unsubscribe page GET), CPU per request.

A code change's effect is often a few percent of a request's CPU, and a shared machine's slow spells move
bench/oneclick.py's and bench/page.py's figures by more than that from one run to the next. Here both versions
run at once, each under gunicorn (--workers sync workers) with its own redis-server, and wrk drives them in
alternating rounds (bench/common.compare_max), so a slow spell hits both. Each version is a git revision,
checked out into a temporary worktree (or "." for the working tree as it is). Prints, per version, the median
round's rate, every round's rate, gunicorn's and the whole machine's CPU per request, and:
- one-click: how many of its requests unsubscribed (each round has links not used before; a round that runs
  out of them replays them, which costs less: then raise --subscriptions);
- --page: its ratio to bench/baseline_app.py's one-line template render (this tree's), run in the same rounds,
  as bench/page.py prints it; the pages are those of --subscriptions links to a resource in confirm mode.

    .venv/bin/python bench/versions.py OLD_REV NEW_REV [--page] [--rounds 4] [--seconds 16]
"""
import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import redis  # noqa: E402

from common import (ROOT, Services, compare_max, make_subscriptions, median_ratio, run_wrk,  # noqa: E402
                    write_wrk_script)
from oneclick import BODY, FORM  # noqa: E402
from webapp.keys import events_timeline  # noqa: E402  (common put the repository on sys.path)


def checkout(rev, into):
    """The directory holding `rev`: the repository itself for ".", else a detached worktree made in `into`."""
    if rev == ".":
        return ROOT
    path = os.path.join(into, rev.replace("/", "_"))
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "-q", "--detach", path, rev], check=True)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revs", nargs=2, metavar="REV", help='git revisions ("." for the working tree)')
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=16, help="seconds per version, split into the rounds")
    parser.add_argument("--page", action="store_true", help="the unsubscribe page GET instead of the one-click")
    parser.add_argument("--subscriptions", type=int, default=None,
                        help="links per version (default: 60,000, fresh ones for every round; with --page 10,000)")
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    if args.subscriptions is None:
        args.subscriptions = 10000 if args.page else 60000
    work = tempfile.mkdtemp(prefix="us-versions-")
    services, trees, runs, changes = [], [], {}, {}
    try:
        for rev in args.revs:
            tree = checkout(rev, work)
            trees.append(tree)
            svc = Services()
            services.append(svc)
            base, proc = svc.gunicorn("webapp:create_app()", workers=args.workers, cwd=tree)
            if args.page:
                paths = make_subscriptions(base, args.subscriptions, "confirm")
                script = write_wrk_script(svc.dir, "page.lua", "GET", paths)
                run_wrk(base, script, 1, 8)  # warm-up: templates compiled, each worker's kind of page kept
                runs[rev] = (base, script, proc.pid)
                continue
            paths = make_subscriptions(base, args.subscriptions, "instant")
            warm = paths[:500]
            run_wrk(base, write_wrk_script(svc.dir, "warm.lua", "POST", warm, BODY, FORM), 1, 8)
            per_round = (len(paths) - len(warm)) // args.rounds
            scripts = [write_wrk_script(svc.dir, f"round{i}.lua", "POST",
                                        paths[len(warm) + i * per_round:][:per_round], BODY, FORM)
                       for i in range(args.rounds)]
            runs[rev] = (base, scripts, proc.pid)
            timeline = redis.Redis.from_url(svc.redis_url)
            changes[rev] = (timeline, timeline.xlen(events_timeline()))
        if args.page:
            bare_base, bare_proc = services[0].gunicorn("bench.baseline_app:app", workers=args.workers)
            bare_script = write_wrk_script(services[0].dir, "bare.lua", "GET", ["/page"])
            run_wrk(bare_base, bare_script, 1, 8)
            runs["baseline"] = (bare_base, bare_script, bare_proc.pid)
        results = compare_max(runs, args.seconds, args.rounds, 8)
        # every unsubscribe writes one timeline entry: the requests that unsubscribed, per version
        changed = {rev: timeline.xlen(events_timeline()) - before for rev, (timeline, before) in changes.items()}
        bare = results.pop("baseline", None)
    finally:
        for svc in services:
            svc.close()
        for tree in trees:
            if tree != ROOT:
                subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], check=False)
    what = "unsubscribe page GETs (confirm mode)" if args.page else "first one-click unsubscribes"
    print(f"{what}, {args.workers} sync workers per version, {args.rounds} alternating rounds")
    for rev, fig in results.items():
        rounds = ", ".join(f"{rps:,.0f}" for rps in fig["rps_rounds"])
        line = (f"  {rev:12s} {fig['rps']:7,.0f} req/s (rounds {rounds}); server CPU {fig['cpu_ms']:.3f} ms, "
                f"whole machine {fig['machine_ms']:.3f} ms per request; ")
        if args.page:
            line += f"{median_ratio(fig, bare):.2f} of the one-line template render"
        else:
            line += (f"{changed[rev]:,} of {sum(fig['requests_rounds']):,} requests unsubscribed"
                     + ("  (links ran out: raise --subscriptions)" if max(fig["requests_rounds"]) > per_round else ""))
        print(line)
    if args.page:
        rounds = ", ".join(f"{rps:,.0f}" for rps in bare["rps_rounds"])
        print(f"  {'baseline':12s} {bare['rps']:7,.0f} req/s (rounds {rounds}); server CPU {bare['cpu_ms']:.3f} ms, "
              f"whole machine {bare['machine_ms']:.3f} ms per request (bench/baseline_app.py GET /page)")
    old, new = (results[rev] for rev in args.revs)
    print(f"server CPU per request, {args.revs[1]} against {args.revs[0]}: {new['cpu_ms'] / old['cpu_ms'] - 1:+.1%}")


if __name__ == "__main__":
    main()
