"""The four unsubscribe modes walked as a person would, in real Chromium, in English and Russian.
Screenshots of every page land in test-artifacts/screens/."""
import pytest

from conftest import email_resource, form_token, screenshot
from webapp import keys

pytestmark = pytest.mark.browser
LANGS = ["en", "ru"]


def link_for(live, mode, category="news", **unsub):
    api = live.api
    res = api.ok("resources/add", **email_resource(unsubscribe={"mode": mode, "timer_minutes": 30, **unsub}))
    ident = {"db_id": 1, "profile_id": "p-42", "resource_id": res["id"], "channel": "email",
             "email": "ann@example.com"}
    api.ok("subscriptions/set", **ident)
    links = api.ok("messages/links", **ident, **({"category": category} if category else {}))
    return links["unsubscribe_url"], ident


def status(live, ident):
    sub = live.api.ok("subscriptions/get", **ident)
    return sub["status"], sub["cats"]


@pytest.mark.parametrize("lang", LANGS)
def test_instant_unsubscribes_on_view_and_undo_restores(live_server, open_page, r, lang):
    url, ident = link_for(live_server, "instant", category=None)
    page = open_page(url, lang)
    page.wait_for_url("**done=unsubscribed**")
    assert status(live_server, ident)[0] == "unsubscribed"
    assert page.locator("h1").inner_text() == {"en": "You are unsubscribed", "ru": "Вы отписаны"}[lang]
    screenshot(page, f"instant-done-{lang}")
    page.locator('button[value="undo"]').dblclick()                          # a second click is not sent
    page.wait_for_url("**done=undone**")
    assert status(live_server, ident)[0] == "subscribed"
    assert page.locator('[role="status"]').is_visible()
    assert not page.locator(".auto-only").is_visible()                           # nothing is on its way
    screenshot(page, f"instant-undone-{lang}")
    other = {"en": "ru", "ru": "en"}[lang]
    page.locator(f'.langs a[hreflang="{other}"]').click()                      # the page in the other language...
    page.wait_for_url(f"**lang={other}**")
    page.wait_for_timeout(300)
    assert "done=undone" in page.url and status(live_server, ident)[0] == "subscribed"  # ...does not act again


SCANNERS = {"webdriver": {"init": "Object.defineProperty(Navigator.prototype, 'webdriver', {get: () => true})"},
            "headless": {"user_agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
                                       "HeadlessChrome/156.0.0.0 Safari/537.36"}}


@pytest.mark.parametrize("scanner", SCANNERS)
@pytest.mark.parametrize("mode", ["instant", "delayed"])
def test_a_browser_an_automation_drives_changes_nothing(live_server, browser, r, mode, scanner):
    """A link scanner that runs the page's script (Safe Links detonating a link in headless Chromium) is not
    the person: the page waits for a click, and says what its button does rather than that it is acting."""
    url, ident = link_for(live_server, mode)
    context = browser.new_context(**({"user_agent": SCANNERS[scanner]["user_agent"]}
                                     if "user_agent" in SCANNERS[scanner] else {}))
    try:
        if "init" in SCANNERS[scanner]:
            context.add_init_script(SCANNERS[scanner]["init"])
        page = context.new_page()
        page.goto(url)
        page.wait_for_load_state("load")
        page.wait_for_timeout(700)
        assert page.evaluate("navigator.webdriver") == (scanner == "webdriver")
        assert status(live_server, ident) == ("subscribed", ["news", "receipts"]) and "done=" not in page.url
        assert r.zcard(keys.pending_due()) == 0                                    # no timer started either
        assert page.locator("h1:visible").inner_text() == "Unsubscribe from Weekly news"
        assert not page.locator(".auto-only").first.is_visible()
        screenshot(page, f"{mode}-scanner-{scanner}")
        page.locator('button[value="{}"]'.format("unsubscribe" if mode == "instant" else "start")).click()
        page.wait_for_url("**done=**")                                          # a click still works
        assert status(live_server, ident)[1] == ["receipts"] or r.zcard(keys.pending_due()) == 1
    finally:
        context.close()


