"""/manage/<token>: one profile's subscriptions, categories, fields, suspend/resume, resubscribe, undo."""
import re
import time

import pytest

from conftest import back_link, email_resource, form_token, redis_state, refuse_form
from webapp import events, preferences


def setup_profile(api, profile_id="p-42", email="ann@example.com", mode="confirm", **resource_kw):
    res = api.ok("resources/add", **email_resource(
        unsubscribe={"mode": mode},
        channel_settings={"email": {"from_email": "news@shop.example", "list_id": "weekly.shop.example", "fields": [
            {"title": "Plan", "api_name": "plan", "type": "line", "in_manager": True},
            {"title": "Age", "api_name": "age", "type": "int", "in_manager": True},
            {"title": "Score", "api_name": "score", "type": "float", "in_manager": True},
            {"title": "VIP", "api_name": "vip", "type": "bool", "in_manager": True},
            {"title": "Internal", "api_name": "internal", "type": "line", "in_manager": False}]}},
        **resource_kw))
    ident = {"db_id": 1, "profile_id": profile_id, "resource_id": res["id"], "channel": "email", "email": email}
    sub = api.ok("subscriptions/set", **ident, url="https://shop.example/signup",
                 custom_fields={"internal": "secret-note"})
    links = api.ok("messages/links", **ident)
    return res, ident, sub, links["manage_url"].removeprefix("https://unsub.example")


def shown(html):
    """The text of an HTML fragment as it is seen: without what is only for screen readers."""
    return re.sub(r"<[^>]+>", "", re.sub(r'<span class="visually-hidden">.*?</span>', "", html))


def heard(html):
    """The text of an HTML fragment as a screen reader reads it: without what is aria-hidden."""
    return re.sub(r"<[^>]+>", "", re.sub(r'<span aria-hidden="true">.*?</span>', "", html))


def post(client, path, **form):
    html = client.get(path).get_data(as_text=True)
    return client.post(path, data={"csrf_token": form_token(html), **form})


def test_page_shows_subscriptions_grouped_and_masked(api, client):
    res, ident, sub, path = setup_profile(api)
    api.ok("subscriptions/set", **{**ident, "channel": "sms", "email": None, "phone": "+79001234567"})
    html = client.get(path).get_data(as_text=True)
    assert "Weekly news" in html and "a••@example.com" in shown(html) and "+7••••••4567" in shown(html)
    assert "ann@example.com" not in html and "secret-note" not in html       # no full address, no hidden field
    assert re.search(r'value="receipts"\s+checked disabled', html)             # required category locked
    assert "Why am I getting this?" in html and "shop.example" in html
    assert 'name="field.age"' in html and 'name="field.internal"' not in html


def test_toggle_category_and_edit_fields(api, client, r):
    _res, ident, sub, path = setup_profile(api)
    resp = post(client, path, action="save", hash_id=sub["hash_id"], **{"field.plan": "p\x00r\x07o", "field.age": "33",
                                                                        "field.score": "4,5", "field.vip": "on"})
    assert resp.status_code == 303
    got = api.ok("subscriptions/get", **ident)
    assert got["cats"] == ["receipts"]                                         # news unchecked, receipts locked on
    # (control characters, invisible and refused by the API, are left out)
    assert got["custom_fields"] == {"internal": "secret-note", "plan": "pro", "age": 33, "score": 4.5, "vip": True}
    event = events.list_events(r, 1, "p-42")[0][0]
    assert event["method"] == "manager" and event["after"]["cats"] == ["receipts"]


def test_a_line_field_keeps_no_line_breaks_or_controls(api, client):
    """A line a person enters is one line, as a browser's text input sends it: line breaks of every kind (CR, LF,
    NEL, U+2028/2029) and control characters are left out of a hand-made POST too, so a value a sender puts into
    a mail header cannot add one (Bcc: injection); a tab is a space."""
    _res, ident, sub, path = setup_profile(api)
    value = "pro\r\nBcc: x@evil.example\u2028y\x85z\x9b\x7f\u2029\tplan\n"
    resp = post(client, path, action="save", hash_id=sub["hash_id"], categories=["news"], **{"field.plan": value})
    assert resp.status_code == 303
    stored = api.ok("subscriptions/get", **ident)["custom_fields"]["plan"]
    assert stored == "proBcc: x@evil.exampleyz plan" and stored.splitlines() == [stored]


@pytest.mark.parametrize("field,value,text", [("field.age", "3.5", "whole number"),
                                              ("field.age", "²", "whole number"),     # "²".isdigit() is True
                                              ("field.age", "--5", "whole number"),
                                              ("field.age", "9" * 5000, "whole number"),  # past int()'s digits
                                              ("field.score", "lots", "Enter a number"),
                                              ("field.score", "1_000", "Enter a number"),  # float() takes these
                                              ("field.score", "١٢", "Enter a number"),
                                              ("field.score", "nan", "Enter a number"),
                                              ("field.score", "1e999", "Enter a number"),
                                              # a thousand with its separator, or one with three decimals?
                                              ("field.score", "1,000", "thousands separator"),
                                              ("field.score", "-12,500", "thousands separator")])
