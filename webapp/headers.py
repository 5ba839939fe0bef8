"""Links and List-* headers for a sent message, built in exactly one place.

List-Unsubscribe carries one HTTPS URL (RFC 8058 §3.1) and List-Unsubscribe-Post the single pair
`List-Unsubscribe=One-Click`; neither is sent when the resource is blocked or has list-unsubscribe off.
List-ID is "<phrase> <list-id>" (RFC 2919) with the resource name as the phrase, quoted or RFC 2047-encoded
when it is not plain atoms.
"""
import base64
import re

from .tokens import issue_manager_token, issue_smid

ONE_CLICK = "List-Unsubscribe=One-Click"
_ATOM_PHRASE_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]+\Z")


def list_id_phrase(name):
    """The resource name as an RFC 5322 phrase."""
    name = " ".join(name.split())
    if _ATOM_PHRASE_RE.match(name):
        return name
    if name.isascii():
        return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "=?utf-8?b?" + base64.b64encode(name.encode()).decode() + "?="


def unsubscribe_url(base_url, smid):
    return f"{base_url}/unsubscribe/{smid}"


def manage_url(base_url, token):
    return f"{base_url}/manage/{token}"


def email_headers(resource, url):
    """The List-* headers of an email for this resource (empty parts are left out)."""
    headers = {}
    settings = resource["unsubscribe"]
    if settings["mode"] != "blocked" and settings["list_unsubscribe"]["enabled"]:
        headers["List-Unsubscribe"] = f"<{url}>"
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
        "headers": email_headers(resource, url) if channel == "email" else {},
    }
