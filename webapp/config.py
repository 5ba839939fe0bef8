"""Settings: environment variables (and an optional `.env` file) turned into Flask config.

Every setting the service reads is listed in DEFAULTS with its unit. With nothing set, a development
install works out of the box: secrets it needs are generated once, kept in `var/dev-secrets.json`
(so links already sent keep working across restarts) and printed when generated.
"""
import json
import os
import re
import secrets
import sys
from pathlib import Path
from urllib.parse import urlsplit

from .errors import InvalidInput
from .validation import ascii_uri

DEFAULTS = {
    "REDIS_URL": None,  # None: `python -m webapp run` starts a local redis-server
    # Seconds the web app waits to connect to Redis or for an answer; then 503 (not a worker hung until
    # gunicorn kills it). redis-py 8 defaults to 5, redis-py 5 to waiting for ever.
    "REDIS_TIMEOUT_SECONDS": 5,
    "PORT": 8000,
    "PUBLIC_BASE_URL": None,  # None: http://127.0.0.1:$PORT (development only; RFC 8058 wants https)
    "API_TOKEN": None,
    "SIGNING_KEYS": None,  # "kid:secret,kid2:secret2", newest last
    # Keys that verify links but sign none: a new key, listed on every instance before it is made the newest.
    "SIGNING_KEYS_VERIFY_ONLY": None,
    "DEFAULT_LOCALE": "en",
    "TRUSTED_PROXIES": 0,  # number of proxies whose X-Forwarded-* headers are believed
    # Length of one "minute" of delayed-unsubscribe timers, at most 60: tests shorten it, nothing lengthens a
    # timer past Altcraft's 30 minutes.
    "TIME_UNIT_SECONDS": 60,
    "SUSPEND_DAY_SECONDS": 86400,  # length of one "day" of a suspension chosen in the manager; tests shorten it
    "VAR_DIR": "var",  # local redis data and generated development secrets
    "RQ_QUEUE": "unsubscribe",
    "WEB_WORKERS": None,  # None: default_web_workers(); gunicorn workers `python -m webapp run` starts
    # SDK endpoint POSTs (Flask-Limiter notation, e.g. "120 per minute" or "10/second;1000/hour"):
    "SDK_RATE_LIMIT_PER_IP": "120 per minute",
    "SDK_RATE_LIMIT_PER_SMID": "20 per minute",
    # Form POSTs of the unsubscribe pages and the manager (every one a ledger event, a timeline entry and a
    # webhook POST when it changes something), per link and per client address; never the RFC 8058 one-click:
    "PAGE_RATE_LIMIT_PER_LINK": "30 per minute",
    "PAGE_RATE_LIMIT_PER_IP": "120 per minute",
    # Bytes of a request body the pages, the manager and the SDK endpoint read: their forms and JSON are a few
    # hundred bytes (a manager form with long custom fields a few kilobytes). The API keeps MAX_BODY_BYTES.
    "PAGE_BODY_LIMIT_BYTES": 65536,
    "WEBHOOK_TIMEOUT_SECONDS": 5,  # seconds a webhook or call-URL target has to answer one POST, in all
    # Seconds between a web process's looks at whether housekeeping has work and nobody does it (then it
    # starts the chain of housekeeping ticks again: delayed.HousekeepingRearm); 0: never.
    "HOUSEKEEPING_REARM_SECONDS": 5,
}
RATE_LIMIT_SETTINGS = ("SDK_RATE_LIMIT_PER_IP", "SDK_RATE_LIMIT_PER_SMID", "PAGE_RATE_LIMIT_PER_LINK",
                       "PAGE_RATE_LIMIT_PER_IP")
MAX_BODY_BYTES = 4 * 1024 * 1024  # the largest request body of any kind (the API's bulk calls): MAX_CONTENT_LENGTH
# Whole numbers with their least and greatest values; the float settings are lengths of time, above 0 (and at
# most their greatest value when one is given).
NUMBER_SETTINGS = {"PORT": (int, 1, 65535), "TRUSTED_PROXIES": (int, 0, 100), "WEB_WORKERS": (int, 1, 1000),
                   "PAGE_BODY_LIMIT_BYTES": (int, 1024, MAX_BODY_BYTES),
                   "TIME_UNIT_SECONDS": (float, None, 60), "SUSPEND_DAY_SECONDS": (float, None, None),
                   "REDIS_TIMEOUT_SECONDS": (float, None, None), "WEBHOOK_TIMEOUT_SECONDS": (float, None, None),
                   "HOUSEKEEPING_REARM_SECONDS": (float, 0, None)}