def test_bad_field_value_shows_inline_error_and_saves_nothing(api, client, r, field, value, text):
    _res, _ident, sub, path = setup_profile(api)
    token = form_token(client.get(path).get_data(as_text=True))
    before = redis_state(r)
    resp = client.post(path, data={"csrf_token": token, "action": "save", "hash_id": sub["hash_id"],
                                   "categories": ["news"], "field.plan": "pro", field: value})
    html = resp.get_data(as_text=True)
    assert resp.status_code == 400 and text in html and 'aria-invalid="true"' in html
    assert "Please check the highlighted fields." in html and "autofocus" in html   # said at the top, focus on it
    assert "<title>Error: My subscriptions</title>" in html                      # and in the window's title
    assert f'value="{value}"' in html                                          # what was typed stays
    assert redis_state(r) == before


@pytest.mark.parametrize("field,value,stored", [("field.age", "-9223372036854775808", -2 ** 63),  # the API's range
                                                ("field.age", " 12 ", 12),
                                                ("field.score", "4,5", 4.5), ("field.score", "-.5", -0.5),
                                                ("field.score", "1e3", 1000.0), ("field.score", "1,0", 1.0),
                                                ("field.score", "1,5000", 1.5), ("field.score", "1000,5", 1000.5),
                                                ("field.score", "0,125", 0.125)])
def test_a_number_is_taken_as_people_write_it(api, client, field, value, stored):
    _res, ident, sub, path = setup_profile(api)
    resp = post(client, path, action="save", hash_id=sub["hash_id"], categories=["news"], **{field: value})
    assert resp.status_code == 303
    got = api.ok("subscriptions/get", **ident)["custom_fields"][field.removeprefix("field.")]
    assert got == stored and type(got) is type(stored)


def hidden_inputs(html, hash_id, form_class="prefs"):
    """The hidden inputs of a card's form, as the browser sends them."""
    card = html.split(f'id="sub-{hash_id}"')[1].split("</article>")[0]
    form = card.split(f'class="{form_class}"')[1].split("</form>")[0]
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', form))


def test_a_save_from_a_page_opened_before_the_sender_added_options_leaves_them_alone(api, client, r):
    """A box or field the page did not show is no choice of the person's: an unchecked box sends nothing, so
    the category the sender added meanwhile stays on, and a field put in the manager meanwhile keeps its value."""
    res, ident, sub, path = setup_profile(api)
    form = hidden_inputs(client.get(path).get_data(as_text=True), sub["hash_id"])
    email = res["channel_settings"]["email"]
    api.ok("resources/update", id=res["id"], categories=email_resource()["categories"] + [
        {"title": "Tips", "api_name": "tips"}], channel_settings={"email": {**email, "fields": [
            {**f, "in_manager": True} for f in email["fields"]]}})
    assert api.ok("subscriptions/get", **ident)["cats"] == ["news", "receipts", "tips"]
    resp = client.post(path, data={**form, "action": "save", "field.age": "5"})   # news switched off
    assert resp.status_code == 303
    got = api.ok("subscriptions/get", **ident)
    assert got["cats"] == ["receipts", "tips"]
    assert got["custom_fields"] == {"internal": "secret-note", "age": 5, "vip": False}
    # The page as it is now shows them, and its save changes them.
    form = hidden_inputs(client.get(path).get_data(as_text=True), sub["hash_id"])
    assert form["shown_categories"] == "news receipts tips" and form["shown_fields"] == "plan age score vip internal"
    client.post(path, data={**form, "action": "save", "categories": ["news"], "field.internal": "mine"})
    got = api.ok("subscriptions/get", **ident)
    assert got["cats"] == ["news", "receipts"] and got["custom_fields"] == {"internal": "mine", "vip": False}


def test_a_refused_save_shows_the_boxes_as_the_person_left_them(api, client, r):
    """Not as stored: correcting the field and saving again must not bring back what the person unticked."""
    _res, ident, sub, path = setup_profile(api)
    post(client, path, action="save", hash_id=sub["hash_id"], categories=["news"], **{"field.vip": "on"})
    form = hidden_inputs(client.get(path).get_data(as_text=True), sub["hash_id"])
    resp = client.post(path, data={**form, "action": "save", "field.age": "x"})      # news and VIP unticked
    html = resp.get_data(as_text=True)
    assert resp.status_code == 400
    boxes = dict(re.findall(r'<input type="checkbox" id="[^"]*" name="[^"]*" value="(\w+)"\s*([^>]*)>', html))
    assert boxes == {"news": "", "receipts": 'checked disabled aria-describedby="r-%s-receipts"' % sub["hash_id"],
                     "on": ""}
    form = hidden_inputs(html, sub["hash_id"])
    assert client.post(path, data={**form, "action": "save", "field.age": "7"}).status_code == 303
    got = api.ok("subscriptions/get", **ident)
    assert got["cats"] == ["receipts"] and got["custom_fields"]["vip"] is False and got["custom_fields"]["age"] == 7


