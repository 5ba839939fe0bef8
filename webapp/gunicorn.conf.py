"""gunicorn settings for this app: `gunicorn -c webapp/gunicorn.conf.py 'webapp:create_app()'`.
The access log goes through RedactingLogger so no SMID or manager token is ever logged in full."""
logger_class = "webapp.redact.RedactingLogger"
accesslog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms "%(a)s"'


def post_worker_init(worker):
    """Once a worker has loaded the app, move what it built (about 57,000 objects: the app, its routes,
    translations and libraries) out of the cyclic garbage collector's view. A full collection then walks only
    what was made since, instead of taking 20-30 ms of one request every so often."""
    import gc
    gc.collect()
    gc.freeze()