REDIS_URL_SCHEMES = ("redis://", "rediss://", "unix://")

# The least length of a signing secret and of API_TOKEN (each is a password an attacker can try offline or online).
MIN_SECRET_CHARS = 12
KID_RE = re.compile(r"^[A-Za-z0-9_-]{1,8}\Z")


class ConfigError(ValueError):
    """A setting has a value the service cannot run with."""


_DOTENV_LINE = re.compile(r"(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)\Z")
_DOUBLE_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"\s*(?:#.*)?\Z')
_SINGLE_QUOTED = re.compile(r"'([^']*)'\s*(?:#.*)?\Z")


def read_dotenv(path=".env"):
    """Return KEY=VALUE pairs of a `.env` file (missing file: empty), as shells, docker-compose and
    python-dotenv read them: an optional `export `, a value in double quotes (with \\" and \\\\ escapes) or single
    quotes, or bare up to a ` #` comment (a `#` inside a word is part of it). A line that is none of these is a
    ConfigError rather than a value quietly changed."""
    values = {}
    p = Path(path)
    if not p.is_file():
        return values
    for number, line in enumerate(p.read_text(encoding="utf-8-sig").splitlines(), 1):  # -sig: a BOM is dropped
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _DOTENV_LINE.match(line)
        value = _dotenv_value(match.group(2)) if match else None
        if value is None:
            raise ConfigError(f"{path} line {number} is not KEY=value (a value with quotes in it must be quoted)")
        values[match.group(1)] = value
    return values


def _dotenv_value(text):
    """The value of `KEY=text`, or None when it cannot be read."""
    if text.startswith('"'):
        quoted = _DOUBLE_QUOTED.match(text)
        return re.sub(r"\\(.)", r"\1", quoted.group(1)) if quoted else None
    if text.startswith("'"):
        quoted = _SINGLE_QUOTED.match(text)
        return quoted.group(1) if quoted else None
    value = re.split(r"\s#", text, maxsplit=1)[0].strip()
    return None if '"' in value or "'" in value else value


def signing_key_ring(settings):
    """(SIGNING_KEYS as parse_signing_keys gives it, SIGNING_KEYS_VERIFY_ONLY likewise or []). Raises ConfigError,
    also for a kid in both."""
    signing = parse_signing_keys(settings["SIGNING_KEYS"])
    extra = settings.get("SIGNING_KEYS_VERIFY_ONLY")
    verify_only = parse_signing_keys(extra, "SIGNING_KEYS_VERIFY_ONLY") if extra else []
    both = {kid for kid, _ in signing} & {kid for kid, _ in verify_only}
    if both:
        raise ConfigError(f"SIGNING_KEYS_VERIFY_ONLY kid {sorted(both)[0]!r} is also in SIGNING_KEYS")
    return signing, verify_only


def parse_signing_keys(value, name="SIGNING_KEYS"):
    """Parse SIGNING_KEYS into an ordered list of (kid, secret bytes), newest last.

    Raises ConfigError on an empty list, a malformed pair, a bad kid or a duplicate kid.
    """
    pairs = []
    for item in (value or "").split(","):
        item = item.strip()
        if not item:
            continue
        kid, sep, secret = item.partition(":")
        if not sep or not secret:
            raise ConfigError(f"{name} entry {kid!r} is not kid:secret")
        if not KID_RE.match(kid):
            raise ConfigError(f"{name} kid {kid!r} must match {KID_RE.pattern}")
        if any(k == kid for k, _ in pairs):
            raise ConfigError(f"{name} kid {kid!r} appears twice")
        pairs.append((kid, secret.encode()))
    if not pairs:
        raise ConfigError(f"{name} has no kid:secret pair")
    return pairs


def _dev_secrets(var_dir):
    """Load or create the generated development secrets; print them when new. Raises ConfigError when VAR_DIR
    cannot hold them or the file is not what this wrote. Made whole under a temporary name and linked into place,
    so processes starting at once (gunicorn's master and `python -m workers`) all read the one that won."""
    path = Path(var_dir) / "dev-secrets.json"
    if not path.exists():
        generated = {
            "API_TOKEN": secrets.token_urlsafe(24),
            "SIGNING_KEYS": f"dev1:{secrets.token_urlsafe(32)}",
        }
        temporary = path.with_name(f".dev-secrets.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(generated, indent=2))
            try:
                os.link(temporary, path)  # fails if another process has linked its own meanwhile: that one counts
            except FileExistsError:
                pass
            else:
                print(f"Generated development secrets in {path}:", file=sys.stderr)
                print(f"  API_TOKEN={generated['API_TOKEN']}", file=sys.stderr)
            finally:
                temporary.unlink()
        except OSError as exc:
            raise ConfigError(f"VAR_DIR {str(var_dir)!r} cannot hold the generated development secrets "
                              f"({exc.strerror or exc}): set VAR_DIR to a directory this user can write, or set "
                              "SIGNING_KEYS and API_TOKEN") from None
    try:
        stored = json.loads(path.read_text())
        if not (isinstance(stored, dict) and all(isinstance(stored.get(k), str) and stored[k]
                                                 for k in ("API_TOKEN", "SIGNING_KEYS"))):
            raise ValueError("it has no API_TOKEN and SIGNING_KEYS")
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"VAR_DIR {str(var_dir)!r}: {path} cannot be read ({reason}): restore it (links signed "
                          "with its key work only with it), or set SIGNING_KEYS and API_TOKEN") from None
    return stored