@pytest.mark.parametrize("lang", LANGS)
def test_confirm_needs_the_click(live_server, open_page, r, lang):
    url, ident = link_for(live_server, "confirm")
    page = open_page(url, lang, mobile=(lang == "ru"))
    screenshot(page, f"confirm-{lang}")
    page.wait_for_timeout(300)
    assert status(live_server, ident) == ("subscribed", ["news", "receipts"])   # showing changed nothing
    assert page.locator('input[value="news"]').is_checked()
    page.locator('input[value="news"]').uncheck()                               # nothing chosen: asked again
    page.locator('button[value="unsubscribe"]').click()
    page.locator("#choice-error").wait_for()
    assert page.locator('input[value="news"]').is_visible()
    screenshot(page, f"confirm-nothing-chosen-{lang}")
    page.locator('input[value="news"]').check()
    page.locator('button[value="unsubscribe"]').click()
    page.wait_for_url("**done=unsubscribed**")
    assert status(live_server, ident) == ("subscribed", ["receipts"])           # required category continues
    screenshot(page, f"confirm-done-{lang}")


@pytest.mark.parametrize("lang", LANGS)
def test_blocked_cannot_be_changed(live_server, open_page, r, lang):
    url, ident = link_for(live_server, "blocked")
    page = open_page(url, lang)
    screenshot(page, f"blocked-{lang}")
    assert page.locator("button").count() == 0 and page.locator("form").count() == 0
    page.wait_for_timeout(300)
    assert status(live_server, ident)[0] == "subscribed"


@pytest.mark.parametrize("lang", LANGS)
def test_delayed_shows_countdown_and_cancel_works(live_server, open_page, r, lang):
    url, ident = link_for(live_server, "delayed")
    page = open_page(url, lang)
    page.wait_for_url("**done=started**")
    timer = page.locator('[role="timer"] .left')
    first = timer.inner_text()
    page.wait_for_timeout(1300)
    assert timer.inner_text() != first                                         # it counts down
    screenshot(page, f"delayed-pending-{lang}")
    assert r.zcard(keys.pending_due()) == 1
    page.reload()                                                              # same timer, not a new one
    assert r.zcard(keys.pending_due()) == 1 and page.locator('[role="timer"]').is_visible()
    page.locator('button[value="cancel"]').click()
    page.wait_for_url("**done=cancelled**")
    assert r.zcard(keys.pending_due()) == 0
    assert status(live_server, ident)[0] == "subscribed"
    assert not page.locator(".auto-only").is_visible()
    assert "unless you cancel" not in page.content() and "если не отмените" not in page.content()
    screenshot(page, f"delayed-cancelled-{lang}")


@pytest.mark.parametrize("lang", LANGS)
def test_another_categorys_page_joins_the_running_timer_and_shows_its_widened_scope(live_server, open_page, r,
                                                                                      lang):
    """The News message's page starts the timer; the Promo message's page, opened later, shows that same timer,
    counting down, now stopping News and Promo (what will stop at the deadline), Receipts continuing."""
    api = live_server.api
    cats = [{"title": t, "api_name": t.lower(), "in_manager": True, "required": t == "Receipts"}
            for t in ("News", "Promo", "Receipts")]
    res = api.ok("resources/add", **email_resource(categories=cats, unsubscribe={"mode": "delayed",
                                                                                 "timer_minutes": 30}))
    ident = {"db_id": 1, "profile_id": "p-42", "resource_id": res["id"], "channel": "email",
             "email": "ann@example.com"}
    api.ok("subscriptions/set", **ident)
    news, promo = (api.ok("messages/links", **ident, category=c)["unsubscribe_url"] for c in ("news", "promo"))
    page = open_page(news, lang)
    page.wait_for_url("**done=started**")
    deadline = page.locator('[role="timer"]').get_attribute("data-deadline")
    page = open_page(promo, lang)
    page.wait_for_url("**done=started**")                                     # it joined the timer by itself
    timer = page.locator('[role="timer"]')
    assert timer.get_attribute("data-deadline") == deadline and r.zcard(keys.pending_due()) == 1
    first = timer.locator(".left").inner_text()
    page.wait_for_timeout(1300)
    assert timer.locator(".left").inner_text() != first                       # it counts down
    assert page.locator(".scope ul.stops li").all_inner_texts() == ["News", "Promo"]
    assert page.locator(".scope ul.continues li").all_inner_texts() == ["Receipts"]
    assert page.locator('button[value="cancel"]').is_visible() and page.locator('button[value="now"]').is_visible()
    screenshot(page, f"delayed-widened-{lang}")
    assert status(live_server, ident) == ("subscribed", ["news", "promo", "receipts"])


