// Pages reached from a message. No state changes on load: a scanner that only fetches the page changes
// nothing. When a real browser shows the page, the instant and delayed modes POST their form once.
(function () {
  "use strict";
  // A browser an automation drives (navigator.webdriver, as WebDriver, Puppeteer and Playwright set it) or a
  // headless one is a link scanner, not the person: its page waits for a click like a page without scripts.
  var automated = navigator.webdriver === true || /HeadlessChrome|PhantomJS/.test(navigator.userAgent);
  document.documentElement.classList.add("js");
  if (!automated) document.documentElement.classList.add("auto");

  function autoSubmit(form) {
    var action = form.getAttribute("data-auto-submit");
    var button = form.querySelector('button[name="action"][value="' + action + '"]');
    var sent = false;
    function go() {
      if (sent || document.visibilityState !== "visible") return;
      sent = true;
      if (form.requestSubmit) { form.requestSubmit(button); } else { button.click(); }
    }
    go();
    document.addEventListener("visibilitychange", go);
  }

  function countdown(el) {
    var left = parseInt(el.getAttribute("data-seconds-left"), 10);
    if (isNaN(left)) return;
    var end = Date.now() + left * 1000;  // relative to this page load: the client clock may be off
    var out = el.querySelector(".left");
    // The timer is not read aloud every second; a polite status says the template's sentence for each moment
    // (data-say-<seconds left>) as the count passes it.
    var said = document.getElementById(el.getAttribute("data-announce") || "");
    var moments = said ? Array.prototype.map.call(said.attributes, function (a) {
      var m = /^data-say-(\d+)$/.exec(a.name);
      return m ? parseInt(m[1], 10) : -1;
    }).filter(function (n) { return n >= 0; }) : [];
    var last = left;
    function tick() {
      var s = Math.max(0, Math.round((end - Date.now()) / 1000));
      out.textContent = Math.floor(s / 60) + ":" + String(s % 60).padStart(2, "0");
      // The latest moment passed since the last tick: a throttled background tab skips seconds, and waking it
      // should say the time left now, once, not every moment it slept through.
      var due = moments.filter(function (n) { return n >= s && n < last; });
      if (due.length) said.textContent = said.getAttribute("data-say-" + Math.min.apply(null, due));
      last = s;
      if (s <= 0) {
        clearInterval(timer);
        // The server settles the timer within 2 s of the deadline; then show the result. The reload is this
        // script's, not the person opening the link again: it carries done=started, which keeps the page from
        // starting a new timer by itself (one cancelled meanwhile, in another tab, stays cancelled).
        setTimeout(function () {
          var query = location.search.replace(/([?&])done=[^&]*&?/, "$1").replace(/[?&]$/, "");
          location.replace(location.pathname + query + (query ? "&" : "?") + "done=started");
        }, 2500);
      }
    }
    var timer = setInterval(tick, 1000);
    tick();
  }

  // A second click while the first submit is on its way would send the action twice (an Undo's second post
  // finds nothing to undo). Back from the next page (bfcache), or a few seconds without an answer (the person
  // pressed Stop), lets the form be sent again.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (form.getAttribute("data-sent")) { event.preventDefault(); return; }
    form.setAttribute("data-sent", "1");
    setTimeout(function () { form.removeAttribute("data-sent"); }, 5000);
  });
  window.addEventListener("pageshow", function (event) {
    if (!event.persisted) return;
    Array.prototype.forEach.call(document.querySelectorAll("form[data-sent]"), function (form) {
      form.removeAttribute("data-sent");
    });
  });

  // Dates are sent in UTC, said so (<time datetime="...Z">14 December 2026, 23:00 UTC</time>): here they are
  // put in the reader's own time zone and the page's language, a date (data-local="date") or a date and time.
  function localTime(el) {
    var moment = new Date(el.getAttribute("datetime"));
    if (isNaN(moment.getTime()) || !window.Intl) return;
    var options = el.getAttribute("data-local") === "datetime" ? {dateStyle: "long", timeStyle: "short"}
                                                                : {dateStyle: "long"};
    try {
      el.textContent = new Intl.DateTimeFormat(document.documentElement.lang || undefined, options).format(moment);
    } catch (e) { /* an old browser without dateStyle: the UTC text stays, which is correct */ }
  }

  document.addEventListener("DOMContentLoaded", function () {
    Array.prototype.forEach.call(document.querySelectorAll("time[data-local]"), localTime);
    if (!automated) Array.prototype.forEach.call(document.querySelectorAll("form[data-auto-submit]"), autoSubmit);
    Array.prototype.forEach.call(document.querySelectorAll(".countdown"), countdown);
  });
})();
