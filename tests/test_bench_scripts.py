"""The benchmark scripts run from a clean checkout with their one documented command and print their figures.

Short runs (seconds, a few dozen subscriptions): this checks that every script works end to end against real
processes (redis-server, gunicorn, wrk, workers) and prints what the README quotes, not how fast anything is;
the figures themselves come from full runs (README, Performance). bench/profile.py is left out: it needs
py-spy and ptrace rights.
"""
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.bench


def run_bench(*args, timeout=240):
    if shutil.which("wrk") is None and args[0] in ("oneclick.py", "page.py"):
        pytest.fail("wrk is not installed: apt-get install wrk")
    result = subprocess.run([sys.executable, f"bench/{args[0]}", *args[1:]], cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def number(pattern, text):
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text}"
    return float(match.group(1).replace(",", ""))


LOAD = ("--seconds", "2", "--rounds", "1", "--subscriptions", "30")


def test_oneclick_bench():
    out = run_bench("oneclick.py", *LOAD, "--floor")
    assert re.search(r"first unsubscribes:\nmax rate, median round \(req/s\)\s+[1-9][\d,]*\s+[1-9]", out), out
    assert re.search(r"replays:\nmax rate, median round \(req/s\)\s+[1-9][\d,]*\s+[1-9]", out), out
    for kind in ("first unsubscribes", "replays"):
        assert number(rf"ratio service/baseline, {kind} \(median of the per-round ratios\): ([\d.]+)", out) > 0
    # Each of the 30 links was unsubscribed once: 18 in the first-unsubscribe round, 9 at half load, and the
    # replay round changed nothing (one more link is the warm-up's, two are left over).
    assert re.search(r"first-unsubscribe rounds 18 of [\d,]+; replay rounds 0; half load 9 of", out), out
    assert number(r"floor: bare Flask endpoint making two redis-py calls \(a first unsubscribe's round trips\): "
                  r"([\d,]+) req/s", out) > 0
    assert number(r"floor: bare Flask endpoint making one redis-py call \(a replay's round trip\): ([\d,]+) req/s",
                  out) > 0
    assert number(r"floor: bare WSGI layer in front of Flask making two calls on webapp/direct.py \(the one-click's "
                  r"own architecture\): ([\d,]+) req/s", out) > 0
    assert number(r"floor: bare WSGI layer in front of Flask making one call on webapp/direct.py: ([\d,]+) req/s",
                  out) > 0
    assert re.search(r"goal ratio >= 0\.80: first unsubscribes (MET|NOT MET), replays (MET|NOT MET);"
                     r"\s+goal p99 at half load < 10 ms: [\d.]+ ms", out)
    assert "socket errors / non-2xx            0/0         0/0" in out


def test_versions_bench():
    """Two versions (a git revision checked out into a worktree, and the working tree) run alternately; each
    prints its rate and CPU per request, and the worktree is removed afterwards."""
    out = run_bench("versions.py", "HEAD", ".", "--rounds", "1", "--seconds", "2",
                    "--subscriptions", "600", "--workers", "1")
    for rev in ("HEAD", "."):
        assert number(rf"\n  {re.escape(rev)}\s+([\d,]+) req/s", out) > 0
        # 100 fresh links for a second of one-clicks: the rest were replays, which the figures must say
        line = re.search(rf"\n  {re.escape(rev)}\s.*", out).group(0)
        assert 0 < number(r"; ([\d,]+) of [\d,]+ requests unsubscribed", line) <= 100, line
        assert "(links ran out: raise --subscriptions)" in line, line
    assert re.search(r"server CPU per request, \. against HEAD: [+-]\d+\.\d%", out), out
    worktrees = subprocess.run(["git", "-C", ROOT, "worktree", "list"], capture_output=True, text=True).stdout
    assert "us-versions-" not in worktrees


def test_versions_bench_of_the_page():
    out = run_bench("versions.py", "HEAD", ".", "--page", "--rounds", "1", "--seconds", "2",
                    "--subscriptions", "200", "--workers", "1")
    for rev in ("HEAD", "."):
        line = re.search(rf"\n  {re.escape(rev)}\s.*", out).group(0)
        assert number(r"([\d,]+) req/s", line) > 0 and number(r"; ([\d.]+) of the one-line template render", line) > 0
    assert number(r"\n  baseline\s+([\d,]+) req/s", out) > 0
    worktrees = subprocess.run(["git", "-C", ROOT, "worktree", "list"], capture_output=True, text=True).stdout
    assert "us-versions-" not in worktrees


def test_page_bench():
    out = run_bench("page.py", *LOAD, "--no-render")
    assert number(r"ratio service/baseline \(median of the per-round ratios\): ([\d.]+)", out) > 0
    assert number(r"replaced by a constant string \(bench/no_render_app.py\): ([\d,]+) req/s", out) > 0
    assert number(r"rendered bare \(GET /page_same_template, ([\d,]+) bytes\)", out) > 1000
    assert re.search(r"service/that: [\d.]+ \(median of the per-round ratios; goal >= 0\.70 against this "
                     r"baseline: (MET|NOT MET)\)", out)
    assert re.search(r"goal ratio >= 0\.70: (MET|NOT MET)", out)


def test_memory_bench():
    out = run_bench("memory.py", "--subscriptions", "3000", "--sample", "20")
    assert number(r"bytes per subscription, without ledger\s+([\d,]+)", out) > 0
    assert out.count("sample read back through the API: 20 subscriptions, all equal, ledger chains verified") == 2


def test_links_bench():
    out = run_bench("links.py", "--seconds", "1")
    assert number(r"links per server CPU-second\s+([\d,]+)", out) > 0


def test_timers_bench():
    out = run_bench("timers.py", "--timers", "200", "--lead", "3", "--spread", "2")
    assert number(r"lateness \(event committed - deadline\): p50 (-?\d+) ms", out) >= 0
    assert number(r"Redis memory per pending timer: (\d+) bytes", out) > 0