# What the countdown's live region says as the count passes each moment (seconds left) of a 6-minute timer.
SAID = {"en": {300: "You will be unsubscribed in 5 minutes unless you cancel.",
               240: "You will be unsubscribed in 4 minutes unless you cancel.",
               180: "You will be unsubscribed in 3 minutes unless you cancel.",
               120: "You will be unsubscribed in 2 minutes unless you cancel.",
               60: "You will be unsubscribed in 1 minute unless you cancel.",
               30: "You will be unsubscribed in 30 seconds unless you cancel.",
               10: "You will be unsubscribed in 10 seconds unless you cancel.",
               0: "Time is up: unsubscribing you now."},
        "ru": {300: "Вы будете отписаны через 5 минут, если не отмените.",
               240: "Вы будете отписаны через 4 минуты, если не отмените.",
               180: "Вы будете отписаны через 3 минуты, если не отмените.",
               120: "Вы будете отписаны через 2 минуты, если не отмените.",
               60: "Вы будете отписаны через 1 минуту, если не отмените.",
               30: "Вы будете отписаны через 30 секунд, если не отмените.",
               10: "Вы будете отписаны через 10 секунд, если не отмените.",
               0: "Время вышло: сейчас вы будете отписаны."}}


@pytest.mark.parametrize("lang", LANGS)
def test_delayed_countdown_is_announced_at_its_moments(live_server, browser, r, monkeypatch, lang):
    """The timer is aria-live="off" (read every second it would drown the page); a hidden polite status says a
    sentence at each whole minute, 30 s, 10 s and time up, and nothing in between. Playwright's clock moves
    the page's time: 6 minutes pass in a moment."""
    monkeypatch.setitem(live_server.app.config, "TIME_UNIT_SECONDS", 12)       # 30 "minutes": 6 minutes
    url, ident = link_for(live_server, "delayed")
    context = browser.new_context(locale=lang, extra_http_headers={"Accept-Language": lang})
    try:
        context.set_default_timeout(10_000)
        # The fake clock's time when the countdown starts (pages.js starts it on DOMContentLoaded too).
        context.add_init_script("document.addEventListener('DOMContentLoaded', function () {"
                                " window.loadedAt = Date.now(); })")
        context.clock.install()
        page = context.new_page()
        page.goto(url)
        page.wait_for_url("**done=started**")
        said = page.locator('#time-said[role="status"]')
        assert page.locator('[role="timer"]').get_attribute("aria-live") == "off"
        box = said.bounding_box()
        assert box["width"] <= 1 and box["height"] <= 1                          # heard, not seen
        assert said.text_content() == ""                                          # nothing said on load
        end = page.evaluate("window.loadedAt") + 1000 * int(
            page.locator(".countdown").get_attribute("data-seconds-left"))
        before = ""
        for moment, sentence in SAID[lang].items():
            if moment in (180, 120):  # slept through, as a background tab's timers do: on waking the newest
                before = sentence      # moment passed (2 minutes) is said, once, not the older one
                continue
            page.clock.pause_at((end - 1000 * moment - 1500) / 1000)             # 1.5 s before: still the last one
            assert said.text_content() == before, moment
            page.clock.run_for(2000)
            assert said.text_content() == sentence, moment
            before = sentence
    finally:
        context.close()


