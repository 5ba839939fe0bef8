"""Keeping tokens out of logs: a SMID or manager token is a bearer credential for one person's subscription,
so logs (ours and gunicorn's access log) show only its first characters."""
import functools
import re
from urllib.parse import unquote

from gunicorn.glogging import Logger

# A run of slashes is matched only from its first one (the lookbehind): from every slash of a long run, `/+`
# would each time try the rest of it again, quadratic time on a header of many slashes that any client sends.
TOKEN_PATH_RE = re.compile(r"((?<!/)/+(?:unsubscribe|manage)/+)([A-Za-z0-9_-]{8})[A-Za-z0-9_-]+", re.IGNORECASE)
FORMAT_ATOM_RE = re.compile(r"%\((.+?)\)s")
KEEP = 8
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def redact(text):
    """Replace every token in URL paths of `text` by its first KEEP characters and an ellipsis. A path is
    routed as decoded (/%75nsubscribe/%41... is /unsubscribe/A...): one that hides a token in percent-escapes
    is logged decoded, and redacted."""
    if not text:
        return text
    if "%" in text and TOKEN_PATH_RE.search(decoded := unquote(text)):
        # decoded, a %0A would be a line of its own in the log: control characters are written escaped
        text = CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", decoded)
    return TOKEN_PATH_RE.sub(r"\1\2…", text)


class RedactingLogger(Logger):
    """gunicorn logger whose access log never holds a whole token (`logger_class` in gunicorn.conf.py)."""

    def atoms(self, resp, req, environ, request_time):
        atoms = super().atoms(resp, req, environ, request_time)
        # Every atom the access log's format names (only those: the others, every request header among them, are
        # never written): the request line and path, but also a Referer, the Location of a redirect
        # ({location}o) or the environ's RAW_URI / PATH_INFO ({raw_uri}e).
        for key in _format_atoms(self.cfg.access_log_format) & atoms.keys():
            value = atoms[key]
            lowered = value.lower() if isinstance(value, str) else ""
            if "unsubscribe" in lowered or "manage" in lowered or "%" in lowered:
                atoms[key] = redact(value)
        return atoms


@functools.lru_cache(maxsize=4)
def _format_atoms(access_log_format):
    """The atoms a format names, as gunicorn keys them: a header's or environ's name ({Referer}i) in lower case."""
    return {name.lower() if name.startswith("{") else name for name in FORMAT_ATOM_RE.findall(access_log_format)}


def _redacting(level):
    def log(self, msg, *args, **kwargs):
        getattr(Logger, level)(self, _redacted(msg, args), **kwargs)
    log.__name__ = level
    return log


# gunicorn's own lines ("Error handling request <uri>", "Invalid request from ip=...: <request line>") hold the
# path too, formatted before or after: each is redacted whole.
for _level in ("critical", "error", "warning", "info", "debug", "exception"):
    setattr(RedactingLogger, _level, _redacting(_level))


def _redacted(msg, args):
    """The log line `msg % args`, redacted (passed on without args, so logging leaves its `%` alone)."""
    return redact(str(msg) % args if args else str(msg))
