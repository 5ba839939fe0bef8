"""Where the gunicorn workers spend their time on the hot paths: py-spy samples under wrk load.

Starts a redis-server and the service under gunicorn (--workers sync workers, as bench/oneclick.py and
bench/page.py do), creates --subscriptions subscriptions and links through the API, drives the chosen path
with wrk for --seconds and samples every worker with py-spy (`.venv/bin/pip install py-spy`; needs ptrace,
e.g. root). Prints the functions with the most samples of running threads (a thread waiting for a CPU counts,
one blocked in a read does not), inclusive and self, and writes the collapsed stacks (for flamegraph tools or
speedscope) to --out.

    .venv/bin/python bench/profile.py oneclick [--seconds 10]
    .venv/bin/python bench/profile.py page [--seconds 10]
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Services, default_web_workers, make_subscriptions, run_wrk, write_wrk_script  # noqa: E402

PATHS = {
    "oneclick": ("instant", "POST", "List-Unsubscribe=One-Click",
                 {"Content-Type": "application/x-www-form-urlencoded"}),
    "page": ("confirm", "GET", None, {}),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", choices=sorted(PATHS))
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--subscriptions", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=default_web_workers())
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
        py_spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
        subprocess.run([py_spy, "record", "--pid", str(proc.pid), "--subprocesses",
                        "--duration", str(int(args.seconds)), "--rate", "200", "--format", "raw", "--output", out],
                       check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=args.seconds + 60)
        load.join()
    inclusive, own, total = collections.Counter(), collections.Counter(), 0
    with open(out) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            count = int(count)
            # Functions without line numbers, so that one function's lines add up.
            frames = [re.sub(r":\d+\)$", ")", fr) for fr in stack.split(";") if not fr.startswith("process ")]
            if not frames:
                continue
            total += count
            for fr in set(frames):
                inclusive[fr] += count
            own[frames[-1]] += count
    print(f"{args.path}: {total} samples of the workers' running (not idle) threads over {args.seconds:.0f}s\n")
    print(f"top {args.top} functions by inclusive samples (% of all), below the request handler:")
    shown = 0
    for fr, c in inclusive.most_common():
        if 100 * c / total > 90:  # gunicorn's and runpy's frames around every request
            continue
        print(f"{100 * c / total:6.1f}%  {fr}")
        shown += 1
        if shown == args.top:
            break
    print(f"\ntop {args.top // 2} by self samples:")
    for fr, c in own.most_common(args.top // 2):
        print(f"{100 * c / total:6.1f}%  {fr}")
    print(f"\ncollapsed stacks in {out}")


if __name__ == "__main__":
    main()
