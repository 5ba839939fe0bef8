"""Links issued per second per core through POST /api/v1.1/messages/links_bulk.

Runs one gunicorn sync worker (one core) against a real redis-server, posts batches of 1000 messages for
--seconds, and prints links/s, links per server CPU-second, and the same figures for a bare Flask endpoint
that only parses and answers JSON of the same size (the HTTP+JSON floor), measured in the same run.

    .venv/bin/python bench/links.py [--seconds 10]
"""
import argparse
import http.client
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import BENCH_TOKEN, Services, post_json, tree_cpu_seconds  # noqa: E402

BATCH = 1000
PROFILES = 200


def drive(base, path, body, seconds):
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    post_json(conn, path, body)  # warm up
    links, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        links += len(post_json(conn, path, body)["data"])
    return links, time.perf_counter() - started


def measure(services, base, proc, path, body, seconds):
    cpu0 = tree_cpu_seconds(proc.pid)
    links, elapsed = drive(base, path, body, seconds)
    cpu = tree_cpu_seconds(proc.pid) - cpu0
    return links / elapsed, links / cpu if cpu else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    with Services() as services:
        base, proc = services.gunicorn("webapp:create_app()", workers=1)
        host, port = base.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        auth = {"token": BENCH_TOKEN}
        res = post_json(conn, "/api/v1.1/resources/add", {
            **auth, "name": "Bench", "channels": ["email"], "categories": [{"title": "News", "api_name": "news"}],
            "channel_settings": {"email": {"from_email": "news@shop.example", "list_id": "bench.shop.example"}}})
        rid = res["data"]["id"]
        for i in range(PROFILES):
            post_json(conn, "/api/v1.1/subscriptions/set", {**auth, "db_id": 1, "profile_id": f"p{i}",
                                                            "resource_id": rid, "channel": "email",
                                                            "email": f"user{i}@example.com"})
        messages = [{"resource_id": rid, "db_id": 1, "profile_id": f"p{i % PROFILES}", "channel": "email",
                     "email": f"user{i % PROFILES}@example.com", "category": "news"} for i in range(BATCH)]
        body = {**auth, "messages": messages}
        rate, per_cpu = measure(services, base, proc, "/api/v1.1/messages/links_bulk", body, args.seconds)
        bare_base, bare_proc = services.gunicorn("bench.baseline_app:app", workers=1)
        bare_rate, bare_per_cpu = measure(services, bare_base, bare_proc, "/echo_links", body, args.seconds)
    print(f"links_bulk (1 gunicorn worker, batches of {BATCH}, {args.seconds:.0f}s):")
    print(f"  links/s wall                 {rate:12,.0f}")
    print(f"  links per server CPU-second  {per_cpu:12,.0f}   <- links/s/core")
    print(f"baseline: bare Flask parsing the same JSON and answering {BATCH} items:")
    print(f"  items/s wall                 {bare_rate:12,.0f}")
    print(f"  items per server CPU-second  {bare_per_cpu:12,.0f}")
    print(f"ratio links_bulk / baseline (wall)  {rate / bare_rate:.2f}")


if __name__ == "__main__":
    main()
