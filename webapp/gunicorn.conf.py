"""gunicorn settings for this app: `gunicorn -c webapp/gunicorn.conf.py 'webapp:create_app()'`.
The access log goes through RedactingLogger so no SMID or manager token is ever logged in full."""
logger_class = "webapp.redact.RedactingLogger"
accesslog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms "%(a)s"'