@pytest.mark.parametrize("lang", LANGS)
def test_a_timer_cancelled_elsewhere_is_not_started_again_when_the_count_ends(live_server, open_page, r, lang):
    """When its count ends the page reloads itself to show the outcome. The person may have cancelled the
    timer meanwhile in another tab: the reload shows that, and must not start the timer again by itself (an
    opened page starts one): they said no, and would be unsubscribed without knowing."""
    url, ident = link_for(live_server, "delayed", timer_minutes=3)              # 3 s (TIME_UNIT_SECONDS=1)
    page = open_page(url, lang)
    page.wait_for_url("**done=started**")
    other_tab = live_server.app.test_client()
    token = form_token(other_tab.get(url).get_data(as_text=True))
    assert other_tab.post(url, data={"action": "cancel", "csrf_token": token}).status_code == 303
    assert r.zcard(keys.pending_due()) == 0
    with page.expect_event("load", timeout=10_000):                            # the count ended: reloaded
        pass
    page.wait_for_timeout(1000)                                                 # time for a form to be sent
    assert r.zcard(keys.pending_due()) == 0 and page.locator('[role="timer"]').count() == 0
    assert status(live_server, ident) == ("subscribed", ["news", "receipts"])
    assert f"lang={lang}" in page.url                                           # the language kept
    assert page.locator('button[value="start"]').is_visible()                   # it can be started again
    screenshot(page, f"delayed-cancelled-elsewhere-{lang}")


def test_a_second_submit_is_not_sent_until_5_s_have_passed(live_server, browser, r):
    """pages.js's guard: while a submit is on its way a second one is not sent (an Undo's second post would
    find nothing to undo); after 5 s without an answer (the person pressed Stop) the form can be sent again.
    Every POST is answered 204 No Content by the test, so the page stays where it is and nothing reaches the
    server; the page's clock moves only when the test says, and every wait is bounded."""
    url, ident = link_for(live_server, "confirm")
    context = browser.new_context()
    posts = []

    def answer(route):
        return route.fulfill(status=204) if route.request.method == "POST" else route.continue_()

    try:
        context.set_default_timeout(5000)
        context.clock.install()
        page = context.new_page()
        page.route("**/*", answer)
        page.on("request", lambda req: posts.append(req.post_data) if req.method == "POST" else None)
        page.goto(url)
        page.clock.pause_at(page.evaluate("Date.now()") / 1000 + 1)           # from here time moves by run_for
        button = page.locator('button[value="unsubscribe"]')

        def click(sent):
            """Click Unsubscribe; `sent`: whether a POST must follow (else none may, within half a second)."""
            if sent:
                with page.expect_request(lambda req: req.method == "POST", timeout=3000):
                    button.click(no_wait_after=True)
            else:
                button.click(no_wait_after=True)
                page.wait_for_timeout(500)

        click(sent=True)
        page.clock.run_for(4900)
        click(sent=False)                                                       # 4.9 s on: still on its way
        assert len(posts) == 1
        page.clock.run_for(200)
        click(sent=True)                                                        # 5.1 s on: sent again
        assert len(posts) == 2 and all("action=unsubscribe" in body for body in posts)
        assert status(live_server, ident) == ("subscribed", ["news", "receipts"])
    finally:
        context.close()