def load_settings(environ=None, dotenv_path=".env", needs_secrets=True):
    """Return the settings dict from DEFAULTS, `.env` and the environment (environment wins).
    Raises ConfigError for a value the service cannot run with. needs_secrets=False (the worker, which signs and
    checks nothing): SIGNING_KEYS and API_TOKEN may be missing, and then none are generated."""
    environ = os.environ if environ is None else environ
    merged = dict(DEFAULTS)
    source = {**read_dotenv(dotenv_path), **{k: v for k, v in environ.items() if v != ""}}  # "" is unset
    for key in DEFAULTS:
        if source.get(key) not in (None, ""):
            merged[key] = source[key]
    merged["WEB_WORKERS"] = merged["WEB_WORKERS"] or default_web_workers()
    for key, (kind, least, most) in NUMBER_SETTINGS.items():
        merged[key] = _number(key, merged[key], kind, least, most)
    if merged["REDIS_URL"]:
        check_redis_url(merged["REDIS_URL"])
    from .locale import LOCALES
    if merged["DEFAULT_LOCALE"] not in LOCALES:
        raise ConfigError(f"DEFAULT_LOCALE {merged['DEFAULT_LOCALE']!r} must be one of {', '.join(LOCALES)}")
    for key in RATE_LIMIT_SETTINGS:
        check_rate_limit(key, merged[key])
    if merged["SIGNING_KEYS"]:
        parse_signing_keys(merged["SIGNING_KEYS"])  # a bad list stops the start, before secrets are generated
    if not merged["PUBLIC_BASE_URL"]:
        merged["PUBLIC_BASE_URL"] = f"http://127.0.0.1:{merged['PORT']}"
    merged["PUBLIC_BASE_URL"] = public_base_url(merged["PUBLIC_BASE_URL"])
    missing = [key for key in ("SIGNING_KEYS", "API_TOKEN") if not merged[key]]
    if missing and needs_secrets and not local_address(merged["PUBLIC_BASE_URL"]):
        # Generated secrets are one machine's: links signed on one instance would be refused (404) by every other,
        # and a new VAR_DIR would turn every link already sent into a 404.
        earlier = Path(merged["VAR_DIR"]) / "dev-secrets.json"
        # An install that ran on this address with generated secrets signed its links sent so far with them: new
        # keys alone would turn every one of those links into a 404.
        keep = (f"; the links sent so far were signed with the SIGNING_KEYS in {earlier}: keep that key listed"
                if earlier.is_file() else "")
        raise ConfigError(f"{missing[0]} is not set: PUBLIC_BASE_URL {merged['PUBLIC_BASE_URL']} is not a local "
                          "address, and secrets are generated only for development (set SIGNING_KEYS and "
                          f"API_TOKEN, the same on every instance{keep})")
    if missing and needs_secrets:
        generated = _dev_secrets(merged["VAR_DIR"])
        merged["API_TOKEN"] = merged["API_TOKEN"] or generated["API_TOKEN"]
        merged["SIGNING_KEYS"] = merged["SIGNING_KEYS"] or generated["SIGNING_KEYS"]
    if merged["SIGNING_KEYS"]:
        signing, verify_only = signing_key_ring(merged)  # the start stops at a bad list, not each worker loading it
    else:  # a worker's (needs_secrets=False)
        extra = merged["SIGNING_KEYS_VERIFY_ONLY"]
        signing, verify_only = [], parse_signing_keys(extra, "SIGNING_KEYS_VERIFY_ONLY") if extra else []
    check_secret_lengths(merged["API_TOKEN"], signing, verify_only)
    return merged


