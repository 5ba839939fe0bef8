"""No log holds a whole token: gunicorn's access and error logs and the app's, under a real gunicorn, for the
spellings of a token path a client can send (percent-escapes, doubled slashes) and for requests that fail."""
import http.client
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import API_TOKEN, ROOT, SIGNING_KEYS, email_resource
from webapp.redact import redact

SMID = "AQJ0MQEBawUTe31rGjgEcC00MgRuZXdzSrr1PokfUf84Ea8YYXY91w"


@pytest.mark.parametrize("path", [f"/%75nsubscribe/%41{SMID[1:]}", f"/unsubscribe//{SMID}",
                                  f"//manage/{SMID}/", f"/unsubscribe/{SMID[:10]}%2D{SMID[10:]}",
                                  f"/Unsubscribe/{SMID}", f"/%4Danage/{SMID}"])
def test_redact_sees_a_token_however_its_path_is_spelled(path):
    out = redact(f'"GET {path} HTTP/1.1" 404')
    assert SMID[12:30] not in out and "…" in out


@pytest.mark.parametrize("text", ["/" * 40_000 + "manage", "%2F" + "/" * 40_000 + "unsubscribe/x"])
def test_redact_takes_linear_time_on_a_run_of_slashes(text):
    """Any client can send a header like this: quadratic matching took 0.3 s per 8,000 slashes (8 s here)."""
    started = time.process_time()
    redact(text)
    assert time.process_time() - started < 0.5


def test_a_decoded_path_cannot_add_a_line_to_the_log():
    out = redact(f'"GET /unsubscribe/{SMID}?x=%0A10.0.0.9%20%22GET%20/admin%22 HTTP/1.1" 200')
    assert "\n" not in out and "\\x0a" in out and SMID[12:30] not in out


@pytest.mark.parametrize("value,base,one_click", [
    ("HTTPS://Unsub.Example/", "https://unsub.example", True), ("Https://u.example/Base/", "https://u.example/Base", True),
    ("http://LOCALHOST:8000", "http://localhost:8000", True), ("http://unsub.example", "http://unsub.example", False),
    ("https://unsub.example/#", None, None), ("https://unsub.example/?", None, None)])
def test_public_base_url_is_normalised_or_refused(value, base, one_click):
    from webapp.config import ConfigError, one_click_capable, public_base_url
    if base is None:
        with pytest.raises(ConfigError, match="query or fragment"):
            public_base_url(value)
    else:
        assert public_base_url(value) == base and one_click_capable(base) == one_click