def test_each_cards_unsubscribe_button_names_what_it_stops_and_its_notice_says_what_stopped(api, client):
    """A card's button stops that card's subscription only: it says which, and no two read the same."""
    _res, ident, sub, path = setup_profile(api)
    sms = api.ok("subscriptions/set", **{**ident, "channel": "sms", "email": None, "phone": "+79001234567"})
    api.ok("subscriptions/set", **{**ident, "email": "work@example.com"})
    html = client.get(path).get_data(as_text=True)
    buttons = re.findall(r'<button type="submit" name="action" value="unsubscribe"[^>]*>(.*?)</button>', html)
    assert sorted(map(shown, buttons)) == ["Unsubscribe +7••••••4567 from Weekly news",
                                           "Unsubscribe a••@example.com from Weekly news",
                                           "Unsubscribe w•••@example.com from Weekly news"]
    assert sorted(map(heard, buttons)) == ["Unsubscribe +7… ending in 4567 from Weekly news",   # no "bullet"s
                                           "Unsubscribe a… at example.com from Weekly news",
                                           "Unsubscribe w… at example.com from Weekly news"]
    assert "Unsubscribe from all" not in html
    resp = post(client, path, action="unsubscribe", hash_id=sms["hash_id"])
    html = client.get(resp.headers["Location"]).get_data(as_text=True)
    card = html.split(f'id="sub-{sms["hash_id"]}"')[1].split("</article>")[0]
    assert "Unsubscribed: messages from Weekly news will no longer come to +7••••••4567." in shown(card)
    assert "Saved." not in html
    resp = post(client, path + "?lang=ru", action="undo", hash_id=sms["hash_id"], lang="ru")
    html = client.get(resp.headers["Location"]).get_data(as_text=True)
    assert "Последнее изменение отменено." in html and "Отписать a••@example.com от «Weekly news»" in shown(html)
    assert "Отписать a… в домене example.com от «Weekly news»" in heard(html)


def test_a_choice_the_sender_removed_meanwhile_says_the_page_is_out_of_date(api, client, r):
    """Not "check the highlighted fields" with nothing highlighted: the category is gone, the page is old."""
    res, _ident, sub, path = setup_profile(api)
    token = form_token(client.get(path).get_data(as_text=True))
    api.ok("resources/update", id=res["id"], delete_categories=["news"], categories=[
        c for c in email_resource()["categories"] if c["api_name"] != "news"])
    before = redis_state(r)
    resp = client.post(path, data={"csrf_token": token, "action": "save", "hash_id": sub["hash_id"],
                                   "categories": ["news"]})
    html = resp.get_data(as_text=True)
    assert resp.status_code == 400 and "This page is out of date" in html
    assert "highlighted" not in html and "aria-invalid" not in html
    assert redis_state(r) == before


def test_a_notice_after_a_change_is_shown_only_while_the_state_agrees(api, client):
    """?done= can be typed or come back from history (or the language link): it must not say what did not happen."""
    _res, ident, sub, path = setup_profile(api)
    h = sub["hash_id"]
    for done in ("save", "unsubscribe", "suspend", "resume", "resubscribe", "undo"):
        for query in (f"?done={done}", f"?done={done}&saved={h}"):
            assert 'role="status"' not in client.get(path + query).get_data(as_text=True), query
    location = post(client, path, action="unsubscribe", hash_id=h).headers["Location"]
    assert "Unsubscribed: messages" in client.get(location).get_data(as_text=True)
    assert "Подписка отменена" in client.get(location.replace("#", "&lang=ru#")).get_data(as_text=True)
    api.ok("subscriptions/set", **ident, status="subscribed")                # changed since, elsewhere
    assert 'role="status"' not in client.get(location).get_data(as_text=True)


@pytest.mark.parametrize("days", ["²", "1" * 5000, "7", ""])
def test_suspend_for_a_number_of_days_not_offered_is_refused(api, client, r, days):
    _res, _ident, sub, path = setup_profile(api)
    before = redis_state(r)
    assert post(client, path, action="suspend", hash_id=sub["hash_id"], days=days).status_code == 400
    assert redis_state(r) == before


