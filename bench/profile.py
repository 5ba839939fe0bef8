"""Where the gunicorn workers spend their time on the hot paths: py-spy samples under wrk load.

Starts a redis-server and the service under gunicorn (--workers sync workers, as bench/oneclick.py and
bench/page.py do), creates --subscriptions subscriptions and links through the API, drives the chosen path
with wrk for --seconds and samples every worker with py-spy (pip install py-spy; needs ptrace, e.g. root).
Prints the functions with the most samples, inclusive and self, and writes the collapsed stacks (for
flamegraph tools or speedscope) to --out.

    .venv/bin/python bench/profile.py oneclick [--seconds 10]
    .venv/bin/python bench/profile.py page [--seconds 10]
"""
import argparse
import collections
import os
import subprocess
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Services, make_subscriptions, run_wrk, write_wrk_script  # noqa: E402

PATHS = {
    "oneclick": ("instant", "POST", "List-Unsubscribe=One-Click", {"Content-Type": "application/x-www-form-urlencoded"}),
    "page": ("confirm", "GET", None, {}),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", choices=sorted(PATHS))
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--subscriptions", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", default=None, help="collapsed stacks file (default: /tmp/profile-<path>.txt)")
    args = parser.parse_args()
    mode, method, body, headers = PATHS[args.path]
    out = args.out or f"/tmp/profile-{args.path}.txt"
    with Services() as services:
        base, proc = services.gunicorn("webapp:create_app()", workers=args.workers)
        paths = make_subscriptions(base, args.subscriptions, mode)
        script = write_wrk_script(services.dir, "load.lua", method, paths, body, headers)
        run_wrk(base, script, 1, 8)  # warm up
        load = threading.Thread(target=run_wrk, args=(base, script, args.seconds + 2, 8))
        load.start()
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "--pid", str(proc.pid), "--subprocesses", "--duration",
                        str(int(args.seconds)), "--rate", "200", "--format", "raw", "--output", out,
                        ], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=args.seconds + 60)
        load.join()
    inclusive, own, total = collections.Counter(), collections.Counter(), 0
    with open(out) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            count = int(count)
            frames = [fr for fr in stack.split(";") if not fr.startswith("process ")]
            if not frames:
                continue
            total += count
            for fr in set(frames):
                inclusive[fr] += count
            own[frames[-1]] += count
    idle = sum(c for fr, c in own.items() if "wait (selectors" in fr or "select (selectors" in fr
               or "accept (" in fr or "sleep (gunicorn" in fr)
    print(f"{args.path}: {total} samples over all workers, {idle} of them idle in gunicorn's wait/accept\n")
    print(f"top {args.top} by inclusive samples (% of busy samples):")
    busy = max(1, total - idle)
    for fr, c in inclusive.most_common(args.top + 10)[:args.top]:
        print(f"{100 * c / busy:6.1f}%  {fr}")
    print(f"\ntop {args.top} by self samples:")
    for fr, c in own.most_common(args.top):
        print(f"{100 * c / busy:6.1f}%  {fr}")
    print(f"\ncollapsed stacks in {out}")


if __name__ == "__main__":
    main()
