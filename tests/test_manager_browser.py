"""The subscription manager walked in real Chromium, in English and Russian, with screenshots."""
import pytest

from conftest import email_resource, screenshot

pytestmark = pytest.mark.browser
HEARD = {"en": "a… at example.com", "ru": "a… в домене example.com"}  # a••@example.com, without its bullets


def manager_link(live, **first):
    api = live.api
    res = api.ok("resources/add", **email_resource(channel_settings={"email": {
        "from_email": "news@shop.example", "list_id": "weekly.shop.example",
        "fields": [{"title": "Age", "api_name": "age", "type": "int", "in_manager": True}]}}))
    ident = {"db_id": 1, "profile_id": "p-42", "resource_id": res["id"], "channel": "email",
             "email": "ann@example.com"}
    api.ok("subscriptions/set", **ident, url="https://shop.example/signup", **first)
    api.ok("subscriptions/set", db_id=1, profile_id="p-42", resource_id=res["id"], channel="sms",
           phone="+79001234567")
    return api.ok("messages/links", **ident)["manage_url"], ident


def in_view(page, locator):
    """Assert that `locator` is shown inside the window as it is scrolled now."""
    box, height = locator.bounding_box(timeout=5000), page.evaluate("innerHeight")
    assert box is not None and 0 <= box["y"] and box["y"] + box["height"] <= height, (box, height)


@pytest.mark.parametrize("lang", ["en", "ru"])
def test_manager_walkthrough(live_server, open_page, r, lang):
    url, ident = manager_link(live_server)
    api = live_server.api
    page = open_page(url, lang, mobile=(lang == "ru"))
    screenshot(page, f"manager-{lang}")
    card = page.locator("article").first

    # toggle a category off and save
    card.locator('input[value="news"]').uncheck()
    card.locator('button[value="save"]').click()
    page.wait_for_url("**done=save**")
    assert api.ok("subscriptions/get", **ident)["cats"] == ["receipts"]
    # "Saved." is shown in the card the page opened at, not above it out of sight; on the last card too.
    for card in (page.locator("article").first, page.locator("article").last):
        card.locator('button[value="save"]').click()
        page.wait_for_url("**done=save**")
        in_view(page, card.locator('[role="status"]'))
    assert page.locator('[role="status"]').count() == 1
    screenshot(page, f"manager-saved-{lang}")
    # ...and its Undo is there too, in sight: not only at the top of a long page
    page.locator("article").last.locator('button[value="unsubscribe"]').click()
    page.wait_for_url("**done=unsubscribe**")
    in_view(page, page.locator("article").last.locator('form.undo button[value="undo"]'))
    page.locator("article").last.locator('form.undo button[value="undo"]').click()
    page.wait_for_url("**done=undo**")
    assert page.locator("form.undo").count() == 0

    # a bad field value: inline error, nothing saved
    card = page.locator("article").first
    card.locator('input[name="field.age"]').fill("thirty")
    card.locator('button[value="save"]').click()
    assert page.locator('[aria-invalid="true"]').count() == 1
    assert page.locator(".error-text").is_visible()
    screenshot(page, f"manager-field-error-{lang}")
    assert api.ok("subscriptions/get", **ident)["custom_fields"] == {}
    card = page.locator("article").first
    card.locator('input[name="field.age"]').fill("30")
    card.locator('button[value="save"]').click()
    page.wait_for_url("**done=save**")
    assert api.ok("subscriptions/get", **ident)["custom_fields"] == {"age": 30}

    # suspend for 14 days: status and resume date shown
    card = page.locator("article").first
    card.locator("select").select_option("14")
    card.locator('button[value="suspend"]').click()
    page.wait_for_url("**done=suspend**")
    sub = api.ok("subscriptions/get", **ident)
    assert sub["status"] == "suspended"
    card = page.locator("article").first
    assert card.locator(".badge.suspended").is_visible()
    assert {"en": "Paused until", "ru": "На паузе до"}[lang] in card.inner_text()
    assert ".." not in card.inner_text()              # a Russian long date ends in "г.": no second full stop
    assert {"en": "Email · ", "ru": "Эл. почта · "}[lang] in card.inner_text()
    screenshot(page, f"manager-suspended-{lang}")

    # resume, unsubscribe all, undo
    card.locator('button[value="resume"]').click()
    page.wait_for_url("**done=resume**")
    assert api.ok("subscriptions/get", **ident)["status"] == "subscribed"
    page.locator("article").first.locator('button[value="unsubscribe"]').click()
    page.wait_for_url("**done=unsubscribe**")
    assert api.ok("subscriptions/get", **ident)["status"] == "unsubscribed"
    screenshot(page, f"manager-unsubscribed-{lang}")
    page.locator('form.undo button[value="undo"]').click()
    page.wait_for_url("**done=undo**")
    assert api.ok("subscriptions/get", **ident)["status"] == "subscribed"
    assert page.locator("form.undo").count() == 0


def test_a_required_category_with_a_long_name_fits_320_px(live_server, open_page, r):
    """WCAG 1.4.10: at 320 CSS px nothing scrolls sideways, in Russian, whose words and the "(required, cannot
    be switched off)" note are long, on the manager and on the unsubscribe pages."""
    api = live_server.api
    res = api.ok("resources/add", **email_resource(unsubscribe={"mode": "confirm"}, categories=[
        {"title": "Новости и специальные предложения магазина", "api_name": "news", "in_manager": True,
         "required": False},
        {"title": "Квитанции, чеки и уведомления о доставке заказов", "api_name": "receipts", "in_manager": True,
         "required": True}]))
    ident = {"db_id": 1, "profile_id": "p-42", "resource_id": res["id"], "channel": "email",
             "email": "ann@example.com"}
    api.ok("subscriptions/set", **ident)
    links = api.ok("messages/links", **ident)
    for url in (links["manage_url"], links["unsubscribe_url"]):
        page = open_page(url + "?lang=ru", "ru", mobile=True)
        page.set_viewport_size({"width": 320, "height": 700})
        assert page.evaluate("document.documentElement.scrollWidth") <= 320, url   # no sideways scrolling
        screenshot(page, "manager-320-ru" if url == links["manage_url"] else "confirm-320-ru")