def test_suspend_resume_unsubscribe_and_undo(api, client, r):
    _res, ident, sub, path = setup_profile(api)
    h = sub["hash_id"]
    assert post(client, path, action="suspend", hash_id=h, days="14").status_code == 303
    got = api.ok("subscriptions/get", **ident)
    assert got["status"] == "suspended" and got["suspended_until"]
    html = client.get(path).get_data(as_text=True)
    assert "Paused until" in html and 'value="resume"' in html
    assert r.zcard("us:suspensions:due") == 1
    assert post(client, path, action="resume", hash_id=h).status_code == 303
    assert api.ok("subscriptions/get", **ident)["status"] == "subscribed" and r.zcard("us:suspensions:due") == 0
    assert post(client, path, action="unsubscribe", hash_id=h).status_code == 303
    html = client.get(path).get_data(as_text=True)      # its categories are not "what you receive" any more
    assert "What you will receive while subscribed" in html and "What you receive<" not in html
    assert api.ok("subscriptions/get", **ident)["status"] == "unsubscribed"
    assert "You can undo your last change" in client.get(path).get_data(as_text=True)
    assert post(client, path, action="undo", hash_id=h).status_code == 303
    assert api.ok("subscriptions/get", **ident)["status"] == "subscribed"
    assert post(client, path, action="undo", hash_id=h).status_code == 409    # nothing left to undo
    methods = [e["method"] for e in events.list_events(r, 1, "p-42")[0]]
    assert methods == ["manager"] * 4 + ["api"]       # suspend, resume, unsubscribe, undo


def test_undo_refused_after_another_change(api, client):
    _res, ident, sub, path = setup_profile(api)
    post(client, path, action="unsubscribe", hash_id=sub["hash_id"])
    api.ok("subscriptions/set", **ident, status="complained")
    assert post(client, path, action="undo", hash_id=sub["hash_id"]).status_code == 409
    assert api.ok("subscriptions/get", **ident)["status"] == "complained"


def test_suspend_days_are_limited(api, client, r):
    _res, _ident, sub, path = setup_profile(api)
    token = form_token(client.get(path).get_data(as_text=True))
    before = redis_state(r)
    resp = client.post(path, data={"csrf_token": token, "action": "suspend", "hash_id": sub["hash_id"], "days": "7"})
    assert resp.status_code == 400 and redis_state(r) == before


def test_resubscribe_needs_the_link_of_that_subscription(api, client, r):
    _res, ident, sub, path = setup_profile(api)
    other = api.ok("subscriptions/set", **{**ident, "email": "work@example.com"})
    api.ok("subscriptions/set", **{**ident, "email": "work@example.com"}, status="unsubscribed")
    api.ok("subscriptions/set", **ident, status="unsubscribed")
    html = client.get(path).get_data(as_text=True)
    assert html.count('value="resubscribe"') == 1                              # only the link's own subscription
    assert "open the link in a message from Weekly news sent to it" in html    # which message: the resource's
    before = redis_state(r)
    assert post(client, path, action="resubscribe", hash_id=other["hash_id"]).status_code == 403
    assert redis_state(r) == before
    assert post(client, path, action="resubscribe", hash_id=sub["hash_id"]).status_code == 303
    assert api.ok("subscriptions/get", **ident)["status"] == "subscribed"


@pytest.mark.parametrize("status", ["complained", "hardbounced", "invalid"])
def test_final_statuses_cannot_be_resubscribed(api, client, r, status):
    _res, ident, sub, path = setup_profile(api)
    token = form_token(client.get(path).get_data(as_text=True))    # the page has no form once it is final
    api.ok("subscriptions/set", **ident, status=status)
    assert 'value="resubscribe"' not in client.get(path).get_data(as_text=True)
    before = redis_state(r)
    resp = client.post(path, data={"csrf_token": token, "action": "resubscribe", "hash_id": sub["hash_id"]})
    assert resp.status_code == 403
    assert redis_state(r) == before


def test_blocked_resource_cannot_be_switched_off(api, client, r):
    _res, ident, sub, path = setup_profile(api, mode="blocked")
    html = client.get(path).get_data(as_text=True)
    assert 'value="unsubscribe"' not in html and 'value="suspend"' not in html
    assert re.search(r'value="news"\s+checked disabled', html)                  # on, so locked
    assert "(cannot be switched off)" in html                                   # not "required": the resource
    before = redis_state(r)
    assert post(client, path, action="unsubscribe", hash_id=sub["hash_id"]).status_code == 403
    assert redis_state(r) == before
    # Save sends what a browser sends: the disabled boxes are left out, and they stay on; the field is saved.
    assert post(client, path, action="save", hash_id=sub["hash_id"], **{"field.plan": "gold"}).status_code == 303
    got = api.ok("subscriptions/get", **ident)
    assert got["cats"] == sub["cats"] and got["status"] == "subscribed" and got["custom_fields"]["plan"] == "gold"


