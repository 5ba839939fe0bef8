/*
 * AkUnsub: the unsubscribe SDK for a customer's own unsubscribe page. Dependency-free ES2017, no build step.
 *
 *   <script src="https://UNSUB-HOST/ak_list_unsubscribe.js?id=MXwx"></script>
 *   <script>const akUnsub = new AkUnsub();</script>
 *
 * new AkUnsub({rtoken?, pxl_domain?})
 *   pxl_domain: where the unsubscribe service is, "host[:port]" (https is assumed) or "http(s)://host[:port][/prefix]";
 *   by default the host that served this script. rtoken: the resource token, checked by the service when given.
 * akUnsub.confirmUnsub(smid?, categories?) / akUnsub.cancelUnsub(smid?, categories?)
 *   Promises resolving with the resulting state {mode, result, status, cats, categories, pending} or rejecting
 *   with an Error whose message says what went wrong (err.status and err.reason carry the details). With no
 *   smid, the SMID found in the page's URL is used. AkUnsub.confirmUnsub(...) / AkUnsub.cancelUnsub(...) call
 *   the last constructed instance. A smid that is neither a string nor nothing (an array: the categories put
 *   first) is refused.
 *
 * The SMID in the page's URL: put {send_message_id} into the resource's page_url as a query parameter, e.g.
 * https://shop.example/unsubscribe?smid={send_message_id}. Parameters named "smid" or "send_message_id" (in the
 * query or the #fragment) are tried first, then anything else in the URL that looks like a SMID (another
 * parameter's value, a bare ?SMID or #SMID, a path segment); the service decides which one verifies.
 * When one is found, constructing AkUnsub does what the hosted page does when shown (once the page is visible):
 * instant mode unsubscribes, delayed mode starts the timer, confirm mode waits for confirmUnsub. The outcome is
 * the promise akUnsub.ready (null when the URL has no SMID); akUnsub.smid is the SMID it used. Only the first
 * instance in a page does this; another one constructed later for the same URL reads the state (also after this
 * script was loaded a second time: the first load's AkUnsub stays, and one page serves one resource). In a browser an
 * automation drives (navigator.webdriver) or a headless one, a link scanner's, it changes nothing and waits
 * for confirmUnsub as in confirm mode.
 */