@pytest.mark.parametrize("lang", ["en", "ru"])
def test_no_two_cards_controls_have_the_same_name(live_server, open_page, r, lang):
    """A card's Save, Pause, Resume and Subscribe again act on that card's subscription only, so their
    accessible names say which (WCAG 2.4.6; a screen reader's list of buttons, a voice command "click Pause"):
    the visible word first, the card's subscription after it, as the Unsubscribe buttons do."""
    url, ident = manager_link(live_server)
    api = live_server.api
    paused = {**ident, "email": "work@example.com"}
    api.ok("subscriptions/set", **paused, status="suspended")
    stopped = api.ok("subscriptions/set", **{**ident, "email": "old@example.com"}, status="unsubscribed")
    page = open_page(url, lang, mobile=True)
    tree = page.locator("main").aria_snapshot()
    names = [line.strip() for line in tree.splitlines() if line.strip().startswith(("- button", "- combobox"))]
    assert len(names) >= 8 and len(names) == len(set(names)), tree
    save = {"en": "Save", "ru": "Сохранить"}[lang]
    assert f'button "{save} (Email · {HEARD[lang]}, Weekly news)"'.replace("Email", {"en": "Email", "ru": "Эл. почта"}[lang]) in tree
    for card in page.locator("article").all():                                # the visible word alone, unchanged
        button = card.locator('button[value="save"]')
        assert button.evaluate("b => b.firstChild.textContent") == save
        box = button.locator(".visually-hidden").first.bounding_box()
        assert box["width"] <= 1 and box["height"] <= 1
    assert page.locator(f'#sub-{stopped["hash_id"]} button[value="resubscribe"]').count() == 0  # another link's
    screenshot(page, f"manager-control-names-{lang}")


MONTHS = {"en": ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
                 "November", "December"],
          "ru": ["января", "февраля", "марта", "апреля", "мая", "июня", "июля", "августа", "сентября", "октября",
                 "ноября", "декабря"]}


def long_date(day, lang):
    return (f"{MONTHS['en'][day.month - 1]} {day.day}, {day.year}" if lang == "en"
            else f"{day.day} {MONTHS['ru'][day.month - 1]} {day.year} г.")


@pytest.mark.parametrize("lang", ["en", "ru"])
def test_manager_dates_are_the_readers_own_or_say_utc(live_server, browser, r, lang):
    """"Paused until" and "You subscribed on" were UTC dates, a day off for a reader far east or west of UTC. They
    are sent as <time datetime="...Z"> saying the UTC date and time and "UTC" (right without scripts), and the
    page's script shows the reader's own date (and time, for the pause) in their time zone."""
    from datetime import datetime, timezone
    from zoneinfo import ZoneInfo
    from conftest import form_token
    registered_at = datetime(2026, 3, 3, 23, 30, tzinfo=timezone.utc)           # 4 March east of UTC+1
    url, ident = manager_link(live_server, date="2026-03-03T23:30:00Z")
    api = live_server.api
    other = live_server.app.test_client()
    path = url.removeprefix(live_server.url)
    sub = api.ok("subscriptions/get", **ident)
    resp = other.post(path, data={"csrf_token": form_token(other.get(path).get_data(as_text=True)),
                                  "action": "suspend", "days": "14", "hash_id": sub["hash_id"]})
    assert resp.status_code == 303
    until = datetime.fromisoformat(api.ok("subscriptions/get", **ident)["suspended_until"].replace("Z", "+00:00"))
    # A zone where the pause's last day is not its UTC date: 14 hours east of UTC, or 11 west.
    zone = "Pacific/Kiritimati" if until.hour >= 10 else "Pacific/Pago_Pago"
    local_until = until.astimezone(ZoneInfo(zone))
    assert local_until.date() != until.date()
    for scripts in (True, False):
        context = browser.new_context(locale=lang, timezone_id=zone, java_script_enabled=scripts,
                                      extra_http_headers={"Accept-Language": lang}, viewport={"width": 390, "height": 844})
        try:
            context.set_default_timeout(5000)
            page = context.new_page()
            page.goto(url + f"?lang={lang}")
            card = page.locator("article").first
            card.locator("details.why summary").click()
            spaced = str.maketrans({"\u202f": " ", "\xa0": " "})                 # CLDR's narrow and no-break spaces
            paused = card.locator("p", has_text={"en": "Paused until", "ru": "На паузе до"}[lang]).inner_text()
            paused = paused.translate(spaced)
            registered = card.locator("details.why p").inner_text().translate(spaced)
            if scripts:
                assert long_date(local_until, lang) in paused and "UTC" not in paused, paused
                assert long_date(registered_at.astimezone(ZoneInfo(zone)), lang) in registered, registered
                assert "UTC" not in registered
            else:
                assert long_date(until, lang) in paused and paused.rstrip(".").endswith("UTC"), paused
                assert long_date(datetime(2026, 3, 3), lang) in registered and "UTC" in registered, registered
            assert card.locator("time").first.get_attribute("datetime") == until.strftime("%Y-%m-%dT%H:%M:%SZ")
            screenshot(page, f"manager-dates-{lang}-{'script' if scripts else 'noscript'}")
        finally:
            context.close()
