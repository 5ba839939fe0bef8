"""Bare Flask endpoints used as same-run baselines by the benchmarks (no Redis, no signing), and floors: the
cost of Redis round trips alone, through Flask and redis-py (/one_redis_call, /two_redis_calls) and through what
the service's one-click uses, a WSGI layer in front of Flask and webapp/direct.py (/one_direct_call,
/two_direct_calls)."""
import os

import redis
from flask import Flask, jsonify, render_template, render_template_string, request
from jinja2 import ChoiceLoader, DictLoader, FileSystemLoader

from webapp import direct
from webapp.pages import static_url

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
app = Flask(__name__, static_folder=os.path.join(ROOT, "static"))
PAGE = "<!doctype html><html><body><main><h1>{{ title }}</h1><p>{{ text }}</p></main></body></html>"
# A template loaded once and cached by Jinja, as an app's templates/ files are (render_template_string compiles
# its source again on every call, which made the old /page several times slower than a real render).
# /page_same_template renders the service's own confirm page template (templates/), English, from fixed values.
app.jinja_loader = ChoiceLoader([DictLoader({"page.html": PAGE}), FileSystemLoader(os.path.join(ROOT, "templates"))])
app.jinja_env.add_extension("jinja2.ext.i18n")
app.jinja_env.install_null_translations(newstyle=True)
app.add_template_global(static_url)  # the service's helper that the templates use, as the service has it
CONFIRM_VIEW = {
    "smid": "A" * 62, "mode": "confirm", "address": "a•••e@example.com", "channel": "email", "status": "subscribed",
    "state": "active", "whole": False, "stopped": [], "continuing": ["News", "Offers", "Receipts"],
    "resource": {"name": "Weekly news"},
    "choosable": [{"api_name": "news", "title": "News", "checked": True},
                  {"api_name": "offers", "title": "Offers", "checked": False}],
    "required": [{"api_name": "receipts", "title": "Receipts"}],
    "scope": {"whole": False, "stops": ["News"], "continues": ["Offers", "Receipts"]},
    "message_category": "News", "pending": None, "seconds_left": None, "timer_minutes": 10, "blocked_text": None,
    "manage_url": "http://127.0.0.1/manage/" + "B" * 40, "done": None, "action_url": "/unsubscribe/" + "A" * 62,
    "locales": ("en", "ru"), "current_locale": lambda: "en", "language_names": {"en": "English", "ru": "Русский"},
    "language_href": lambda code: f"?lang={code}",
    "form_token": "b1." + "C" * 43,
}


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


@app.get("/page_same_template")
def page_same_template():
    """The service's confirm page template rendered from fixed values: no Redis, tokens or language choice."""
    return render_template("unsubscribe/confirm.html", **CONFIRM_VIEW)


@app.get("/page_compiled_per_request")
def page_compiled_per_request():
    """The first /page: render_template_string, which compiles the template on every request."""
    return render_template_string(PAGE, title="Unsubscribe", text="A bare template render.")


_redis = None


def _floor_client():
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(os.environ["REDIS_URL"], decode_responses=True, health_check_interval=30)
    return _redis


@app.post("/one_redis_call")
def one_redis_call():
    """The floor of any handler that makes one Redis call: one EVALSHA-sized round trip through redis-py (the
    client the service uses, same options as webapp.store.connect) on REDIS_URL, then 204."""
    _floor_client().get("bench:floor")
    return "", 204


@app.post("/two_redis_calls")
def two_redis_calls():
    """The floor of a handler that reads, then writes what it decided: two round trips, then 204."""
    client = _floor_client()
    client.get("bench:floor")
    client.get("bench:floor")
    return "", 204


class DirectFloors:
    """POST /one_direct_call and /two_direct_calls answered in front of Flask, as webapp/front.py answers
    the one-click: the body read, one or two round trips of one GET on the hot paths' transport (webapp/direct.py),
    then 204; every other request goes to Flask. The floor of the one-click's architecture: what a first
    unsubscribe (two round trips) or a replay (one) would reach if it did nothing else."""
    CALLS = {"/one_direct_call": 1, "/two_direct_calls": 2}
    READ = direct.pack("GET", "bench:floor")

    def __init__(self, flask_wsgi):
        self.flask_wsgi = flask_wsgi

    def __call__(self, environ, start_response):
        calls = self.CALLS.get(environ.get("PATH_INFO")) if environ.get("REQUEST_METHOD") == "POST" else None
        if calls is None:
            return self.flask_wsgi(environ, start_response)
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        for _ in range(calls):
            direct.call(_floor_client(), self.READ, 1)
        start_response("204 No Content", [])
        return []


app.wsgi_app = DirectFloors(app.wsgi_app)
