"""SMID and manager tokens: signed, compact, rotation-friendly; forged, truncated and altered ones rejected."""
import base64

import pytest

from webapp.config import ConfigError, parse_signing_keys
from webapp.errors import BadToken
from webapp.tokens import (MAC_BYTES, SMID_MAX_CHARS, SigningKeys, form_token_matches, issue_form_token,
                           issue_manager_token, issue_smid, read_manager_token, read_smid)

OLD = SigningKeys(parse_signing_keys("k1:old-secret"))
ROTATED = SigningKeys(parse_signing_keys("k1:old-secret,k2:new-secret"))
NEW_ONLY = SigningKeys(parse_signing_keys("k2:new-secret"))


def test_smid_round_trip():
    token = issue_smid(ROTATED, 7, 1, "p-42", "7641c5c5", "news", sent_at=1_700_000_000)
    smid = read_smid(ROTATED, token)
    assert (smid.resource_id, smid.db_id, smid.profile_id, smid.hash_id, smid.category, smid.sent_at) == \
        (7, 1, "p-42", "7641c5c5", "news", 1_700_000_000)
    assert token.isascii() and "=" not in token and "/" not in token and "+" not in token


def test_smid_carries_no_address():
    # The MAC and the send time are arbitrary bytes (either may hold b"@"), so check the layout instead:
    # the signed part is exactly the listed fields, leaving no room for an address.
    token = issue_smid(ROTATED, 7, 1, "p-42", "7641c5c5", sent_at=1_700_000_000)
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    payload = raw[:-MAC_BYTES]
    assert payload == (bytes([payload[0]]) + b"\x02k2" + b"\x07" + b"\x01" + (1_700_000_000).to_bytes(4, "big")
                       + bytes.fromhex("7641c5c5") + b"\x04p-42" + b"\x00")


def test_longest_smid_fits_160_chars():
    kid_ring = SigningKeys(parse_signing_keys("abcdefgh:s"))
    token = issue_smid(kid_ring, 2 ** 31, 2 ** 31, "x" * 40, "ffffffff", "c" * 32, sent_at=2 ** 32 - 1)
    assert len(token) <= SMID_MAX_CHARS
    assert read_smid(kid_ring, token).profile_id == "x" * 40


def test_retired_but_listed_key_still_verifies():
    old_link = issue_smid(OLD, 1, 1, "p", "00000000")
    assert read_smid(ROTATED, old_link).profile_id == "p"          # k1 retired but still listed
    new_link = issue_smid(ROTATED, 1, 1, "p", "00000000")
    assert read_smid(NEW_ONLY, new_link).profile_id == "p"         # new links use the newest key (k2)


def test_a_verify_only_key_verifies_and_never_signs():
    """A rolling rotation: the new key is first listed as verify-only on every instance; then, while some
    instances sign with it and others do not yet, every instance reads every link."""
    staged = SigningKeys(parse_signing_keys("k1:old-secret"), parse_signing_keys("k2:new-secret"))
    assert staged.current_kid == "k1"
    link = issue_smid(staged, 1, 1, "p", "00000000")
    assert read_smid(OLD, link).profile_id == "p"                            # signed with k1, as before
    assert read_smid(staged, issue_smid(ROTATED, 1, 1, "p", "00000000")).profile_id == "p"   # a k2 link reads
    assert read_smid(ROTATED, link).profile_id == "p"


def test_a_kid_both_signing_and_verify_only_is_refused():
    from webapp.config import load_settings
    with pytest.raises(ConfigError, match="SIGNING_KEYS_VERIFY_ONLY kid 'k2' is also in SIGNING_KEYS"):
        load_settings({"SIGNING_KEYS": "k1:a,k2:b", "SIGNING_KEYS_VERIFY_ONLY": "k2:c", "API_TOKEN": "t"},
                      dotenv_path="/nonexistent/.env")
    with pytest.raises(ConfigError, match="SIGNING_KEYS_VERIFY_ONLY entry 'k3' is not kid:secret"):
        load_settings({"SIGNING_KEYS": "k1:a", "SIGNING_KEYS_VERIFY_ONLY": "k3", "API_TOKEN": "t"},
                      dotenv_path="/nonexistent/.env")


def test_a_bad_verify_only_list_stops_the_start_with_generated_signing_keys(tmp_path):
    from webapp.config import load_settings
    with pytest.raises(ConfigError, match="SIGNING_KEYS_VERIFY_ONLY entry 'k3' is not kid:secret"):
        load_settings({"SIGNING_KEYS_VERIFY_ONLY": "k3", "VAR_DIR": str(tmp_path)}, dotenv_path="/nonexistent/.env")
    with pytest.raises(ConfigError, match="kid 'dev1' is also in SIGNING_KEYS"):   # the generated key's kid
        load_settings({"SIGNING_KEYS_VERIFY_ONLY": "dev1:x", "VAR_DIR": str(tmp_path)},
                      dotenv_path="/nonexistent/.env")