def test_a_required_category_is_locked_only_while_it_is_on(api, client, r):
    """A required box that is on is disabled (a browser never sends it) and Save keeps it on. One that is off
    (stopped from its own message's link, or made required after the person stopped it) is not locked: Save
    leaves it off unless the person ticks it, and the ledger never says the person switched it on."""
    res, ident, sub, path = setup_profile(api)
    html = client.get(path).get_data(as_text=True)
    assert re.search(r'value="receipts"\s+checked\s+disabled', html)          # on, and locked
    smid = api.ok("messages/links", **ident, category="receipts")["smid"]
    assert client.post(f"/unsubscribe/{smid}", data={"List-Unsubscribe": "One-Click"}).status_code == 200
    assert api.ok("subscriptions/get", **ident)["cats"] == ["news"]
    html = client.get(path).get_data(as_text=True)
    assert re.search(r'value="receipts"\s*>', html) and "cannot be switched off" not in html  # off, switchable
    assert post(client, path, action="save", hash_id=sub["hash_id"], categories=["news"],
                **{"field.plan": "pro"}).status_code == 303
    assert api.ok("subscriptions/get", **ident)["cats"] == ["news"]
    assert events.list_events(r, 1, "p-42")[0][0]["method"] == "one_click"   # no manager event: only the field
    # A box made required after the person switched it off in the manager: it stays off until ticked.
    assert post(client, path, action="save", hash_id=sub["hash_id"], **{"field.plan": "pro"}).status_code == 303
    assert api.ok("subscriptions/get", **ident)["cats"] == []
    api.ok("resources/update", id=res["id"], categories=[
        dict(c, required=True) for c in email_resource()["categories"]])
    assert post(client, path, action="save", hash_id=sub["hash_id"], **{"field.plan": "gold"}).status_code == 303
    got = api.ok("subscriptions/get", **ident)
    assert got["cats"] == [] and got["custom_fields"]["plan"] == "gold"
    assert post(client, path, action="save", hash_id=sub["hash_id"], categories=["receipts"],
                **{"field.plan": "gold"}).status_code == 303
    assert api.ok("subscriptions/get", **ident)["cats"] == ["receipts"]
    event = events.list_events(r, 1, "p-42")[0][0]
    assert event["method"] == "manager" and event["after"]["cats"] == ["receipts"]  # the person's own switch-on
    html = client.get(path).get_data(as_text=True)
    assert re.search(r'value="receipts"\s+checked\s+disabled', html) and re.search(r'value="news"\s*>', html)


@pytest.mark.parametrize("phone, masked", [("+79001234567", "+7••••••4567"), ("+4930123456", "+4•••••3456"),
                                           ("+3531234567", "+3•••••4567"), ("+1234567", "+1••••67"),
                                           ("+298123456", "+2••••••56")])
def test_a_phone_number_shows_at_most_half_of_its_digits(phone, masked):
    from webapp.pages import mask_address
    assert mask_address({"address": {"phone": phone}}) == masked
    digits_shown = sum(c.isdigit() for c in masked)
    assert digits_shown * 2 <= sum(c.isdigit() for c in phone)


def test_one_profiles_token_cannot_touch_another_profile(api, client, r):
    _res, ident_a, sub_a, path_a = setup_profile(api, "alice", "alice@example.com")
    _res_b, ident_b, sub_b, path_b = setup_profile(api, "bob", "bob@example.com")
    assert "b••@example.com" not in client.get(path_a).get_data(as_text=True)
    before = redis_state(r)
    for action in ("unsubscribe", "suspend", "save", "resubscribe"):
        resp = post(client, path_a, action=action, hash_id=sub_b["hash_id"], days="14")
        assert resp.status_code == 404
    assert redis_state(r) == before
    assert api.ok("subscriptions/get", **ident_b)["status"] == "subscribed"


@pytest.mark.parametrize("lang", ["en", "ru"])
@pytest.mark.parametrize("status", [413, 429])
def test_a_form_refused_unread_or_over_the_limit_links_back_to_the_manager(app, api, client, r, status, lang):
    """A manager form refused before anything was read or changed, its body too large (413) or over the forms'
    limit (429), links back to the manager itself, in the language its forms carry: a GET that only reads, here
    for an instant-mode resource's subscription too."""
    _res, ident, sub, path = setup_profile(api, mode="instant")
    html = client.get(f"{path}?lang={lang}").get_data(as_text=True)
    action = re.search(r'<form method="post" action="([^"]+)"', html).group(1).replace("&amp;", "&")
    before = redis_state(r)
    resp = refuse_form(app, client, action, {"csrf_token": form_token(html), "action": "unsubscribe",
                                             "hash_id": sub["hash_id"]}, status)
    assert f'<html lang="{lang}">' in resp.get_data(as_text=True)
    href, words = back_link(resp.get_data(as_text=True)) or (None, None)
    assert words == {"en": "Back to my subscriptions", "ru": "Вернуться к моим подпискам"}[lang]
    assert href == f"{path}/?lang={lang}"
    back = client.get(href)
    page = back.get_data(as_text=True)
    assert back.status_code == 200 and f'<html lang="{lang}">' in page
    assert {"en": "My subscriptions", "ru": "Мои подписки"}[lang] in page and 'role="status"' not in page
    assert redis_state(r) == before and api.ok("subscriptions/get", **ident)["status"] == "subscribed"


