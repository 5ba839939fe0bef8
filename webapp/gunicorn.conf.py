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