def check_secret_lengths(api_token, signing, verify_only):
    """Raise ConfigError for a secret short enough to guess that signs or will sign links, or for API_TOKEN:
    anyone holding one link could try signing keys offline until its MAC matches, then sign links for every
    subscription (the generated ones have 43 characters). An older key of SIGNING_KEYS, one that only verifies
    the links already sent, is not refused (links never expire; short_key_warnings says it instead)."""
    for name, pairs in (("SIGNING_KEYS", signing[-1:]), ("SIGNING_KEYS_VERIFY_ONLY", verify_only)):
        for kid, secret in pairs:
            if len(secret) < MIN_SECRET_CHARS:
                raise ConfigError(f"{name} secret of kid {kid!r} has {len(secret)} characters: use at least "
                                  f"{MIN_SECRET_CHARS} random ones (python3 -c 'import secrets; "
                                  "print(secrets.token_urlsafe(32))')")
    if api_token is not None and len(api_token) < MIN_SECRET_CHARS:
        raise ConfigError(f"API_TOKEN has {len(api_token)} characters: use at least {MIN_SECRET_CHARS} random ones")


def short_key_warnings(settings):
    """Warnings about the older keys of SIGNING_KEYS under MIN_SECRET_CHARS, which check_secret_lengths lets
    verify the links already sent: each is a key someone may guess from one of them, to be removed when those
    links may stop working."""
    if not settings.get("SIGNING_KEYS"):
        return []
    signing = parse_signing_keys(settings["SIGNING_KEYS"])
    return [f"SIGNING_KEYS secret of kid {kid!r} has {len(secret)} characters: it only verifies links already "
            f"sent; remove it once they may stop working (new links are signed with {signing[-1][0]!r})"
            for kid, secret in signing[:-1] if len(secret) < MIN_SECRET_CHARS]


