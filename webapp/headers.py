"""Links and List-* headers for a sent message, built in exactly one place.

List-Unsubscribe carries one HTTPS URL (RFC 8058 §3.1) and List-Unsubscribe-Post the single pair
`List-Unsubscribe=One-Click`; neither is sent when the resource is blocked or has list-unsubscribe off.
List-ID is "<phrase> <list-id>" (RFC 2919) with the resource name as the phrase, quoted or RFC 2047-encoded
(in words of at most 75 characters) when it is not plain atoms, and encoded when it holds "=?".
"""
import base64
import functools
import re

from .config import one_click_capable
from .tokens import issue_manager_token, issue_smid

ONE_CLICK = "List-Unsubscribe=One-Click"
_one_click_capable = functools.lru_cache(maxsize=16)(one_click_capable)  # asked per link, of one base URL
_ATOM_PHRASE_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]+\Z")
# An encoded word is at most 75 characters (RFC 2047 §2): "=?utf-8?b?" and "?=" leave 63 for base64, which is
# 45 bytes of text. A longer name is several words separated by spaces, where the sender's mail library may fold
# the line (a 255-character name in one word also passed the 998-character line limit); decoders join them.
ENCODED_WORD_BYTES = 45


def list_id_phrase(name):
    """The resource name as an RFC 5322 phrase."""
    name = " ".join(name.split())
    # "=?" may start an encoded word, which mail clients decode even inside quotes (Python's parser does): a
    # name holding it shows as written only when it is encoded itself.
    if "=?" not in name:
        if _ATOM_PHRASE_RE.match(name):
            return name
        if name.isascii():
            return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return " ".join("=?utf-8?b?" + base64.b64encode(part.encode()).decode() + "?=" for part in _utf8_parts(name))


def _utf8_parts(text, max_bytes=ENCODED_WORD_BYTES):
    """`text` cut between characters into parts of at most `max_bytes` UTF-8 bytes each."""
    parts, part, size = [], "", 0
    for char in text:
        n = len(char.encode())
        if size + n > max_bytes:
            parts.append(part)
            part, size = "", 0
        part, size = part + char, size + n
    return parts + [part]


def unsubscribe_url(base_url, smid):
    return f"{base_url}/unsubscribe/{smid}"


def manage_url(base_url, token):
    return f"{base_url}/manage/{token}"


def email_headers(resource, url, base_url=None):
    """The List-* headers of an email for this resource (empty parts are left out); `base_url`, when given, is
    the part of `url` that decides whether it can be a one-click."""
    headers = {}
    settings = resource["unsubscribe"]
    if settings["mode"] != "blocked" and settings["list_unsubscribe"]["enabled"]:
        headers["List-Unsubscribe"] = f"<{url}>"
        if _one_click_capable(base_url or url):  # RFC 8058 §3.1: List-Unsubscribe-Post only with an https URI
            headers["List-Unsubscribe-Post"] = ONE_CLICK
    list_id = resource["channel_settings"].get("email", {}).get("list_id")
    if list_id:
        headers["List-ID"] = f"{list_id_phrase(resource['name'])} <{list_id}>"
    return headers


def message_links(keys_ring, base_url, resource, db_id, profile_id, hash_id, channel, category=None,
                  sent_at=None):
    """SMID, unsubscribe and manager URLs and (email only) headers for one message. Writes nothing."""
    smid = issue_smid(keys_ring, resource["id"], db_id, profile_id, hash_id, category, sent_at)
    url = unsubscribe_url(base_url, smid)
    return {
        "smid": smid,
        "unsubscribe_url": url,
        "manage_url": manage_url(base_url, issue_manager_token(keys_ring, db_id, profile_id, hash_id)),
        "headers": email_headers(resource, url, base_url) if channel == "email" else {},
    }
