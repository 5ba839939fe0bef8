"""Small input checks shared by resources and subscriptions. Each raises InvalidInput naming the field."""
import functools
import ipaddress
import json
import math
import re
import time
from datetime import date, datetime, timezone
from urllib.parse import quote, urlsplit, urlunsplit

import idna
import orjson

from .errors import InvalidInput

API_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*\Z")
API_NAME_MAX_LENGTH = 32  # category and custom-field api names
PROFILE_ID_RE = re.compile(r"^[A-Za-z0-9._:@-]+\Z")
E164_RE = re.compile(r"^\+[1-9][0-9]{6,14}\Z")
CHAT_ID_RE = re.compile(r"^-?[0-9]{1,20}\Z")
# RFC 5322 atext, used for dot-atom local parts and for List-ID labels (RFC 2919 dot-atom-text).
ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
DOT_ATOM_RE = re.compile(rf"^{ATEXT}+(\.{ATEXT}+)*\Z")
QUOTED_LOCAL_RE = re.compile(r'^"([\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
HOSTNAME_RE = re.compile(r"^(?=.{1,253}\Z)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")
LABEL_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


def require(data, key, where=""):
    if key not in data or data[key] is None:
        raise InvalidInput(f"{where}{key} is required", field=f"{where}{key}")
    return data[key]


def blank_or(value, check, field, *args):
    """None for an optional text given as null or "", else check(value, field, *args): a value of another JSON
    type (0, false, [], {}) goes to the check and is refused there, not taken for "none" as falsy."""
    return None if value is None or value == "" else check(value, field, *args)


def no_unknown_keys(data, allowed, where=""):
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise InvalidInput(f"{where}{unknown[0]} is not a known field", field=f"{where}{unknown[0]}")


# Stored records and ledger events are written, and ledger events hashed, on every change: orjson writes them
# at a seventh of the json module's cost (the first one-click's largest part). It writes the same text as
# json.dumps for these options, but for some floats' exponents (1e-7, json's 1e-07: the same number read
# back); what orjson refuses (a lone surrogate, an integer past 64 bits, a key that is not text) json writes.
_json_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_json_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode


def compact_json(value):
    """json.dumps(value, separators=(",", ":"), ensure_ascii=False): the stored form of records and events."""
    try:
        return orjson.dumps(value, option=_REFUSED_AS_JSON_DOES).decode()
    except orjson.JSONEncodeError:
        return _json_compact(value)


# Types orjson writes but json refuses: left to json, which raises for them.
_REFUSED_AS_JSON_DOES = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def canonical_json_bytes(value):
    """json.dumps(value, sort_keys=True, separators=(",", ":")).encode(), byte for byte: what a ledger event's
    hash is of, and what verifying recomputes. orjson's text is used where it is that text: JSON of text,
    whole numbers, true, false and null only (no float) that is all ASCII but DEL (json's ensure_ascii
    escapes non-ASCII and DEL, orjson writes them as they are); json's anywhere else."""
    if _plain(value):
        try:
            text = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:  # a lone surrogate, which json escapes
            text = b"\x80"
        if text.isascii() and b"\x7f" not in text:
            return text
    return _json_canonical(value).encode()


def _plain(value):
    """Whether value holds only dicts, lists, text, whole numbers, true, false and null (no float, no subclass
    of these): what orjson writes as json does, or refuses (a key that is not text, an integer past 64 bits).
    A loop rather than a recursion: this runs on every event hashed."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
        elif not (kind is str or kind is int or kind is bool or item is None):
            return False
    return True


# Checks of stored JSON's shape (a subscription record, a resource): what a reader relies on, for text that was
# altered in Redis by hand or damaged. Each takes a decoded JSON value and says whether it fits.
def is_int(value):
    return type(value) is int  # not bool


def is_text(value):
    return type(value) is str


def is_optional_text(value):
    return value is None or type(value) is str


def is_flag(value):
    return type(value) is bool


def is_object(value):
    return type(value) is dict


def object_of(members, required=()):
    """A check of a JSON object: each of `members` present is of its kind ({name: check}), `required` are there."""
    return lambda value: (type(value) is dict and all(name in value for name in required)
                          and all(fits(value[name]) for name, fits in members.items() if name in value))


def list_of(fits):
    return lambda value: type(value) is list and all(fits(item) for item in value)


def json_object(raw, what="request body"):
    """The JSON object in `raw` (bytes or text), or InvalidInput. Text that cannot be UTF-8 is refused here,
    once for every field: JSON may spell a lone UTF-16 surrogate ("\\ud800"), which Python decodes into a str
    that every later encode (a stored record, a header, a page) fails on."""
    try:
        data = json.loads(raw) if raw else None
    except (ValueError, RecursionError):  # RecursionError: arrays or objects nested thousands deep
        data = None
    if not isinstance(data, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{what} holds text that is not valid Unicode (a lone surrogate escape)") from None
    return data


def as_object(value, field):
    if not isinstance(value, dict):
        raise InvalidInput(f"{field} must be an object", field=field)
    return value


def as_list(value, field, max_items=None):
    if not isinstance(value, list):
        raise InvalidInput(f"{field} must be a list", field=field)
    if max_items is not None and len(value) > max_items:
        raise InvalidInput(f"{field} has more than {max_items} items", field=field)
    return value


def as_int(value, field, minimum=None, maximum=None, allow_text=True):
    """Accept an int (not a bool), or a string of digits when allow_text; check the bounds."""
    if allow_text and isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,18}", value.strip()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{field} must be an integer", field=field)
    if minimum is not None and value < minimum:
        raise InvalidInput(f"{field} must be at least {minimum}", field=field)
    if maximum is not None and value > maximum:
        raise InvalidInput(f"{field} must be at most {maximum}", field=field)
    return value


def as_float(value, field):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"{field} must be a number", field=field)
    try:
        number = float(value)
    except OverflowError:  # an integer past the largest float (JSON's 1e400 written out in digits)
        number = math.inf
    if not math.isfinite(number):
        raise InvalidInput(f"{field} must be a finite number", field=field)
    return number


def as_bool(value, field):
    if not isinstance(value, bool):
        raise InvalidInput(f"{field} must be true or false", field=field)
    return value


def as_text(value, field, max_len=255, allow_empty=True, for_header=False):
    """A string without C0 controls (tabs and line breaks aside); `for_header` (text that goes into a mail
    header, such as the List-ID phrase) also refuses DEL and the C1 controls, which RFC 5322 does not allow."""
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string", field=field)
    if not allow_empty and not value.strip():
        raise InvalidInput(f"{field} must not be empty", field=field)
    if len(value) > max_len:
        raise InvalidInput(f"{field} is longer than {max_len} characters", field=field)
    if any((ord(c) < 32 and c not in "\t\n\r") or (for_header and 0x7f <= ord(c) <= 0x9f) for c in value):
        raise InvalidInput(f"{field} contains control characters", field=field)
    return value


LANGUAGE_TAG_RE = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{1,8})*\Z")


def as_language(value, field="locale"):
    """A language tag (BCP 47: "ru", "ru-RU", "en_GB"); returns its primary language, lower case ("ru")."""
    if not isinstance(value, str) or len(value) > 35 or not LANGUAGE_TAG_RE.match(value):
        raise InvalidInput(f"{field} must be a language tag such as en, ru or ru-RU", field=field)
    return re.split("[-_]", value, maxsplit=1)[0].lower()


def as_api_name(value, field, max_len=API_NAME_MAX_LENGTH):
    if not isinstance(value, str) or not API_NAME_RE.match(value) or len(value) > max_len:
        raise InvalidInput(f"{field} must match ^[A-Za-z][A-Za-z0-9_]*$ (at most {max_len} characters)",
                           field=field)
    return value


def as_profile_id(value, field="profile_id", max_len=40):
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not PROFILE_ID_RE.match(value) or len(value) > max_len:
        raise InvalidInput(f"{field} must be 1-{max_len} characters of letters, digits and ._:@-",
                           field=field)
    return value


def idna_ascii(name):
    """The ASCII (punycode) form of a domain name, lower case, as browsers and mail systems spell it: IDNA 2008
    with UTS #46 mapping, non-transitional. Python's own "idna" codec is IDNA 2003, which maps ß to ss: it
    turns faß.de into fass.de, another domain. Browsers (the WHATWG URL standard) also take names IDNA 2008
    disallows, such as symbols (☃.net is xn--n3h.net); for those the 2003 codec gives the same spelling.
    Raises UnicodeError for a name that is not a domain name."""
    try:
        return idna.encode(name, uts46=True, transitional=False).decode("ascii").lower()
    except idna.IDNAError:
        return name.encode("idna").decode("ascii").lower()


def as_hostname(value, field):
    """A DNS name (IDNA allowed), at most 253 octets. Returns the ASCII form, lower case."""
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{field} must be a domain name", field=field)
    if HOSTNAME_RE.match(value):  # plain ASCII name: skip the (slow) IDNA codec
        return value.lower()
    try:
        ascii_name = idna_ascii(value).rstrip(".")
    except UnicodeError:
        raise InvalidInput(f"{field} is not a valid domain name", field=field) from None
    labels = ascii_name.split(".")
    if len(ascii_name) > 253 or not all(LABEL_RE.match(label) for label in labels):
        raise InvalidInput(f"{field} is not a valid domain name", field=field)
    return ascii_name


def as_email(value, field="email"):
    """An RFC 5321/5322 mailbox (dot-atom or quoted local part, domain or IP literal). Returns it
    lower-cased, which is the identity used for subscriptions."""
    if not isinstance(value, str) or "@" not in value or len(value) > 254:
        raise InvalidInput(f"{field} is not a valid email address", field=field)
    local, _, domain = value.rpartition("@")
    if not local or len(local.encode()) > 64 or not (DOT_ATOM_RE.match(local) or QUOTED_LOCAL_RE.match(local)):
        raise InvalidInput(f"{field} is not a valid email address", field=field)
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        try:
            ipaddress.ip_address(literal[5:] if literal.lower().startswith("ipv6:") else literal)
        except ValueError:
            raise InvalidInput(f"{field} is not a valid email address", field=field) from None
        domain_ascii = domain.lower()
    else:
        try:
            domain_ascii = as_hostname(domain, field)
        except InvalidInput:
            raise InvalidInput(f"{field} is not a valid email address", field=field) from None
        if "." not in domain_ascii:
            raise InvalidInput(f"{field} is not a valid email address", field=field)
    return f"{local}@{domain_ascii}".lower()


def as_phone(value, field="phone"):
    if not isinstance(value, str) or not E164_RE.match(value):
        raise InvalidInput(f"{field} must be in E.164 format with a leading + (e.g. +79000000000)", field=field)
    return value


def as_chat_id(value, field="cc_data.id"):
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not CHAT_ID_RE.match(value):
        raise InvalidInput(f"{field} must be a numeric chat id", field=field)
    return str(int(value))  # one spelling per chat ("007", "7" and 7 are one chat, its identity hashed once)


_PRINTABLE_ASCII = "".join(chr(c) for c in range(33, 127))


def as_url(value, field, allow_placeholders=(), sendable=False):
    """An absolute http(s) URL without credentials. Only the named {placeholders} may appear.

    With `sendable` (a URL this service POSTs to: a webhook, a call URL) it is returned as the ASCII URI that
    goes on the wire, the way a browser sends an address typed with other letters: the host IDNA-encoded as
    browsers do (idna_ascii: пример.рф -> xn--e1afmkfd.xn--p1ai), non-ASCII in the path, query and fragment percent-encoded as UTF-8
    (/hook/café -> /hook/caf%C3%A9; existing %-escapes are kept). An HTTP client cannot send it otherwise."""
    if not isinstance(value, str) or len(value) > 2048:
        raise InvalidInput(f"{field} must be an absolute http(s) URL", field=field)
    probe = value
    for name in allow_placeholders:
        probe = probe.replace("{" + name + "}", "x")
    if "{" in probe or "}" in probe:
        raise InvalidInput(f"{field} may only contain the placeholders "
                           + ", ".join("{%s}" % n for n in allow_placeholders), field=field)
    try:
        parts = urlsplit(probe)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number from 0 to 65535
    except ValueError:
        raise InvalidInput(f"{field} must be an absolute http(s) URL", field=field) from None
    if parts.scheme not in ("http", "https") or not host or parts.username or parts.password:
        raise InvalidInput(f"{field} must be an absolute http(s) URL", field=field)
    if any(c.isspace() or ord(c) < 32 or 0x7f <= ord(c) <= 0x9f for c in value):
        raise InvalidInput(f"{field} must not contain spaces or control characters", field=field)
    if sendable and not value.isascii():
        return ascii_uri(value, field)
    return value


def ascii_uri(value, field):
    """An absolute URL as the ASCII URI that goes on the wire (see as_url); InvalidInput for a host that is no
    internationalized domain name."""
    parts = urlsplit(value)
    netloc = parts.netloc
    if not netloc.isascii():
        try:
            host = idna_ascii(parts.hostname)
        except UnicodeError:
            raise InvalidInput(f"{field} has a host name that is not a valid internationalized domain name",
                               field=field) from None
        netloc = host + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit((parts.scheme, netloc, *(quote(p, safe=_PRINTABLE_ASCII)
                                              for p in (parts.path, parts.query, parts.fragment))))


def as_ip(value, field="ip"):
    if not isinstance(value, str):  # ipaddress also takes a number (3232235777 is 192.168.1.1, true 0.0.0.1)
        raise InvalidInput(f"{field} is not an IP address", field=field)
    try:
        return str(ipaddress.ip_address(value))
    except (ValueError, TypeError):
        raise InvalidInput(f"{field} is not an IP address", field=field) from None


def as_datetime(value, field="date"):
    """RFC 3339 date-time (a trailing Z is accepted). Returns it normalised to UTC with milliseconds."""
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be an RFC 3339 date-time", field=field)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"{field} must be an RFC 3339 date-time", field=field) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    try:
        return format_time(parsed)
    except OverflowError:  # 0001-01-01 east of UTC, 9999-12-31 west of it: outside the years a time can hold
        raise InvalidInput(f"{field} is outside the years 0001-9999 in UTC", field=field) from None


def format_time(moment):
    """A datetime as RFC 3339 UTC with milliseconds, as Altcraft returns dates."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def now_iso():
    """format_time(datetime.now(timezone.utc)), by way of ms_to_time: a third of the cost (every write)."""
    return ms_to_time(time.time_ns() // 1_000_000)


# format_time's text, the only kind time_to_ms turns into a number (ASCII digits only, as ms_to_time writes).
_TIME_TEXT = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})\.([0-9]{3})Z")


