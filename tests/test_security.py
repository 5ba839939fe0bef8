"""Security properties across surfaces: CSRF on every form, no open redirect, headers, constant-time token
checks, tokens kept out of logs."""
import logging
import re

import pytest
from itsdangerous import BadSignature

from conftest import API_TOKEN, form_token
from webapp import tokens
from webapp.redact import redact


def test_every_post_form_carries_a_csrf_token(client, pages):
    forms = 0
    for name, path in pages.items():
        html = client.get(path).get_data(as_text=True)
        for form in re.findall(r"<form[^>]*method=\"post\".*?</form>", html, re.S):
            forms += 1
            assert 'name="csrf_token"' in form, name
    assert forms >= 6


def test_security_headers_on_every_page(client, pages):
    for name, path in list(pages.items()) + [("static", "/static/pages.css")]:
        resp = client.get(path)
        resp.close()
        assert resp.headers["X-Content-Type-Options"] == "nosniff", name
        if name == "static":
            continue
        for header in ("X-Content-Type-Options", "Content-Security-Policy", "Referrer-Policy", "X-Frame-Options"):
            assert len(resp.headers.getlist(header)) == 1, (name, header)
        csp = resp.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp, name
        assert resp.headers["Referrer-Policy"] == "no-referrer", name
        html = resp.get_data(as_text=True)
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), name       # no inline script
        assert not re.search(r"\son[a-z]+=", html), name                           # no inline handlers


def test_security_headers_keep_what_a_view_set(app):
    """The after-request hook adds the headers a view did not set, and leaves a view's own value alone."""
    @app.get("/test-own-frame-policy")
    def own_frame_policy():
        return "framed", {"X-Frame-Options": "SAMEORIGIN", "x-content-type-options": "nosniff"}

    resp = app.test_client().get("/test-own-frame-policy")
    assert resp.headers.getlist("X-Frame-Options") == ["SAMEORIGIN"]
    assert resp.headers.getlist("X-Content-Type-Options") == ["nosniff"]
    assert resp.headers["Referrer-Policy"] == "no-referrer"


def test_no_open_redirect(client, pages):
    path = pages["unsubscribe-instant"]
    html = client.get(path).get_data(as_text=True)
    token = form_token(html)
    for lang in ("https://evil.example", "//evil.example", "ru"):
        resp = client.post(path + "?next=https://evil.example", data={"action": "unsubscribe", "csrf_token": token,
                                                                      "lang": lang})
        location = resp.headers.get("Location", "")
        assert resp.status_code == 303 and location.startswith("/unsubscribe/"), location
        assert "evil" not in location
    for name, page in pages.items():
        resp = client.get(page + "?next=https://evil.example&url=//evil.example")
        assert "evil" not in resp.headers.get("Location", ""), name


def test_api_token_is_compared_in_constant_time(api, monkeypatch):
    calls = []
    real = tokens.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(tokens.hmac, "compare_digest", spy)
    api.fail("resources/list", 401, token="wrong-token")
    assert (b"wrong-token", API_TOKEN.encode()) in calls
    calls.clear()
    api.ok("resources/list")
    assert (API_TOKEN.encode(), API_TOKEN.encode()) in calls


def test_redact_keeps_only_a_prefix():
    smid = "AQJ0MQEBawUTe31rGjgEcC00MgRuZXdzSrr1PokfUf84Ea8YYXY91w"
    line = f'127.0.0.1 "POST /unsubscribe/{smid} HTTP/1.1" 200 and /manage/{smid}/?lang=ru'
    out = redact(line)
    assert smid not in out and f"/unsubscribe/{smid[:8]}…" in out and f"/manage/{smid[:8]}…/?lang=ru" in out


def test_app_log_on_a_storage_outage_redacts_the_token(app, pages, caplog):
    path = pages["unsubscribe-confirm"]
    app.config["REDIS_URL"] = "unix:///nonexistent/redis.sock"
    app.extensions.pop("redis", None)
    with caplog.at_level(logging.ERROR, logger="webapp"):
        resp = app.test_client().post(path, data={"List-Unsubscribe": "One-Click"})
    assert resp.status_code == 503
    smid = path.rsplit("/", 1)[1]
    assert caplog.records and all(smid not in rec.getMessage() for rec in caplog.records)
    assert any(smid[:8] in rec.getMessage() for rec in caplog.records)


def test_session_signing_serializer_is_built_once_per_key(app):
    sessions = app.session_interface
    first = sessions.get_signing_serializer(app)
    assert sessions.get_signing_serializer(app) is first
    cookie = first.dumps({"csrf_token": "x"})
    app.config["SECRET_KEY_FALLBACKS"] = [app.secret_key]
    app.secret_key = "rotated"
    rotated = sessions.get_signing_serializer(app)
    assert rotated is not first and rotated.loads(cookie) == {"csrf_token": "x"}  # old cookies still open
    with pytest.raises(BadSignature):
        first.loads(rotated.dumps({"a": 1}))                                         # new ones use the new key
