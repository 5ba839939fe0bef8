"""Signed identifiers: the SMID (send message id), the subscription-manager token and resource tokens.

A token is base64url(payload || mac). The payload is a compact binary record that starts with a format
byte and the signing key id (kid); mac is HMAC-SHA256(key[kid], purpose || payload) cut to 16 bytes.
The purpose string differs per token kind, so a manager token never verifies as a SMID and vice versa.

Keys rotate through SIGNING_KEYS ("kid:secret,...", newest last): new tokens are signed with the newest
key, and any listed key verifies. Keep a retired key listed for at least 30 days after its last use
(CAN-SPAM); a token whose kid is no longer listed is rejected. Issuing writes nothing to Redis.
Payloads are signed, not encrypted: they carry ids only, never an address.
"""
import base64
import binascii
import hashlib
import hmac
import re
import secrets
import struct
import time
from dataclasses import dataclass
from typing import NamedTuple

from .errors import BadToken, IncompleteToken

MAC_BYTES = 16
SMID_FORMAT = 1
MANAGER_FORMAT = 2
SMID_MAX_CHARS = 160
PROFILE_ID_MAX = 40  # keeps every SMID within SMID_MAX_CHARS (see tests/test_tokens.py)
CATEGORY_MAX = 32

_PURPOSE = {SMID_FORMAT: b"smid\x00", MANAGER_FORMAT: b"manager\x00"}
_FORM_PURPOSE = b"page-form\x00"


class Smid(NamedTuple):  # a tuple: made on every request that opens a link, at a fraction of a frozen dataclass's cost
    resource_id: int
    db_id: int
    profile_id: str
    hash_id: str  # 8 hex chars: which subscription of the profile
    category: str | None
    sent_at: int  # unix seconds


@dataclass(frozen=True)
class ManagerToken:
    db_id: int
    profile_id: str
    hash_id: str | None  # the subscription the link was sent for: proves control of that address


class SigningKeys:
    """The ordered key ring; `sign` uses the newest, `verify` the one the token names (also a verify-only one)."""

    def __init__(self, pairs, verify_only=()):
        self._macs = {kid: hmac.new(secret, digestmod=hashlib.sha256) for kid, secret in [*pairs, *verify_only]}
        self.current_kid = pairs[-1][0]

    def mac(self, kid, purpose, payload):
        h = self._macs[kid].copy()
        h.update(purpose)
        h.update(payload)
        return h.digest()[:MAC_BYTES]

    def known(self, kid):
        return kid in self._macs


def _varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class _Reader:
    """Reads the payload fields back; any overrun or leftover raises BadToken."""
    __slots__ = ("data", "pos")

    def __init__(self, data, pos=0):
        self.data, self.pos = data, pos

    def take(self, n):
        if self.pos + n > len(self.data):
            raise BadToken("token is truncated")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def varint(self):
        data, pos = self.data, self.pos
        if pos < len(data) and data[pos] < 0x80:  # one byte (a number below 128): no loop
            self.pos = pos + 1
            return data[pos]
        shift = result = 0
        for _ in range(5):
            byte = self.take(1)[0]
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7
        raise BadToken("token has a malformed number")

    def text(self):
        data, pos = self.data, self.pos
        end = pos + 1 + data[pos] if pos < len(data) else pos + 1
        if end > len(data):
            raise BadToken("token is truncated")
        self.pos = end
        try:
            return data[pos + 1:end].decode("utf-8")
        except UnicodeDecodeError:
            raise BadToken("token has malformed text") from None

    def done(self):
        if self.pos != len(self.data):
            raise BadToken("token has trailing data")


def _text(value):
    raw = value.encode("utf-8")
    return bytes([len(raw)]) + raw


def _seal(keys, fmt, body):
    kid = keys.current_kid
    payload = bytes([fmt]) + _text(kid) + body
    return _b64url(payload + keys.mac(kid, _PURPOSE[fmt], payload))


