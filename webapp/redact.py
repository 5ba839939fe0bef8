"""Keeping tokens out of logs: a SMID or manager token is a bearer credential for one person's subscription,
so logs (ours and gunicorn's access log) show only its first characters."""
import re
from urllib.parse import unquote

from gunicorn.glogging import Logger

TOKEN_PATH_RE = re.compile(r"(/+(?:unsubscribe|manage)/+)([A-Za-z0-9_-]{8})[A-Za-z0-9_-]+")
KEEP = 8


def redact(text):
    """Replace every token in URL paths of `text` by its first KEEP characters and an ellipsis. A path is
    routed as decoded (/%75nsubscribe/%41... is /unsubscribe/A...): one that hides a token in percent-escapes
    is logged decoded, and redacted."""
    if not text:
        return text
    if "%" in text and TOKEN_PATH_RE.search(decoded := unquote(text)):
        text = decoded
    return TOKEN_PATH_RE.sub(r"\1\2…", text)


class RedactingLogger(Logger):
    """gunicorn logger whose access log never holds a whole token (`logger_class` in gunicorn.conf.py)."""

    def atoms(self, resp, req, environ, request_time):
        atoms = super().atoms(resp, req, environ, request_time)
        for key in ("r", "U", "q", "f"):
            if key in atoms:
                atoms[key] = redact(atoms[key])
        for key in list(atoms):
            if key.startswith("{") and key.lower() in ("{referer}i", "{referrer}i"):
                atoms[key] = redact(atoms[key])
        return atoms

    def error(self, msg, *args, **kwargs):  # gunicorn's "Error handling request <uri>" and its kin
        super().error(msg, *_redacted(args), **kwargs)

    def exception(self, msg, *args, **kwargs):
        super().exception(msg, *_redacted(args), **kwargs)


def _redacted(args):
    return [redact(a) if isinstance(a, str) else a for a in args]