def test_long_names_and_addresses_fit_a_phone(live_server, open_page, r):
    api = live_server.api
    res = api.ok("resources/add", **email_resource(name="ShopExampleInternationalNewsletterForEveryone"))
    ident = {"db_id": 1, "profile_id": "p-42", "resource_id": res["id"], "channel": "email",
             "email": "customer.service.notifications@mail.internationalbusinessmachinesgroup.example"}
    api.ok("subscriptions/set", **ident)
    links = api.ok("messages/links", **ident)
    for url in (links["unsubscribe_url"], links["manage_url"]):
        page = open_page(url + "?lang=ru", "ru", mobile=True)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390   # no sideways scrolling
    screenshot(page, "manager-long-names-ru")


@pytest.mark.parametrize("lang", LANGS)
def test_bad_link_page(live_server, open_page, lang):
    page = open_page(live_server.url + "/unsubscribe/not-a-real-link", lang)
    assert page.locator("h1").inner_text() == {"en": "This link is not valid",
                                               "ru": "Ссылка недействительна"}[lang]
    screenshot(page, f"bad-link-{lang}")


@pytest.mark.parametrize("lang", LANGS)
def test_too_many_form_posts_get_a_readable_page_that_changes_nothing(live_server, open_page, r, monkeypatch,
                                                                      lang):
    """Over the link's limit a person's click is answered with a page in their language that says nothing was
    changed and when to try again, and fits a phone."""
    monkeypatch.setitem(live_server.app.config, "PAGE_RATE_LIMIT_PER_LINK", "1 per minute")
    url, ident = link_for(live_server, "instant", category=None)
    page = open_page(url, lang, mobile=True)
    page.wait_for_url("**done=unsubscribed**")                                 # the page's own POST: the one allowed
    page.locator('button[value="undo"]').click()
    heading = {"en": "Too many requests", "ru": "Слишком много запросов"}[lang]
    page.locator("h1", has_text=heading).wait_for()
    assert {"en": "Nothing was changed", "ru": "Ничего не изменено"}[lang] in page.locator("main").inner_text()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390         # no sideways scrolling
    assert status(live_server, ident)[0] == "unsubscribed"
    screenshot(page, f"too-many-requests-{lang}")


@pytest.mark.parametrize("lang", LANGS)
def test_the_way_back_from_nothing_to_undo_does_not_unsubscribe_again(live_server, open_page, r, lang):
    """An Undo that comes after another change (the person subscribed again elsewhere) is answered "Nothing to
    undo" (409), with a link back to the page. In a real browser an instant page opened plainly unsubscribes by
    itself: the link's page must not, since the person is subscribed and asked for nothing."""
    url, ident = link_for(live_server, "instant", category=None)
    page = open_page(url, lang, mobile=(lang == "ru"))
    page.wait_for_url("**done=unsubscribed**")
    live_server.api.ok("subscriptions/set", **ident, status="subscribed")        # subscribed again elsewhere
    page.locator('button[value="undo"]').click()
    heading = {"en": "Nothing to undo", "ru": "Отменять нечего"}[lang]
    page.locator("h1", has_text=heading).wait_for()
    screenshot(page, f"nothing-to-undo-{lang}")
    back = page.get_by_role("link", name={"en": "Back to the unsubscribe page",
                                          "ru": "Вернуться на страницу отписки"}[lang])
    assert back.bounding_box()["height"] >= 43.99                               # a tap target (2.5.8)
    back.click()
    page.wait_for_url("**done=back**")
    page.wait_for_load_state("load")
    page.wait_for_timeout(700)                                                  # time for a form to be sent
    assert "done=back" in page.url and f"lang={lang}" in page.url
    assert status(live_server, ident)[0] == "subscribed"
    assert page.locator('button[value="unsubscribe"]').is_visible()              # it waits for a click
    screenshot(page, f"back-from-nothing-to-undo-{lang}")


HEARD = {"en": ("a… at example.com", "+7… ending in 4567"),
         "ru": ("a… в домене example.com", "+7…, последние цифры 4567")}