def test_unknown_key_is_rejected():
    old_link = issue_smid(OLD, 1, 1, "p", "00000000")
    with pytest.raises(BadToken, match="unknown key"):
        read_smid(NEW_ONLY, old_link)                               # k1 dropped from the list
    impostor = SigningKeys(parse_signing_keys("k2:guessed-secret"))
    with pytest.raises(BadToken, match="signature"):
        read_smid(ROTATED, issue_smid(impostor, 1, 1, "p", "00000000"))


@pytest.mark.parametrize("mutate", [
    lambda t: t[:-1],                                   # truncated
    lambda t: t[:len(t) // 2],                          # truncated hard
    lambda t: t[:10] + ("A" if t[10] != "A" else "B") + t[11:],   # altered payload byte
    lambda t: t[:-3] + ("A" if t[-3] != "A" else "B") + t[-2:],   # altered signature
    lambda t: t + "A",                                  # extended
    lambda t: t.replace(t[5], "*", 1),                  # not base64url
    lambda t: "",
    lambda t: "x" * 400,
])
def test_forged_or_damaged_smid_is_rejected(mutate):
    token = issue_smid(ROTATED, 3, 1, "p-42", "7641c5c5", "news")
    with pytest.raises(BadToken):
        read_smid(ROTATED, mutate(token))


def test_manager_token_and_smid_are_not_interchangeable():
    smid = issue_smid(ROTATED, 3, 1, "p-42", "7641c5c5")
    mgr = issue_manager_token(ROTATED, 1, "p-42", "7641c5c5")
    assert read_manager_token(ROTATED, mgr).hash_id == "7641c5c5"
    with pytest.raises(BadToken):
        read_manager_token(ROTATED, smid)
    with pytest.raises(BadToken):
        read_smid(ROTATED, mgr)


@pytest.mark.parametrize("value", ["", "nokid", "bad kid:x", "k1:a,k1:b", "toolongkid:x", "k1:"])
def test_bad_signing_keys_setting(value):
    with pytest.raises(ConfigError):
        parse_signing_keys(value)


def test_form_token_survives_rotation_and_names_one_link():
    smid = issue_smid(OLD, 7, 1, "p-1", "0a0b0c0d", "news")
    token = issue_form_token(OLD, smid)
    assert token.startswith("k1.") and form_token_matches(OLD, smid, token)
    assert form_token_matches(ROTATED, smid, token)                  # a page opened before the rotation
    assert issue_form_token(ROTATED, smid).startswith("k2.")
    assert not form_token_matches(NEW_ONLY, smid, token)             # its key retired
    other = issue_smid(OLD, 7, 1, "p-2", "0a0b0c0d", "news")
    assert not form_token_matches(OLD, other, token)
    for bad in (None, "", "k1", "k1.", token[:-1], "k9." + token[3:], token + "é", 42):
        assert not form_token_matches(OLD, smid, bad), bad


def test_every_cut_of_a_token_is_refused_and_one_cut_within_its_record_or_mac_is_called_incomplete():
    from webapp.errors import IncompleteToken
    keys = SigningKeys([("k1", b"secret-one")])
    for token, read in ((issue_smid(keys, 7, 1, "p-42", "0a1b2c3d", "news"), read_smid),
                        (issue_manager_token(keys, 1, "p-42"), read_manager_token)):
        for cut in range(2, len(token)):
            with pytest.raises(IncompleteToken):
                read(keys, token[:cut])
        altered = token[:-1] + ("A" if token[-1] != "A" else "B")
        with pytest.raises(BadToken) as refused:
            read(keys, altered)
        assert not isinstance(refused.value, IncompleteToken)
        with pytest.raises(BadToken) as refused:
            read(keys, token + "AAAA")
        assert not isinstance(refused.value, IncompleteToken)


def test_a_token_has_one_spelling():
    """The same bytes spelt another way (padding, the other base64 alphabet, a character base64 decoders skip,
    unused low bits of the last character set) is refused: no two links are one token, and read_smid's own
    decoding (binascii, for speed) accepts only what issuing writes."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for profile in ("p", "p-", "p-4"):  # tokens of each length modulo 4 that base64url has
        token = issue_smid(ROTATED, 7, 1, profile, "7641c5c5", "news", sent_at=1_700_000_000)
        assert read_smid(ROTATED, token).profile_id == profile
        last = alphabet.index(token[-1])
        others = [token + "=" * (-len(token) % 4 or 4), token[:5] + "\n" + token[5:], token[:5] + " " + token[5:],
                  token.replace("-", "+").replace("_", "/"), token[:-1] + alphabet[last | 1]]
        for other in others:
            if other == token:  # no "-" or "_" to swap, or the last character has no unused bit
                continue
            with pytest.raises(BadToken):
                read_smid(ROTATED, other)