@pytest.mark.parametrize("lang,text", [("en", "This link is not valid"), ("ru", "Ссылка недействительна")])
def test_forged_token_gets_a_404_page(api, client, lang, text):
    _res, _ident, _sub, path = setup_profile(api)
    for bad in (path[:-1], path[:-1] + ("A" if path[-1] != "A" else "B"), "/manage/garbage"):
        resp = client.get(bad, headers={"Accept-Language": lang})
        assert resp.status_code == 404 and text in resp.get_data(as_text=True)


@pytest.mark.parametrize("added", [">", ".", ")", ",", '"', " ", "%20", "%3E", ">."])
def test_a_manager_link_with_characters_added_after_it_opens_and_its_forms_work(api, client, r, added):
    """What a mail client or a person adds after a link is never base64url: the token is the text before it
    (tokens.token_in_link). The page's forms post to the link as sent."""
    _res, ident, sub, path = setup_profile(api)
    before = redis_state(r)
    page = client.get(path + added)
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and "My subscriptions" in html
    assert f'action="{path}/?lang=en"' in html
    assert redis_state(r) == before
    resp = client.post(path + added, data={"csrf_token": form_token(html), "action": "unsubscribe",
                                           "hash_id": sub["hash_id"]})
    assert resp.status_code == 303
    assert api.ok("subscriptions/get", **ident)["status"] == "unsubscribed"


def test_head_only_reads_whatever_it_carries(api, client, r):
    """A link scanner's HEAD of the manager link is answered as its GET, and a form in a HEAD changes nothing."""
    _res, ident, sub, path = setup_profile(api)
    token = form_token(client.get(path).get_data(as_text=True))
    before = redis_state(r)
    for form in ({}, {"csrf_token": token, "action": "unsubscribe", "hash_id": sub["hash_id"]}):
        resp = client.open(path, method="HEAD", data=form)
        assert resp.status_code == 200 and resp.headers["Cache-Control"] == "no-store" and resp.data == b""
    assert api.ok("subscriptions/get", **ident)["status"] == "subscribed"
    assert redis_state(r) == before


def test_forms_need_csrf(api, client, r):
    _res, _ident, sub, path = setup_profile(api)
    _res_b, _ident_b, _sub_b, path_b = setup_profile(api, "bob", "bob@example.com")
    other_links_token = form_token(client.get(path_b).get_data(as_text=True))
    token = form_token(client.get(path).get_data(as_text=True))
    before = redis_state(r)
    for data, headers in (({}, {}), ({"csrf_token": other_links_token}, {}), ({"csrf_token": "k1.forged"}, {}),
                          ({"csrf_token": token}, {"Sec-Fetch-Site": "cross-site"}),
                          ({"csrf_token": token}, {"Origin": "https://evil.example"})):
        resp = client.post(path, data={"action": "unsubscribe", "hash_id": sub["hash_id"], **data}, headers=headers)
        assert resp.status_code == 400, (data, headers)
    assert redis_state(r) == before


def test_forms_work_without_cookies_and_across_a_key_rotation(api, app, r, redis_url):
    """The form token is bound to the manager link, not to a session: a mail app's browser that keeps no
    cookies can use the page, and a page opened before the signing keys rotated still saves."""
    from conftest import API_TOKEN, SIGNING_KEYS, close_clients
    from webapp import create_app
    _res, ident, sub, path = setup_profile(api)
    page = app.test_client().get(path)
    assert "Set-Cookie" not in page.headers
    token = form_token(page.get_data(as_text=True))
    rotated = create_app({"TESTING": True, "REDIS_URL": redis_url, "API_TOKEN": API_TOKEN,
                          "VAR_DIR": app.config["VAR_DIR"], "SIGNING_KEYS": SIGNING_KEYS + ",t2:a-newer-secret"})
    try:
        fresh = rotated.test_client()                       # no cookie from the GET above
        resp = fresh.post(path, data={"csrf_token": token, "action": "suspend", "hash_id": sub["hash_id"],
                                      "days": "14"})
        assert resp.status_code == 303 and api.ok("subscriptions/get", **ident)["status"] == "suspended"
        assert form_token(fresh.get(path).get_data(as_text=True)).startswith("t2.")   # new pages: the newest key
    finally:
        close_clients(rotated)


