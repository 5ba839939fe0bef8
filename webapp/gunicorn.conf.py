"""gunicorn settings for this app: `gunicorn -c webapp/gunicorn.conf.py 'webapp:create_app()'`.
The access log goes through RedactingLogger so no SMID or manager token is ever logged in full."""
logger_class = "webapp.redact.RedactingLogger"
accesslog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms "%(a)s"'
# gunicorn >= 25 opens a control socket at ~/.gunicorn/gunicorn.ctl, one path for every gunicorn of the user:
# the last one started takes it over and the first one stopped deletes it. Nothing here uses it.
control_socket_disable = True


def on_starting(server):
    """Check the settings once in the master, before any worker is forked: a bad one ends gunicorn with one
    line naming it, instead of a traceback from every worker that tries to load the app."""
    from webapp.config import settings_or_exit
    if not settings_or_exit()["REDIS_URL"]:
        raise SystemExit("Configuration error: REDIS_URL is not set (a redis://, rediss:// or unix:// URL; "
                         "`python -m webapp run` starts a local Redis itself)")


def post_worker_init(worker):
    """Once a worker has loaded the app, move what it built (about 57,000 objects: the app, its routes,
    translations and libraries) out of the cyclic garbage collector's view. A full collection then walks only
    what was made since, instead of taking 20-30 ms of one request every so often."""
    import gc
    gc.collect()
    gc.freeze()


def _answer_refusals_plainly():
    """gunicorn answers what it refuses before the app sees it itself: a request line over its limit (414), headers
    over theirs (431), a malformed request (400). Its answer is an HTML page that quotes part of the request (a
    link's token, or markup) and has none of the security headers of our pages. Here it is plain text naming the
    status, with those headers, and nothing of the request."""
    from gunicorn import util

    def write_error(sock, status_int, reason, mesg):  # gunicorn.util.write_error's signature; `mesg` quotes
        # Imported here, in a worker that has loaded the app: the master imports no app module (a gevent worker
        # must patch the standard library before Flask and redis-py are imported).
        from webapp.pages import NOSNIFF, PAGE_SECURITY_HEADERS
        headers = "".join(f"{name}: {value}\r\n" for name, value in (
            ("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store"), *PAGE_SECURITY_HEADERS,
            NOSNIFF))
        body = f"{status_int} {reason}\n"
        util.write_nonblock(sock, (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n{headers}"
                                   f"Content-Length: {len(body)}\r\n\r\n{body}").encode("latin-1"))

    util.write_error = write_error  # the workers call it as util.write_error


_answer_refusals_plainly()
