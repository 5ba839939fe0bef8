"""Bare Flask endpoints used as same-run baselines by the benchmarks (no Redis, no signing), and one floor
(/one_redis_call: one redis-py round trip and nothing else)."""
import os

import redis
from flask import Flask, jsonify, render_template, render_template_string, request
from jinja2 import DictLoader

app = Flask(__name__)
PAGE = "<!doctype html><html><body><main><h1>{{ title }}</h1><p>{{ text }}</p></main></body></html>"
# A template loaded once and cached by Jinja, as an app's templates/ files are (render_template_string compiles
# its source again on every call, which made the old /page several times slower than a real render).
app.jinja_loader = DictLoader({"page.html": PAGE})


@app.post("/echo_links")
def echo_links():
    """Parse a links_bulk-sized JSON body and answer a list of the same length: the HTTP+JSON cost alone."""
    messages = request.get_json()["messages"]
    return jsonify({"error": 0, "error_text": "Successful operation",
                    "data": [{"smid": "x" * 90, "unsubscribe_url": "https://unsub.example/unsubscribe/" + "x" * 90}
                             for _ in messages]})


@app.post("/nothing")
def nothing():
    return "", 204


@app.get("/page")
def page():
    return render_template("page.html", title="Unsubscribe", text="A bare template render.")


@app.get("/page_compiled_per_request")
def page_compiled_per_request():
    """The first /page: render_template_string, which compiles the template on every request."""
    return render_template_string(PAGE, title="Unsubscribe", text="A bare template render.")


_redis = None


@app.post("/one_redis_call")
def one_redis_call():
    """The floor of any handler that makes one Redis call: one EVALSHA-sized round trip through redis-py (the
    client the service uses, same options as webapp.store.connect) on REDIS_URL, then 204."""
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(os.environ["REDIS_URL"], decode_responses=True, health_check_interval=30)
    _redis.get("bench:floor")
    return "", 204