def shown_url(url):
    """`url` as messages and logs may show it: a password in it replaced by ***."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:  # not a URL urlsplit can read: shown up to its host part, whatever follows an @ cut
        return url.rpartition("@")[2] if "@" in url else url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def check_redis_url(url):
    """Raise ConfigError unless redis-py can make a connection of `url` (it connects only at the first
    command, so a bad port, database number or option would otherwise fail every request and the worker's
    start with a traceback, or, for a database that is not a number, quietly use database 0)."""
    import redis
    shown = f"REDIS_URL {shown_url(url)!r}"
    if not url.startswith(REDIS_URL_SCHEMES):
        raise ConfigError(f"{shown} must start with redis://, rediss:// or unix://")
    try:
        parts = urlsplit(url)
        if url.startswith("unix://") and not parts.path:
            raise ValueError("it names no socket path (unix:///path/to/redis.sock)")
        if not url.startswith("unix://") and not re.fullmatch(r"/?|/\d+", parts.path):
            raise ValueError(f"the database {parts.path[1:]!r} is not a number")
        client = redis.Redis.from_url(url)
        client.connection_pool.make_connection()  # builds the connection object only: no I/O
    except ValueError as exc:
        raise ConfigError(f"{shown} cannot be used: {exc}") from None
    except TypeError as exc:  # an option in the query that no connection takes (?foo=1)
        unknown = re.search(r"argument '(\w+)'", str(exc))
        raise ConfigError(f"{shown} cannot be used: redis-py has no connection option "
                          f"{unknown.group(1) if unknown else str(exc)!r}") from None


def _number(name, value, kind, least, most):
    """`value` as an int from `least` to `most`, or a finite float above 0 (or 0 too when `least` is 0) and at
    most `most` when given; else ConfigError."""
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = None
    if kind is int and (number is None or not least <= number <= most):
        raise ConfigError(f"{name} {value!r} is not a whole number from {least} to {most}")
    if kind is float and not (number is not None and (0 < number or least == 0 == number) and number < float("inf")):
        raise ConfigError(f"{name} {value!r} is not a number {'from 0' if least == 0 else 'above 0'}")
    if kind is float and most is not None and number > most:
        raise ConfigError(f"{name} {value!r} is more than {most}")
    return number


def check_rate_limit(name, value):
    """Raise ConfigError unless `value` is a rate limit Flask-Limiter reads: a bad one would otherwise fail
    every request it limits instead of the start."""
    from limits import parse_many

    try:
        parse_many(value)
    except ValueError:
        raise ConfigError(f"{name} {value!r} is not a rate limit such as '120 per minute' or "
                          "'10/second;1000/hour'") from None


# Set by `python -m webapp run` for the web app and the worker it starts: it has said the warnings already.
WARNED_MARK = "_UNSUB_SETTINGS_WARNED"
# Environment variables of the tools run beside this service, spelt like one of its settings but not typos of
# one: rq's command line (`rq worker -u` reads RQ_REDIS_URL, the README's production command), and the TLS URL that
# Heroku-style hosts set next to REDIS_URL. Never warned about.
OTHER_TOOLS_NAMES = frozenset({"RQ_REDIS_URL", "RQ_CONFIG", "RQ_WORKER_CLASS", "RQ_JOB_CLASS", "RQ_QUEUE_CLASS",
                               "RQ_CONNECTION_CLASS", "RQ_KEY_PREFIX", "REDIS_TLS_URL"})


def settings_or_exit(needs_secrets=True):
    """load_settings() for a command line: a ConfigError ends the process with its message, no traceback;
    warnings about names that are not settings go to stderr first, those about short older keys after."""
    if not os.environ.get(WARNED_MARK):
        for warning in name_warnings():
            print(f"warning: {warning}", file=sys.stderr)
    try:
        settings = load_settings(needs_secrets=needs_secrets)
    except ConfigError as exc:
        sys.exit(f"Configuration error: {exc}")
    if not os.environ.get(WARNED_MARK):
        for warning in short_key_warnings(settings):
            print(f"warning: {warning}", file=sys.stderr)
    return settings


def name_warnings(environ=None, dotenv_path=".env"):
    """Warnings about names that are not settings but look meant as one: every name `.env` sets that is not a
    setting (the file is this service's), and an environment variable spelt almost like one (TRUSTED_PROXY,
    DEFAULT_LOCAL, REDIS_URI). Either would otherwise be ignored without a word, its setting left at its default."""
    import difflib
    environ = os.environ if environ is None else environ
    try:
        in_dotenv = read_dotenv(dotenv_path)
    except ConfigError:
        in_dotenv = {}  # load_settings says what is wrong with the file
    found = [(name, ".env") for name in in_dotenv if name not in DEFAULTS]
    found += [(name, "the environment") for name in sorted(environ)
              if name not in DEFAULTS and name not in in_dotenv and name != WARNED_MARK
              and name not in OTHER_TOOLS_NAMES
              and difflib.get_close_matches(name, DEFAULTS, n=1, cutoff=0.8)]
    warnings = []
    for name, where in found:
        close = difflib.get_close_matches(name, DEFAULTS, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        warnings.append(f"{name}, set in {where}, is not a setting of this service and is ignored{hint}")
    return warnings


def default_web_workers():
    """Two sync gunicorn workers per CPU core (at least two). A sync worker waits out each Redis round trip
    doing nothing, so one per core leaves cores idle: on a 2-core VM even a bare Flask endpoint served about
    14 % more requests a second with 4 workers than with 2 (medians of 5 alternating wrk rounds)."""
    return max(2, 2 * (os.cpu_count() or 1))


def local_address(url):
    """Whether `url` names this machine (a development install): localhost, 127.0.0.1 or ::1."""
    return urlsplit(url).hostname in ("localhost", "127.0.0.1", "::1")


def one_click_capable(url):
    """Whether a link can be an RFC 8058 one-click: https (§3.1), or a local development address."""
    return urlsplit(url).scheme.lower() == "https" or local_address(url)


def public_base_url(value):
    """PUBLIC_BASE_URL as links use it: scheme and host in lower case, no trailing slash, and ASCII (a header
    field is US-ASCII, RFC 5322): a host with other letters IDNA-encoded, other letters in the path
    percent-encoded as UTF-8, as a browser sends them (validation.ascii_uri). It goes into every link and the
    List-Unsubscribe header, so it must be an http(s) URL with a host and nothing that would end or split a
    header's <...> (spaces, <, >, quotes, commas) or the link (a query or fragment); else ConfigError."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - ValueError for a port that is not a number
    except ValueError:
        parts = None
    if (parts is None or parts.scheme.lower() not in ("http", "https") or not parts.hostname or parts.username
            or re.search(r'[\s<>",?#\x00-\x1f\x7f]', value)):
        raise ConfigError(f"PUBLIC_BASE_URL {value!r} must be an http(s) URL such as https://unsub.example.com "
                          "(no spaces, <, >, quotes, commas, query or fragment)")
    try:
        value = ascii_uri(value, "PUBLIC_BASE_URL")
    except InvalidInput as exc:
        raise ConfigError(str(exc)) from None
    parts = urlsplit(value)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path}".rstrip("/")


def https_warning(base_url):
    """Return a warning when links would not be https (RFC 8058 requires it), localhost aside."""
    if one_click_capable(base_url):
        return None
    return (f"PUBLIC_BASE_URL {base_url} is not https: Gmail and Yahoo ignore one-click "
            "unsubscribe (RFC 8058) on plain http links")