def test_suspension_ends_by_itself(api, app, client, r):
    app.config["SUSPEND_DAY_SECONDS"] = 0.1         # 14 "days" = 1.4 s
    _res, ident, sub, path = setup_profile(api)
    post(client, path, action="suspend", hash_id=sub["hash_id"], days="14")
    assert preferences.resume_due_suspensions(r) == 0                         # not yet
    assert api.ok("subscriptions/get", **ident)["status"] == "suspended"
    time.sleep(1.5)
    assert preferences.resume_due_suspensions(r) == 1
    assert api.ok("subscriptions/get", **ident)["status"] == "subscribed"
    assert events.list_events(r, 1, "p-42")[0][0]["method"] == "suspend_expiry"
    assert r.zcard("us:suspensions:due") == 0
    assert preferences.resume_due_suspensions(r) == 0                         # idempotent


def test_a_pause_taken_again_after_the_sweeper_read_the_old_one_still_ends(api, app, client, r):
    """The sweeper reads the due members, then settles each. A pause that ended by hand (Resume) and was taken
    again in between has a new, later end: settling the old member must leave the entry, now at the new end
    (it was removed, and that pause never ended; CI's race test met it once)."""
    from webapp import keys
    app.config["SUSPEND_DAY_SECONDS"] = 0.02        # 14 "days" = 0.28 s
    _res, ident, sub, path = setup_profile(api)
    member = keys.suspension_member(1, "p-42", sub["hash_id"])
    post(client, path, action="suspend", hash_id=sub["hash_id"], days="14")
    time.sleep(0.3)
    due = r.zrangebyscore(keys.suspensions_due(), "-inf", time.time())    # what the sweeper read
    assert due == [member]
    post(client, path, action="resume", hash_id=sub["hash_id"])
    post(client, path, action="suspend", hash_id=sub["hash_id"], days="90")   # ends 1.8 s from now
    new_end = r.zscore(keys.suspensions_due(), member)
    assert new_end > time.time()
    assert preferences._resume_if_due(r, member, time.time()) == 0           # the sweeper goes on with it
    assert r.zscore(keys.suspensions_due(), member) == new_end
    r.zadd(keys.suspensions_due(), {member: 0})      # a score behind the record's end (older versions' data)
    assert preferences.resume_due_suspensions(r) == 0 and r.zscore(keys.suspensions_due(), member) == new_end
    assert api.ok("subscriptions/get", **ident)["status"] == "suspended"
    time.sleep(max(0.0, new_end - time.time()) + 0.05)
    assert preferences.resume_due_suspensions(r) == 1
    assert api.ok("subscriptions/get", **ident)["status"] == "subscribed"


def test_a_deleted_resources_pause_ends_without_a_change(api, app, client, r):
    app.config["SUSPEND_DAY_SECONDS"] = 0.02        # 14 "days" = 0.28 s
    res, ident, sub, path = setup_profile(api)
    post(client, path, action="suspend", hash_id=sub["hash_id"], days="14")
    api.ok("resources/delete", id=res["id"])
    count = len(events.list_events(r, 1, "p-42")[0])
    time.sleep(0.4)
    assert preferences.resume_due_suspensions(r) == 0                         # out of service: left as it was
    assert len(events.list_events(r, 1, "p-42")[0]) == count and r.zcard("us:suspensions:due") == 0


@pytest.mark.parametrize("unsubscribed_by", ["one_click", "none"])
def test_an_api_suspension_has_no_end_whatever_pause_the_record_had(api, client, r, unsubscribed_by):
    """A manager pause's end stays on the record through a one-click unsubscribe (an Undo brings the pause back);
    subscriptions/set status: suspended then suspends indefinitely, as suspend_all does: no old end shown, and
    the sweeper does not resume it at that end. Over a pause still running, it replaces it the same way."""
    _res, ident, sub, path = setup_profile(api)
    assert post(client, path, action="suspend", hash_id=sub["hash_id"], days="14").status_code == 303
    if unsubscribed_by == "one_click":
        url = api.ok("messages/links", **ident)["unsubscribe_url"].removeprefix("https://unsub.example")
        assert client.post(url, data="List-Unsubscribe=One-Click",
                           content_type="application/x-www-form-urlencoded").status_code == 200
        assert api.ok("subscriptions/get", **ident)["status"] == "unsubscribed"
    got = api.ok("subscriptions/set", **ident, status="suspended")
    assert got["status"] == "suspended" and "suspended_until" not in got
    assert "suspended_until" not in api.ok("subscriptions/get", **ident)
    assert preferences.resume_due_suspensions(r, now=time.time() + 15 * 86400) == 0    # past the old end
    assert api.ok("subscriptions/get", **ident)["status"] == "suspended"