_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64url(raw):
    """base64url without padding: the spelling of every token here."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _open(keys, fmt, token):
    """Check the signature and return a reader positioned after the kid. Raises BadToken."""
    if not isinstance(token, str) or not 20 <= len(token) <= SMID_MAX_CHARS:
        raise BadToken("token has a wrong length")
    try:  # base64.urlsafe_b64decode, _b64url: the same steps without their wrappers (every link opened)
        text = token.encode("ascii")
        raw = binascii.a2b_base64(text.translate(_FROM_URLSAFE) + b"=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise BadToken("token is not base64url") from None
    if binascii.b2a_base64(raw, newline=False).translate(_TO_URLSAFE).rstrip(b"=") != text:
        raise BadToken("token is not canonical base64url")  # no two spellings of one token
    payload, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
    if not payload:
        raise BadToken("token is truncated")
    if payload[0] != fmt:
        raise BadToken("token is of another kind")
    reader = _Reader(payload, 1)
    kid = reader.text()
    if not keys.known(kid):
        raise BadToken("token is signed with an unknown key")
    if not hmac.compare_digest(mac, keys.mac(kid, _PURPOSE[fmt], payload)):
        raise BadToken("token signature does not match")
    return reader


# A token as links carry it: a run of base64url characters (token_in_link; front.py matches it in its path).
B64URL_RUN = re.compile(r"[A-Za-z0-9_-]*")


def token_in_link(text):
    """The token a link's path segment carries: its leading run of base64url characters. What a mail client,
    a linkifier or a person adds after a link (the ">" of "<URL>", a full stop, a bracket or quote, a space,
    also percent-encoded) is never base64url, so it is left out; nothing of the token's own alphabet is ever
    taken off, changed or added (no case folding, no padding), so a link is never made into another token:
    what remains is the token as sent, or one that does not verify."""
    return B64URL_RUN.match(text).group() if isinstance(text, str) else text


def _open_or_say_cut_short(keys, fmt, token):
    """_open, raising IncompleteToken for a token that is the beginning of one of this kind (_cut_short)."""
    try:
        return _open(keys, fmt, token)
    except BadToken:
        if _cut_short(keys, fmt, token):
            raise IncompleteToken("token is incomplete") from None
        raise


# The text fields of a record, as issuing allows them: (longest, allowed bytes).
_TEXT_FIELDS = {"profile": (PROFILE_ID_MAX, re.compile(rb"[A-Za-z0-9._:@-]*")),
                "category": (CATEGORY_MAX, re.compile(rb"[A-Za-z0-9_]*"))}
_RECORD_FIELDS = {SMID_FORMAT: ("kid", "varint", "varint", 8, "profile", "category"),
                  MANAGER_FORMAT: ("kid", "varint", "profile")}  # a manager token's optional hash_id not counted


def _cut_short(keys, fmt, token):
    """Whether a token that did not verify is the start of a longer one: it decodes, begins with this kind's
    format byte and (the start of) a listed key id, every field it has is one issuing could have written, and
    its record and MAC need more bytes than it has. Only says which refusal to give: an incomplete token is
    refused as any other."""
    if not isinstance(token, str) or not 2 <= len(token) < SMID_MAX_CHARS:
        return False
    usable = token[:len(token) - 1] if len(token) % 4 == 1 else token  # a cut may leave a lone character
    try:
        raw = base64.urlsafe_b64decode(usable + "=" * (-len(usable) % 4))
    except (binascii.Error, ValueError):
        return False
    if not raw or raw[0] != fmt:
        return False
    pos = 1
    for field in _RECORD_FIELDS[fmt]:
        if pos >= len(raw):
            return True
        if field == "varint":
            for _ in range(5):
                if pos >= len(raw):
                    return True
                pos += 1
                if not raw[pos - 1] & 0x80:
                    break
            else:
                return False
        elif isinstance(field, int):
            pos += field
        else:
            n, chunk = raw[pos], raw[pos + 1:pos + 1 + raw[pos]]
            if field == "kid":
                kids = [kid.encode() for kid in keys._macs]
                if not any(kid == chunk if len(chunk) == n else kid.startswith(chunk) and len(kid) == n
                           for kid in kids):
                    return False
            else:
                longest, allowed = _TEXT_FIELDS[field]
                if n > longest or not allowed.fullmatch(chunk) or (field == "profile" and n == 0):
                    return False
            pos += 1 + n
    return pos + MAC_BYTES > len(raw)


def issue_smid(keys, resource_id, db_id, profile_id, hash_id, category=None, sent_at=None):
    """Return the SMID string for one sent message. Writes nothing."""
    sent_at = int(time.time()) if sent_at is None else int(sent_at)
    body = (_varint(resource_id) + _varint(db_id) + struct.pack(">I", sent_at)
            + bytes.fromhex(hash_id) + _text(profile_id) + _text(category or ""))
    return _seal(keys, SMID_FORMAT, body)


def read_smid(keys, token):
    """Verify a SMID and return its Smid. Raises BadToken for anything forged, altered or truncated."""
    r = _open_or_say_cut_short(keys, SMID_FORMAT, token)
    resource_id, db_id = r.varint(), r.varint()
    sent_at = struct.unpack(">I", r.take(4))[0]
    hash_id = r.take(4).hex()
    profile_id, category = r.text(), r.text()
    r.done()
    return Smid(resource_id, db_id, profile_id, hash_id, category or None, sent_at)


def issue_manager_token(keys, db_id, profile_id, hash_id=None):
    """Return the non-expiring subscription-manager token for a profile. Writes nothing."""
    body = _varint(db_id) + _text(profile_id) + (bytes.fromhex(hash_id) if hash_id else b"")
    return _seal(keys, MANAGER_FORMAT, body)


def read_manager_token(keys, token):
    """Verify a manager token and return its ManagerToken. Raises BadToken."""
    r = _open_or_say_cut_short(keys, MANAGER_FORMAT, token)
    db_id, profile_id = r.varint(), r.text()
    rest = r.data[r.pos:]
    if len(rest) not in (0, 4):
        raise BadToken("token has trailing data")
    return ManagerToken(db_id, profile_id, rest.hex() or None)


def issue_form_token(keys, link_token):
    """The CSRF token of the forms on a link's page (an unsubscribe page's SMID, or a manager token): "kid.mac",
    a MAC of the link's token under the newest key.

    Bound to the link rather than to a session, so the page sets no cookie, and its forms still work where a
    mail app's browser blocks cookies or the session is gone, and across a key rotation. It proves no more
    than the token in the URL already does, and nothing less: the page has no other authority (no login) for a
    forged POST to borrow, and a site without the link can no more make this token than the link itself."""
    kid = keys.current_kid
    return f"{kid}.{_form_mac(keys, kid, link_token)}"


def form_token_matches(keys, link_token, token):
    """True when `token` is issue_form_token's for this link under any listed key."""
    kid, dot, mac = token.rpartition(".") if isinstance(token, str) else ("", "", "")
    return bool(dot) and keys.known(kid) and same_secret(mac, _form_mac(keys, kid, link_token))


def _form_mac(keys, kid, link_token):
    return _b64url(keys.mac(kid, _FORM_PURPOSE, link_token.encode()))


def link_digest(token):
    """A digest of a SMID or manager token, for Redis keys: none holds a whole token (keys.py)."""
    return hashlib.sha256(token.encode()).hexdigest()[:24]


def new_resource_token():
    """A fresh per-resource secret (rtoken)."""
    return secrets.token_urlsafe(18)


def same_secret(given, expected):
    """Constant-time comparison of two secrets given as str (None never matches)."""
    if not isinstance(given, str) or not isinstance(expected, str):
        return False
    return hmac.compare_digest(given.encode(), expected.encode())
