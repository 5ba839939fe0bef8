"""A real HTTP receiver for webhook tests: records every request; answers from a script of behaviours."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    """`behaviours` is a list consumed per request: an int status, ("sleep", seconds, status),
    ("redirect", status, location), or ("trickle", seconds, status): the status line at once, then one header
    line every 0.25 s for `seconds` (each socket read gets something), then the end of the answer; or
    ("slow_body", seconds, status): status and headers at once, the 2-byte body after `seconds`. When it runs
    out, every request gets 200. GETs are recorded too."""

    def __init__(self):
        self.requests = []
        self.behaviours = []
        self.lock = threading.Lock()
        self.in_flight = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    behaviour = receiver.behaviours.pop(0) if receiver.behaviours else 200
                    receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                              "at": time.time(), "answered": behaviour})
                status, extra = behaviour, {}
                if isinstance(behaviour, tuple) and behaviour[0] in ("trickle", "slow_body"):
                    receiver.in_flight.set()
                    kind, seconds, status = behaviour
                    if kind == "trickle":  # a header line every 0.25 s: each socket read gets something
                        parts = [b"HTTP/1.1 %d OK\r\n" % status,
                                 *(b"X-Trickle: %d\r\n" % i for i in range(int(seconds / 0.25))),
                                 b"Content-Length: 0\r\n\r\n"]
                        pause = 0.25
                    else:  # the whole status and headers at once, the body after `seconds`
                        parts, pause = [b"HTTP/1.1 %d OK\r\nContent-Length: 2\r\n\r\n" % status, b"ok"], seconds
                    try:
                        for i, part in enumerate(parts):
                            if i:
                                time.sleep(pause)
                            self.wfile.write(part)
                            self.wfile.flush()
                    except OSError:
                        pass  # the caller gave up
                    self.close_connection = True
                    return
                if isinstance(behaviour, tuple) and behaviour[0] == "redirect":
                    _, status, location = behaviour
                    extra = {"Location": location}
                elif isinstance(behaviour, tuple):
                    receiver.in_flight.set()
                    _, seconds, status = behaviour
                    time.sleep(seconds)
                try:
                    self.send_response(status)
                    for name, value in extra.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:
                    pass  # the caller gave up (timeout) or died

            do_GET = do_POST  # a GET has no body: Content-Length is absent, so nothing is read

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def bodies(self):
        return [json.loads(r["body"]) for r in self.requests]

    def wait_for(self, count, timeout=15.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if len(self.requests) >= count:
                return self.requests
            time.sleep(0.05)
        raise AssertionError(f"expected {count} requests, got {len(self.requests)}")

    def close(self):
        self.server.shutdown()
        self.server.server_close()