def test_undo_is_only_for_the_link_that_made_the_change(api, client, r):
    """Two addresses of one profile: Y's own manager link unsubscribes Y. X's link may neither resubscribe Y
    (only Y's link may) nor undo Y's change, which would subscribe Y again all the same: its page offers no
    Undo for it, and an Undo posted from it changes nothing. Y's link still undoes its own change."""
    _res, ident, sub_x, path_x = setup_profile(api)
    ident_y = {**ident, "email": "work@example.com"}
    sub_y = api.ok("subscriptions/set", **ident_y)
    path_y = api.ok("messages/links", **ident_y)["manage_url"].removeprefix("https://unsub.example")
    assert post(client, path_y, action="unsubscribe", hash_id=sub_y["hash_id"]).status_code == 303
    assert "Undo last change" in client.get(path_y).get_data(as_text=True)
    assert "Undo last change" not in client.get(path_x).get_data(as_text=True)
    before = redis_state(r)
    assert post(client, path_x, action="resubscribe", hash_id=sub_y["hash_id"]).status_code == 403
    assert post(client, path_x, action="undo", hash_id=sub_y["hash_id"]).status_code == 409
    assert post(client, path_x, action="undo", hash_id=sub_x["hash_id"]).status_code == 409
    assert redis_state(r) == before and api.ok("subscriptions/get", **ident_y)["status"] == "unsubscribed"
    assert post(client, path_y, action="undo", hash_id=sub_y["hash_id"]).status_code == 303
    assert api.ok("subscriptions/get", **ident_y)["status"] == "subscribed"
    # and X's own change is X's to undo, not Y's
    assert post(client, path_x, action="unsubscribe", hash_id=sub_x["hash_id"]).status_code == 303
    assert "Undo last change" not in client.get(path_y).get_data(as_text=True)
    assert post(client, path_y, action="undo", hash_id=sub_x["hash_id"]).status_code == 409
    assert post(client, path_x, action="undo", hash_id=sub_x["hash_id"]).status_code == 303
    assert api.ok("subscriptions/get", **ident)["status"] == "subscribed"


def test_the_page_speaks_the_language_of_the_subscription_whose_link_opened_it(api, client):
    """The manager link in a Russian resource's message (and on its Russian unsubscribe page) opens the manager
    in Russian, even when another of the profile's subscriptions, in English, comes first on the page."""
    ident = {"db_id": 1, "profile_id": "p-42", "channel": "email", "email": "ann@example.com"}
    first = api.ok("resources/add", **email_resource(name="Alpha news", default_locale="en"))
    api.ok("subscriptions/set", **ident, resource_id=first["id"])
    russian = api.ok("resources/add", **email_resource(name="Zeta news", default_locale="ru"))
    api.ok("subscriptions/set", **ident, resource_id=russian["id"])
    links = api.ok("messages/links", **ident, resource_id=russian["id"])
    english = {"Accept-Language": "en"}
    page = client.get(links["unsubscribe_url"].removeprefix("https://unsub.example"), headers=english)
    assert '<html lang="ru">' in page.get_data(as_text=True)
    footer = re.search(r'<footer.*?href="https://unsub.example([^"]+)"', page.get_data(as_text=True), re.S).group(1)
    for path in (links["manage_url"].removeprefix("https://unsub.example"), footer):
        html = client.get(path, headers=english).get_data(as_text=True)
        assert '<html lang="ru">' in html and "Мои подписки" in html, path
        assert html.index("Alpha news") < html.index("Zeta news")               # the order stays by name
    assert '<html lang="en">' in client.get(links["manage_url"].removeprefix("https://unsub.example") + "?lang=en",
                                            headers=english).get_data(as_text=True)   # the switcher still wins


def test_a_manager_link_with_index_html_after_it_is_the_link(api, client, r):
    _res, ident, sub, path = setup_profile(api)
    page = client.get(path + "/index.html")
    assert page.status_code == 200 and "My subscriptions" in page.get_data(as_text=True)
    assert f'action="{path}/?lang=en"' in page.get_data(as_text=True)


def test_a_manager_link_cut_short_says_it_is_incomplete(api, client, r):
    _res, _ident, _sub, path = setup_profile(api)
    token = path.rsplit("/", 1)[1]
    before = redis_state(r)
    for cut in (3, 10, len(token) - 17):
        resp = client.get(f"/manage/{token[:cut]}")
        assert resp.status_code == 404 and "This link is incomplete" in resp.get_data(as_text=True), cut
    assert "This link is incomplete" not in client.get("/manage/garbage").get_data(as_text=True)
    assert redis_state(r) == before