@pytest.mark.parametrize("lang", LANGS)
def test_masked_addresses_are_read_without_bullets(live_server, open_page, r, lang):
    """"a••@example.com" was read aloud as "a bullet bullet at example dot com": in the accessibility tree the
    bullets are hidden and a readable form stands in their place, in the page's language; on screen the masked
    address is as it was. The unsubscribe page and the manager, an email and a phone."""
    url, ident = link_for(live_server, "confirm", category=None)
    sms = {**ident, "channel": "sms", "email": None, "phone": "+79001234567"}
    live_server.api.ok("subscriptions/set", **sms)
    manage = live_server.api.ok("messages/links", **ident)["manage_url"]
    email, phone = HEARD[lang]
    for target in (url, manage):
        page = open_page(target, lang, mobile=(lang == "ru"))
        tree = page.locator("body").aria_snapshot()
        assert "•" not in tree, tree
        assert email in tree and (target == url or phone in tree), tree
        assert "a••@example.com" in page.locator("main").inner_text()               # seen as before
        if target == url:
            assert page.get_by_text("a••@example.com").first.is_visible()
            assert page.get_by_role("button", name={"en": "Confirm unsubscribe",
                                                    "ru": "Подтвердить отписку"}[lang]).is_visible()
        else:
            assert "+7••••••4567" in page.locator("main").inner_text()
            unsubscribe = {"en": f"Unsubscribe {email} from Weekly news",
                           "ru": f"Отписать {email} от «Weekly news»"}[lang]
            assert page.get_by_role("button", name=unsubscribe, exact=True).count() == 1
            screenshot(page, f"manager-addresses-{lang}")


TARGETS = "a, button, input:not([type=hidden]), select, summary, label"
# Every control's box, except text hidden for screen readers and the skip link while it is off screen.
BOXES = """(selector) => Array.from(document.querySelectorAll(selector))
    .filter((el) => !el.closest('.visually-hidden') && !el.classList.contains('skip') && el.getClientRects().length)
    .map((el) => { const r = el.getBoundingClientRect();
                   return {what: el.outerHTML.slice(0, 90), width: r.width, height: r.height,
                           phone44: el.matches('.langs a, .foot a, .back a, summary, button, select, .check label')}; })"""


@pytest.mark.parametrize("lang", LANGS)
def test_every_tap_target_is_24_px_and_44_px_tall_on_a_phone(live_server, browser, r, lang):
    """WCAG 2.5.8: every link and control on the pages is at least 24×24 CSS px, at a phone's 360 px and on a
    desktop; the language links ("English", "Русский": 19 px high), the footer's link, the way back, "Why am I
    getting this?", buttons and the checkboxes' labels are 44 px tall on a phone."""
    confirm, _ = link_for(live_server, "confirm", category="news")               # checkboxes
    delayed, _ = link_for(live_server, "delayed", category="news")
    api = live_server.api
    res = api.ok("resources/add", **email_resource(name="Instant news", unsubscribe={"mode": "instant"}))
    ident = {"db_id": 1, "profile_id": "p-42", "resource_id": res["id"], "channel": "email",
             "email": "bob@example.com"}                                        # its own address: its own Undo
    api.ok("subscriptions/set", **ident)
    url, manage = (api.ok("messages/links", **ident)[k] for k in ("unsubscribe_url", "manage_url"))
    client = live_server.app.test_client()
    path = url.removeprefix(live_server.url)
    token = form_token(client.get(path).get_data(as_text=True))
    assert client.post(path, data={"action": "unsubscribe", "csrf_token": token}).status_code == 303
    undone = url + "?done=unsubscribed"                                         # Undo, the Manage link
    for width, height in ((360, 740), (1280, 800)):
        context = browser.new_context(locale=lang, viewport={"width": width, "height": height},
                                      extra_http_headers={"Accept-Language": lang})
        try:
            context.set_default_timeout(10_000)
            page = context.new_page()
            for target in (confirm, undone, delayed, manage, live_server.url + "/unsubscribe/nope"):
                page.goto(target)
                if target == delayed:
                    page.locator('[role="timer"]').wait_for()                    # started, or shown again
                page.locator("details.why").first.evaluate("d => d.open = true") if target == manage else None
                boxes = page.evaluate(BOXES, TARGETS)
                assert len(boxes) >= (1 if target.endswith("/nope") else 3), target
                for box in boxes:
                    assert box["width"] >= 23.99 and box["height"] >= 23.99, (width, target, box)
                    if width <= 400 and box["phone44"]:
                        assert box["height"] >= 43.99, (width, target, box)
                assert page.evaluate("document.documentElement.scrollWidth") <= width, target
                name = {confirm: "confirm", undone: "undo", delayed: "delayed", manage: "manager"}.get(target, "bad-link")
                screenshot(page, f"targets-{name}-{width}-{lang}")
        finally:
            context.close()