def fetch(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def post_too_large(port, path):
    """A form POST announcing 5 MB (over MAX_CONTENT_LENGTH), of which the server reads none: (status, headers)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded"
                     f"\r\nContent-Length: {5 * 1024 * 1024}\r\n\r\nlang=ru&x=aaaa".encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
    head = answer.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
    return int(head[0].split()[1]), {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in head[1:])}


def api(port, path, **body):
    import json
    status, _headers, raw = fetch(port, "POST", f"/api/v1.1/{path}", json.dumps({"token": API_TOKEN, **body}),
                                  {"Content-Type": "application/json"})
    data = json.loads(raw)
    assert status == 200 and data["error"] == 0, data
    return data["data"]


@pytest.fixture
def served(redis_url, tmp_path):
    from test_faults import free_port
    port = free_port()
    logs = {name: tmp_path / f"{name}.log" for name in ("access", "error")}
    env = {**os.environ, "REDIS_URL": redis_url, "API_TOKEN": API_TOKEN, "SIGNING_KEYS": SIGNING_KEYS,
           "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}", "VAR_DIR": str(tmp_path), "PYTHONPATH": ROOT}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", os.path.join(ROOT, "webapp", "gunicorn.conf.py"),
         "-b", f"127.0.0.1:{port}", "-w", "1", "--access-logfile", str(logs["access"]),
         # the default's atoms and those that also hold the path: the environ's RAW_URI, a redirect's Location,
         # a Referer, named in any case as gunicorn allows
         "--access-logformat", '%(h)s "%(r)s" %(s)s %(U)s %({RAW_URI}e)s %({Location}o)s %({Referer}i)s "%(f)s"',
         "--error-logfile", str(logs["error"]), "webapp:create_app()"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 20
        while True:
            try:
                if fetch(port, "GET", "/static/pages.css")[0] == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "gunicorn did not start"
            time.sleep(0.1)
        yield port, logs
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_no_log_holds_a_whole_token(served):
    port, logs = served
    res = api(port, "resources/add", **email_resource(unsubscribe={"mode": "confirm"}))
    ident = {"db_id": 1, "profile_id": "p-42", "resource_id": res["id"], "channel": "email",
             "email": "ann@example.com"}
    api(port, "subscriptions/set", **ident)
    links = api(port, "messages/links", **ident)
    smid, manage = links["smid"], links["manage_url"].rsplit("/manage/", 1)[1].strip("/")
    escaped = "".join(f"%{ord(c):02X}" for c in smid[:4]) + smid[4:]
    assert fetch(port, "GET", f"/%75nsubscribe/{escaped}")[0] == 200       # routed as /unsubscribe/<smid>
    assert fetch(port, "GET", f"/manage/{manage}/", headers={"Referer": f"https://mail.example/unsubscribe/{smid}"})[0] == 200
    status, headers, _ = fetch(port, "GET", f"/unsubscribe//{smid}", headers={"Host": "evil.example"})
    assert status == 200 and "Location" not in headers                      # served, no redirect built from Host
    assert fetch(port, "POST", "/api/v1.1//resources/list", "{}", {"Content-Type": "application/json",
                                                                   "Authorization": f"Bearer {API_TOKEN}"})[0] == 200
    for path in (f"/unsubscribe/{smid}", f"/manage/{manage}/"):
        status, headers = post_too_large(port, path)
        assert status == 413 and "script-src" in headers["content-security-policy"]   # our page, not a 500
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # gunicorn's "Invalid request" warning
        sock.sendall(f"GET /unsubscribe/{smid}\x01 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 400")
    time.sleep(0.3)
    text = logs["access"].read_text() + logs["error"].read_text()
    assert "Invalid request" in text
    assert "/unsubscribe/" in text and "413" in text
    for token in (smid, manage):
        assert token[10:40] not in text, text[-2000:]


def raw_answer(port, request):
    """Send `request` (bytes) as it is and read the whole answer: (status, headers with lower-case names, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    return int(lines[0].split()[1]), {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}, body


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /unsubscribe/" + b"A" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),     # over limit_request_line
    (b"GET /unsubscribe/AQRkZXYx HTTP/1.1\r\nHost: x\r\nX-Big: " + b"B" * 9000 + b"\r\n\r\n", 431),
    (b"GET /unsubscribe/AQRkZXYx<script> HTTP/9.9\r\nHost: x\r\n\r\n", 400),          # a request line it refuses
])
def test_what_gunicorn_refuses_is_answered_plainly_with_the_pages_security_headers(served, request_bytes, status):
    """gunicorn answers a request it cannot take (before the app sees it) itself. Its answer carries the security
    headers every page has, is plain text, and repeats nothing of the request (gunicorn's own is an HTML page
    quoting part of it: a link's token, or markup)."""
    from webapp.pages import NOSNIFF, PAGE_SECURITY_HEADERS
    port, _logs = served
    got, headers, body = raw_answer(port, request_bytes)
    assert got == status
    for name, value in (*PAGE_SECURITY_HEADERS, NOSNIFF, ("Cache-Control", "no-store"),
                        ("Content-Type", "text/plain; charset=utf-8")):
        assert headers[name.lower()] == value, (name, headers)
    assert int(headers["content-length"]) == len(body) and body.startswith(str(status).encode())
    assert b"AQRkZXYx" not in body and b"AAAA" not in body and b"<" not in body