(function (global) {
  "use strict";

  // Filled in by /ak_list_unsubscribe.js?id=...: {"pxl_domain": "...", "resource_id": N}.
  const SERVED = /*@ak-defaults*/null;
  // This script loaded again in the same page (a tag manager adds the tag, and so does the page's template): keep
  // the AkUnsub the first load defined, and with it its record of what was shown (below, `shows`) and its last
  // instance. A second definition would start with an empty record, and the next construction would show the
  // link again: in delayed mode, a new timer after "Keep my subscription". The first one loaded is kept whatever
  // the second is (another version, another resource or service: AkUnsub can only be one of them; the page is
  // warned when the second is for another resource). One that was not served for a resource (its file loaded
  // from /static/) is useless and replaced.
  const LOADED = Symbol.for("AkUnsub.served");
  const earlier = typeof global.AkUnsub === "function" ? global.AkUnsub[LOADED] : null;
  if (earlier && earlier.resource_id) {
    if (SERVED && (SERVED.resource_id !== earlier.resource_id || SERVED.pxl_domain !== earlier.pxl_domain) &&
        global.console) {
      const where = (served) => "resource " + served.resource_id +
        (SERVED.pxl_domain !== earlier.pxl_domain ? " (at " + served.pxl_domain + ")" : "");
      console.warn("AkUnsub: this page loads the script of " + where(SERVED) + " as well as that of " +
        where(earlier) + "; the first one loaded is kept: use one resource per page");
    }
    return;
  }
  const script = document.currentScript;
  const SCRIPT_ORIGIN = script && script.src ? new URL(script.src, location.href).origin : location.origin;
  const PREFERRED_PARAMS = ["smid", "send_message_id"];
  const MAX_CANDIDATES = 3;
  // How long a call waits for the service's whole answer, then for the probe that explains a failure. The
  // service itself gives up on its storage after REDIS_TIMEOUT_SECONDS (5 s), a few times at most.
  const CALL_TIMEOUT_MS = 20000;
  const PROBE_TIMEOUT_MS = 10000;
  const TIMED_OUT = {};
  const AUTOMATED = navigator.webdriver === true || /HeadlessChrome|PhantomJS/.test(navigator.userAgent);
  let lastInstance = null;
  // The show of each set of SMIDs in this page, by the first instance that made it: a page constructing AkUnsub
  // again (a component mounted twice, or again after a route change) must not show the link a second time,
  // which would start a new timer after "Keep my subscription". Later instances read the state instead.
  const shows = new Map();
  // The origins this page's Content-Security-Policy refused a connection to: a fetch it blocks fails like a
  // network error, and trying again would never help.
  const cspRefused = new Set();
  document.addEventListener("securitypolicyviolation", (event) => {
    if ((event.effectiveDirective || event.violatedDirective || "").indexOf("connect-src") !== 0) return;
    try {
      cspRefused.add(new URL(event.blockedURI).origin);
    } catch (e) {
      // not a URL ("inline", "eval"): not ours
    }
  });

  function typeName(value) {
    if (Array.isArray(value)) return "an array";
    if (value === null) return "null";
    return (/^[aeiou]/.test(typeof value) ? "an " : "a ") + typeof value;
  }

  // "host[:port]" (https assumed) or "http(s)://host[:port][/prefix]", as the service's base URL.
  function normalizeDomain(value) {
    const bad = () => new TypeError("AkUnsub: pxl_domain must be a host or an http(s) URL, got " + value);
    if (typeof value !== "string") throw bad();
    const text = value.trim().replace(/\/+$/, "");
    let url;
    try {
      url = new URL(/^[A-Za-z][A-Za-z0-9+.-]*:\/\//.test(text) ? text : "https://" + text);
    } catch (e) {
      throw bad();
    }
    if ((url.protocol !== "https:" && url.protocol !== "http:") || url.username || url.password || url.search ||
        url.hash || !/^([A-Za-z0-9_-]+\.)*[A-Za-z0-9_-]+$|^\[[0-9A-Fa-f:.]+\]$/.test(url.hostname)) {
      throw bad();
    }
    return (url.origin + url.pathname).replace(/\/+$/, "");  // a path prefix (service mounted under one) is kept
  }

  function checkedOptions(options) {
    if (options === undefined || options === null) return {};
    if (typeof options !== "object" || Array.isArray(options)) {
      throw new TypeError("AkUnsub: the options must be an object {rtoken?, pxl_domain?}, got " + typeName(options));
    }
    Object.keys(options).forEach((name) => {
      if (name !== "rtoken" && name !== "pxl_domain" && global.console) {
        console.warn("AkUnsub: unknown option " + name + " (the options are rtoken and pxl_domain)");
      }
    });
    const rtoken = options.rtoken;
    if (rtoken !== undefined && rtoken !== null && typeof rtoken !== "string") {
      throw new TypeError("AkUnsub: rtoken must be a string (the resource token), got " + typeName(rtoken));
    }
    return options;
  }

  // A SMID is base64url of a record whose first byte is its format (1); the service checks the signature.
  function looksLikeSmid(value) {
    if (!/^[A-Za-z0-9_-]{20,160}$/.test(value)) return false;
    try {
      return atob(value.slice(0, 4).replace(/-/g, "+").replace(/_/g, "/")).charCodeAt(0) === 1;
    } catch (e) {
      return false;
    }
  }

  // Where a page_url's {send_message_id} may have put the SMID: a query or #fragment parameter (those named smid
  // or send_message_id first; a fragment may hold a client-side route with a query of its own, "#/u?smid="),
  // or anywhere else: a path segment, the whole query or fragment ("?{send_message_id}"), a route's segment,
  // before an extension. Returns {values, named}: the values to try, in order, and those found under one of the
  // two names (a value that only looks like a SMID may be some tracking code).
  function smidCandidates(loc) {
    const found = [];
    const named = new Set();
    const decode = (v) => { try { return decodeURIComponent(v); } catch (e) { return ""; } };
    const add = (v) => { if (v && looksLikeSmid(v) && found.indexOf(v) < 0) found.push(v); };
    const pairs = (loc.search.slice(1) + "&" + loc.hash.slice(1)).split(/[?&#;]/).map((pair) => {
      const eq = pair.indexOf("=");
      return eq < 0 ? null : [decode(pair.slice(0, eq).replace(/^.*[/!]/, "")), decode(pair.slice(eq + 1))];
    }).filter(Boolean);
    PREFERRED_PARAMS.forEach((name) => pairs.forEach(([key, value]) => {
      if (key !== name) return;
      add(value);
      named.add(value);
    }));
    // A SMID is base64url: the characters around one (/ ? # & = . ; !) are never part of it.
    (loc.search + " " + loc.hash + " " + loc.pathname).split(/[^A-Za-z0-9_%-]+/).forEach((piece) => add(decode(piece)));
    return {values: found.slice(0, MAX_CANDIDATES), named: named};
  }

  function whenVisible() {
    return new Promise((resolve) => {
      if (document.visibilityState === "visible") return resolve();
      const onChange = () => {
        if (document.visibilityState !== "visible") return;
        document.removeEventListener("visibilitychange", onChange);
        resolve();
      };
      document.addEventListener("visibilitychange", onChange);
    });
  }

  function sdkError(message, status, reason) {
    const err = new Error(message);
    err.name = "AkUnsubError";
    err.status = status || 0;
    err.reason = reason;  // one of the README's list: each call here names its own
    return err;
  }

  // fetch(url, init) and its JSON body (null when it is not JSON), given up after `ms`: a server that accepts
  // the connection and never answers (or stops half-way through the body) would leave the promise pending
  // forever. Rejects with TIMED_OUT then, with fetch's own error otherwise.
  async function fetchJson(url, init, ms) {
    const controller = new AbortController();
    let timedOut = false;
    const timer = setTimeout(() => { timedOut = true; controller.abort(); }, ms);
    try {
      const response = await fetch(url, Object.assign({signal: controller.signal}, init));
      let data = null;
      try {
        data = await response.json();
      } catch (e) {
        if (timedOut) throw e;
      }
      return {response: response, data: data};
    } catch (e) {
      throw timedOut ? TIMED_OUT : e;
    } finally {
      clearTimeout(timer);
    }
  }

  // Every answer of the service is a JSON object whose `error` is a number (0 on success); anything else came from
  // another server: a pxl_domain that reaches a web site, a proxy's error page.
  function isServiceAnswer(data) {
    return data !== null && typeof data === "object" && typeof data.error === "number";
  }

  function notTheService(pxlDomain, status) {
    return sdkError("The answer from " + pxlDomain + " (HTTP " + status + ") was not the unsubscribe service's: " +
      "check pxl_domain", status, "not_the_service");
  }

  function reported(promise) {
    // The page may not look at akUnsub.ready: say what went wrong in the console instead of an unhandled rejection.
    promise.catch((err) => { if (global.console) console.warn("AkUnsub:", err.message); });
    return promise;
  }

  class AkUnsub {
    constructor(options) {
      const opts = checkedOptions(options);
      const served = SERVED || {};
      this.rtoken = opts.rtoken || null;
      const given = opts.pxl_domain === undefined || opts.pxl_domain === null || opts.pxl_domain === "" ? null
        : opts.pxl_domain;
      this.pxlDomain = normalizeDomain(given !== null ? given : served.pxl_domain || SCRIPT_ORIGIN);
      this.resourceId = served.resource_id || null;
      const found = smidCandidates(location);
      this.candidates = found.values;
      this.namedCandidates = found.named;
      this.smid = this.candidates[0] || null;
      lastInstance = this;
      this.ready = reported(this.candidates.length ? this._showOnce() : Promise.resolve(null));
    }

    confirmUnsub(smid, categories) {
      return this._call("confirm", smid, categories);
    }

    cancelUnsub(smid, categories) {
      return this._call("cancel", smid, categories);
    }

    static confirmUnsub(smid, categories) {
      return AkUnsub._last().then((sdk) => sdk.confirmUnsub(smid, categories));
    }

    static cancelUnsub(smid, categories) {
      return AkUnsub._last().then((sdk) => sdk.cancelUnsub(smid, categories));
    }

    static _last() {
      return lastInstance ? Promise.resolve(lastInstance)
        : Promise.reject(sdkError("AkUnsub: create it first with new AkUnsub()", 0, "not_initialised"));
    }

    _showOnce() {
      const key = JSON.stringify([this.pxlDomain, this.resourceId, this.candidates]);
      const earlier = shows.get(key);
      // After an earlier instance's show succeeded, only read; after it failed (a network error), show again.
      const mine = earlier ? earlier.then(() => this._show("state"), () => this._show("show"))
        : whenVisible().then(() => this._show("show"));
      shows.set(key, mine);
      return mine;
    }

    async _show(action) {
      let lastError = null;
      for (const smid of this.candidates) {
        try {
          const state = await this._call(AUTOMATED ? "state" : action, smid);
          this.smid = smid;
          return state;
        } catch (err) {
          if (err.reason !== "unknown_smid") throw err;  // only an unverifiable value makes us try the next one
          lastError = err;
        }
      }
      this.smid = null;
      // None verified. Under a SMID's own name that is an error to show; otherwise the values only looked like
      // SMIDs (a tracking code can), and the page simply has none.
      if (this.candidates.some((c) => this.namedCandidates.has(c))) throw lastError;
      return null;
    }

    async _call(action, smid, categories) {
      // Nothing (undefined, null, "") or the click event of `onclick = AkUnsub.confirmUnsub`: the page's own SMID.
      // Anything else that is not a string is a mistake (the categories where the SMID goes): refused, not
      // replaced by the page's SMID, which would stop more than was asked.
      const given = smid === undefined || smid === null || smid === "" || smid instanceof Event ? null : smid;
      if (given !== null && typeof given !== "string") {
        throw sdkError("AkUnsub: the SMID (first argument) must be a string, got " + typeName(given) +
          "; the categories come second: confirmUnsub(smid, ['news'])", 0, "invalid");
      }
      const id = given || this.smid;
      if (typeof id !== "string" || !id) {
        throw sdkError("AkUnsub: a SMID is required (none was given and none is in the page's URL)", 0, "invalid");
      }
      if (categories !== undefined && categories !== null &&
          (!Array.isArray(categories) || !categories.every((c) => typeof c === "string"))) {
        throw sdkError("AkUnsub: categories must be an array of category names", 0, "invalid");
      }
      if (!this.resourceId) {
        throw sdkError("AkUnsub: load this script from /ak_list_unsubscribe.js?id=... (the resource is unknown)",
          0, "not_initialised");
      }
      const body = {smid: id, action: action, resource_id: this.resourceId};
      if (categories) body.categories = categories;
      if (this.rtoken) body.rtoken = this.rtoken;
      const base = this.pxlDomain + "/sdk/v1/" + encodeURIComponent(this.resourceId);
      let response, data;
      try {
        // No cache: "no-store" here: with it Chromium skips its preflight cache and every call costs two round
        // trips. A POST's answer is never cached, and the service's carry Cache-Control: no-store anyway.
        ({response, data} = await fetchJson(base + "/unsubscribe", {
          method: "POST", mode: "cors", credentials: "omit", referrerPolicy: "no-referrer",
          headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
        }, CALL_TIMEOUT_MS));
      } catch (e) {
        if (e === TIMED_OUT) {  // the request may have been acted on: no probe, just say so
          throw sdkError("The unsubscribe service at " + this.pxlDomain + " did not answer in time; please try " +
            "again", 0, "timeout");
        }
        throw await this._explainFailure(base);
      }
      if (!isServiceAnswer(data)) throw notTheService(this.pxlDomain, response.status);
      if (!response.ok || data.error) {
        let message = data.error_text || ("the unsubscribe service answered HTTP " + response.status);
        const retry = parseInt(response.headers.get("Retry-After"), 10);
        if (response.status === 429 && retry >= 0) message += " (try again in " + retry + " s)";
        throw sdkError(message, response.status, data.reason || (response.status === 429 ? "rate_limited" : "error"));
      }
      delete data.error;
      return data;
    }

    // A refused preflight, a network failure and an answer without CORS headers (a 503 while the service's
    // storage is down) look the same to a script; ask which one it was.
    async _explainFailure(base) {
      try {
        const {response: probe, data: info} = await fetchJson(base + "/origin",
          {credentials: "omit", cache: "no-store", referrerPolicy: "no-referrer"}, PROBE_TIMEOUT_MS);
        // A server that lets any page read it (a CDN, a static site) but is not the service refuses the preflight
        // and answers this: say so rather than "network error".
        if (!isServiceAnswer(info) && !(info && typeof info.allowed === "boolean")) {
          return notTheService(this.pxlDomain, probe.status);
        }
        if (probe.status === 404) return sdkError(info.error_text, 404, "unknown_resource");
        if (probe.status === 503) return sdkError(info.error_text, 503, info.reason || "unavailable");
        if (info && info.allowed === false) {
          return sdkError("This page's origin " + location.origin + " is not allowed to unsubscribe for this " +
            "resource: add it to the resource's URLs", 403, "forbidden_origin");
        }
      } catch (e) {
        // unreachable too: a network failure, or this page's policy refused both
      }
      await new Promise((resolve) => setTimeout(resolve, 0));  // the policy's violation events come as tasks
      const origin = new URL(this.pxlDomain).origin;
      if (cspRefused.has(origin)) {
        return sdkError("This page's Content-Security-Policy does not allow connecting to the unsubscribe " +
          "service at " + origin + ": add it to the policy's connect-src", 0, "csp");
      }
      return sdkError("Could not reach the unsubscribe service at " + this.pxlDomain +
        " (network error); please try again", 0, "network");
    }
  }

  Object.defineProperty(AkUnsub, LOADED, {value: Object.freeze(Object.assign({}, SERVED))});
  global.AkUnsub = AkUnsub;
})(window);