@pytest.mark.parametrize("added", [">", ").", "%20", "?utm_source=news&utm_medium=email#top", "/index.html"])
def test_a_link_as_mail_clients_and_trackers_leave_it_works_in_a_browser(live_server, open_page, r, added):
    """The instant link with a ">", a full stop, a space, a tracker's parameters or "/index.html" after it: the
    page acts as for the link as sent, and its redirect lands on the link as sent."""
    url, ident = link_for(live_server, "instant", category=None)
    page = open_page(url + added)
    page.wait_for_url("**done=unsubscribed**")
    assert page.url.startswith(url + "/?") or page.url.startswith(url + "?")
    assert status(live_server, ident)[0] == "unsubscribed"
    assert page.locator("h1").inner_text() == "You are unsubscribed"


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("refusal", [409, 413])
def test_another_language_on_an_answer_to_a_form_does_not_unsubscribe_again(live_server, open_page, r, refusal,
                                                                            lang):
    """"Nothing to undo" (an Undo after the person subscribed again elsewhere) and the 413 of a form too large
    show the language switcher. Choosing the other language there must show the page in that language and leave
    the subscription as it is: its link used to open the instant page fresh, which unsubscribed them again."""
    url, ident = link_for(live_server, "instant", category=None)
    page = open_page(url, lang, mobile=(lang == "ru"))
    page.wait_for_url("**done=unsubscribed**")
    live_server.api.ok("subscriptions/set", **ident, status="subscribed")        # subscribed again elsewhere
    if refusal == 413:  # the Undo form, padded past what a page's form may carry
        page.evaluate("""size => { const pad = document.createElement('input');
            Object.assign(pad, {type: 'hidden', name: 'pad', value: 'a'.repeat(size)});
            document.querySelector('button[value="undo"]').form.append(pad); }""",
                      live_server.app.config["PAGE_BODY_LIMIT_BYTES"] + 1)
    page.locator('button[value="undo"]').click()
    heading = {409: {"en": "Nothing to undo", "ru": "Отменять нечего"},
               413: {"en": "This request is too large", "ru": "Слишком большой запрос"}}[refusal][lang]
    page.locator("h1", has_text=heading).wait_for()
    screenshot(page, f"language-links-{refusal}-{lang}")
    other = {"en": "ru", "ru": "en"}[lang]
    page.locator(f'.langs a[hreflang="{other}"]').click()
    page.wait_for_url(f"**lang={other}**")
    page.wait_for_load_state("load")
    page.wait_for_timeout(700)                                                  # time for a form to be sent
    assert status(live_server, ident) == ("subscribed", ["news", "receipts"])
    assert "done=back" in page.url and page.evaluate("document.documentElement.lang") == other
    assert page.locator('button[value="unsubscribe"]').is_visible()              # it waits for a click
    assert page.locator("h1:visible").inner_text() == {"en": "Unsubscribe from Weekly news",
                                                       "ru": "Отписаться от «Weekly news»"}[other]
    screenshot(page, f"language-links-{refusal}-{lang}-then-{other}")