def time_to_ms(text):
    """A format_time text as epoch milliseconds (for compact storage); anything else, or a text that would not
    come back identical from ms_to_time (2026-02-30, 24:00), is returned as it is. (A pattern and a cached
    day count rather than strptime, which cost ~35 us a call: every write encodes two or three times.)"""
    if type(text) is not str:
        return text
    ms = _MS_OF_TEXT.get(text)
    if ms is not None:
        return ms
    match = _TIME_TEXT.fullmatch(text)
    if match is None:
        return text
    year, month, day, hour, minute, second, milli = map(int, match.groups())
    if hour > 23 or minute > 59 or second > 59:
        return text
    try:
        days = _days_since_epoch(year, month, day)
    except ValueError:  # no such date (year 0, month 13, February 30)
        return text
    return ((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + milli


_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


@functools.lru_cache(maxsize=4096)
def _days_since_epoch(year, month, day):
    return date(year, month, day).toordinal() - _EPOCH_ORDINAL


@functools.lru_cache(maxsize=4096)
def _date_text(days_since_epoch):
    return date.fromordinal(days_since_epoch + _EPOCH_ORDINAL).isoformat()


# The milliseconds a datetime can hold (years 1 to 9999), the range format_time's text covers.
MS_RANGE = range(-62135596800000, 253402300800000)


def ms_to_time(ms):
    """format_time's text of epoch milliseconds, without datetime: stored records decode on every request,
    and a cached date text with %-formatting of the time of day is about a third of the cost (time.gmtime's
    was half). A number no datetime can hold (only a damaged entry has one) is returned as it is."""
    if ms not in MS_RANGE:
        return ms
    seconds, milli = divmod(ms, 1000)
    days, second = divmod(seconds, 86400)
    minute, second = divmod(second, 60)
    hour, minute = divmod(minute, 60)
    text = "%sT%02d:%02d:%02d.%03dZ" % (_date_text(days), hour, minute, second, milli)
    if type(ms) is int:
        if len(_MS_OF_TEXT) >= _MS_OF_TEXT_MAX:
            _MS_OF_TEXT.clear()
        _MS_OF_TEXT[text] = ms
    return text


# ms_to_time's latest texts, back to their ms (the exact inverse): a change decodes a record and encodes it
# again, and encodes a fresh now_iso(), so time_to_ms finds most texts here instead of parsing them again.
_MS_OF_TEXT = {}
_MS_OF_TEXT_MAX = 1024
