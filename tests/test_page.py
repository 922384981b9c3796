"""The page for people (SPEC 12): content negotiation at GET /, GET /ui, TOKEN,
and the page itself in a real headless Chromium against real lobbyd processes.

Chromium is the Debian package `chromium` (.ci/run installs it). Without it the
browser tests skip with a reason; with LOBBYD_REQUIRE_ALL=1 (CI) they fail.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest
from browser import Chromium, chromium_binary
from conftest import skip_unless_required, wait_for
from watchclient import SUBJECT, envelope

import lobbyd as L

CHROMIUM_ACCEPT = ("text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,"
                   "image/webp,image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7")
FIREFOX_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
#: what the clients of GET / send: curl, python-requests (lobby-python), Go's net/http
#: (lobbyctl, Prometheus' http_sd sends application/json), and what prefers JSON
JSON_ACCEPTS = [None, "*/*", "application/json", "application/json; charset=utf-8",
                "text/html;q=0.5, application/json", "application/json, text/html",
                "text/html;q=0.9, */*", "text/plain", "text/*", "text/html;q=0",
                "text/html;q=bogus", "application/*"]
HTML_ACCEPTS = [CHROMIUM_ACCEPT, FIREFOX_ACCEPT, "text/html", "TEXT/HTML;Q=1, */*;q=0.1",
                "text/html, application/json;q=0.9"]
FLEET = {"web1.example.com": ["service:web", "location:prague", "public_ip4:192.0.2.1"],
         "db1.example.com": ["service:db", "location:brno"],
         "mail.example.com": ["service:smtp", "prometheus:node"]}
#: what every JSON answer of / and /v1/discoveries carries, exactly (as before the page)
JSON_HEADERS = {"content-type", "content-length", "connection", "x-lobby-index"}


# --------------------------------------------------------------------------- pure


@pytest.mark.parametrize("accept", [a or "" for a in JSON_ACCEPTS])
def test_accept_headers_that_keep_json(accept: str) -> None:
    assert not L.prefers_html(accept)


@pytest.mark.parametrize("accept", HTML_ACCEPTS)
def test_accept_headers_that_prefer_the_page(accept: str) -> None:
    assert L.prefers_html(accept)


def test_the_page_is_self_contained() -> None:
    html = L.PAGE_HTML
    for external in ("http://", "https://", "//fonts", "src=", "@import", "url("):
        assert external not in html, external
    assert html.count("<script>") == 1 and html.count("<style>") == 1
    csp = L.PAGE_HEADERS["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "'unsafe-inline'" not in csp.split("script-src", 1)[1].split(";")[0]


# --------------------------------------------------------------------------- negotiation


def start_guarded(lobbyd, name: str, token: str, **env: str):
    """A daemon with TOKEN set (the fixture's readiness probe has no token)."""
    d = lobbyd(name, start=False, TOKEN=token, **env)
    d.start(wait=False)
    wait_for(lambda: d.request("GET", "/v1/discovery",
                               headers={"Authorization": f"Token {token}"})[0] == 200,
             timeout=15, what=f"{name} API up")
    return d


def publish_fleet(nats, hosts: dict[str, list[str]]) -> None:
    client = nats.client()
    try:
        for name, labels in hosts.items():
            client.publish_json(SUBJECT, envelope(name, labels))
        client.flush()
    finally:
        client.close()


@pytest.fixture
def quiet(lobbyd, nats):
    """A daemon whose registry holds FLEET and does not change: it never publishes,
    and nothing expires, so two answers taken a moment apart are the same bytes."""
    d = lobbyd("quiet", REGISTER="false", TTL="3600")
    # again until heard: a daemon that never publishes is not known to be subscribed
    wait_for(lambda: publish_fleet(nats, FLEET) or sorted(d.hostnames()) == sorted(FLEET),
             interval=0.2, what="the fleet listed")
    return d


@pytest.mark.parametrize("accept", JSON_ACCEPTS)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_root_answers_json_byte_for_byte(quiet, accept: str | None, method: str) -> None:
    headers = {} if accept is None else {"Accept": accept}
    want = quiet.request(method, "/v1/discoveries", headers=headers)
    got = quiet.request(method, "/", headers=headers)
    assert got == want
    status, answer_headers, body = got
    assert status == 200
    assert set(answer_headers) == JSON_HEADERS  # no Vary, nothing new for old clients
    assert answer_headers["content-type"] == "application/json; charset=UTF-8"
    if method == "GET":
        assert sorted(p["hostname"] for p in json.loads(body)) == sorted(FLEET)
    else:
        assert body == b""


def test_root_gzip_answer_unchanged(quiet, nats) -> None:
    # enough hosts for an answer over 1 KiB, which is gzipped when asked
    more = {f"h{i:03d}.example.com": ["service:web"] for i in range(40)}
    wait_for(lambda: publish_fleet(nats, more) or len(quiet.hostnames()) == len(FLEET) + 40,
             interval=0.2, what="40 more hosts")
    headers = {"Accept": "*/*", "Accept-Encoding": "gzip, deflate"}  # python-requests
    want = quiet.request("GET", "/v1/discoveries", headers=headers)
    got = quiet.request("GET", "/", headers=headers)
    assert got == want
    assert got[1]["content-encoding"] == "gzip" and "vary" in got[1]
    assert got[1]["vary"] == "Accept-Encoding"
    assert len(json.loads(gzip.decompress(got[2]))) == len(FLEET) + 40


@pytest.mark.parametrize("accept", HTML_ACCEPTS)
def test_root_answers_the_page_to_browsers(quiet, accept: str) -> None:
    status, headers, body = quiet.request("GET", "/", headers={"Accept": accept})
    assert status == 200
    assert headers["content-type"] == "text/html; charset=UTF-8"
    assert headers["vary"] == "Accept"  # a shared cache must not hand it to curl
    assert headers["cache-control"] == "no-cache"
    assert "x-lobby-index" not in headers
    assert body == L.PAGE_BYTES
    assert not any(name.encode() in body for name in FLEET)  # data comes from the API


def test_ui_is_the_page_whatever_the_accept(quiet) -> None:
    for accept in (None, "*/*", "application/json", CHROMIUM_ACCEPT):
        headers = {} if accept is None else {"Accept": accept}
        status, answer, body = quiet.request("GET", "/ui?labels=service:web", headers=headers)
        assert (status, answer["content-type"], body) == (200, "text/html; charset=UTF-8",
                                                          L.PAGE_BYTES)
        assert "vary" not in answer
    status, answer, body = quiet.request("HEAD", "/ui")
    assert status == 200 and body == b"" and int(answer["content-length"]) == len(L.PAGE_BYTES)
    status, answer, body = quiet.request("HEAD", "/", headers={"Accept": CHROMIUM_ACCEPT})
    assert status == 200 and body == b"" and answer["content-type"].startswith("text/html")
    status, answer, _ = quiet.request("POST", "/ui", body="x")
    assert status == 405 and answer["allow"] == "GET, HEAD"
    status, answer, _ = quiet.request("POST", "/", body="x", headers={"Accept": CHROMIUM_ACCEPT})
    assert status == 405 and answer["allow"] == "GET, HEAD"


def test_token_guards_every_byte_of_data_but_not_the_page(lobbyd, nats) -> None:
    d = start_guarded(lobbyd, "guarded", "s3cret", REGISTER="false", TTL="3600")
    auth = {"Authorization": "Token s3cret"}
    wait_for(lambda: publish_fleet(nats, FLEET) or
             len(d.get_json("/v1/discoveries", headers=auth)) == len(FLEET),
             interval=0.2, what="the fleet listed")
    for path in ("/", "/?labels=service:web", "/ui"):
        status, _, body = d.request("GET", path, headers={"Accept": CHROMIUM_ACCEPT})
        assert (status, body) == (200, L.PAGE_BYTES), path
    for path in ("/", "/v1/discoveries", "/v1/events", "/v1/health", "/metrics"):
        for accept in (None, "*/*", "application/json"):
            headers = {} if accept is None else {"Accept": accept}
            status, _, body = d.request("GET", path, headers=headers)
            assert (status, body) == (403, b"access denied\n"), (path, accept)
    status, _, body = d.request("GET", "/", headers=auth)
    assert status == 200 and len(json.loads(body)) == len(FLEET)


# --------------------------------------------------------------------------- the browser


@pytest.fixture
def browser(tmp_path: Path):
    binary = chromium_binary()
    if not binary:
        skip_unless_required("chromium not found: apt-get install chromium (.ci/run does)")
    chromium = Chromium(binary, tmp_path)
    yield chromium
    chromium.close()


ROWS = "[...document.querySelectorAll('#list .row')]"
HOSTS = f"{ROWS}.map(r => r.dataset.host).sort()"


def row_js(host: str, what: str) -> str:
    return f"(() => {{ const r = document.querySelector('.row[data-host=\"{host}\"]'); " \
           f"return r && {what}; }})()"


#: records, inside the page, every mark each row has shown: a mark lasts 3 s, and
#: polling it over CDP from a busy machine could miss it
WATCH_MARKS = """(() => {
  window.marksSeen = {};
  setInterval(() => {
    for (const r of document.querySelectorAll('#list .row')) {
      for (const mark of ['joined', 'changed', 'left']) {
        if (r.classList.contains(mark)) {
          (marksSeen[r.dataset.host] ||= []).includes(mark) ||
            marksSeen[r.dataset.host].push(mark + ':' + r.textContent);
        }
      }
    }
  }, 20);
  return true;
})()"""


def mark_seen(host: str, mark: str, text: str = "") -> str:
    return (f"(marksSeen['{host}'] || []).some(m => m.startsWith('{mark}:') && "
            f"m.includes({json.dumps(text)}))")


def open_page(browser, d, path: str = "/") -> object:
    page = browser.new_page()
    page.navigate(f"http://127.0.0.1:{d.port}{path}")
    return page


SHOWCASE = {  # simulated hosts around the two real ones: what the README's picture shows
    "db-1.prague.example.com": ["service:postgres", "location:prague", "role:primary",
                                "prometheus:node", "public_ip4:192.0.2.21"],
    "db-2.brno.example.com": ["service:postgres", "location:brno", "role:replica",
                              "prometheus:node", "public_ip4:192.0.2.22"],
    "edge-1.example.com": ["service:haproxy", "location:prague", "public_ip6:2001:db8::10",
                           "prometheus:node:port:9101"],
    "mail.example.com": ["service:smtp", "location:brno", "public_ip4:192.0.2.25"],
    "web-1.prague.example.com": ["service:web", "location:prague", "prometheus:node"],
    "web-2.prague.example.com": ["service:web", "location:prague", "prometheus:node"],
}


def test_page_lists_hosts_labels_and_the_daemons_state(lobbyd, nats, browser, tmp_path) -> None:
    a = lobbyd("a.example.com", LABELS="service:web,location:prague,public_ip4:192.0.2.1",
               TTL="120")
    b = lobbyd("b.example.com", LABELS="service:smtp,plain")
    wait_for(lambda: publish_fleet(nats, SHOWCASE) or len(a.hostnames()) == 2 + len(SHOWCASE),
             interval=0.2, what="a hears b and the simulated hosts")
    page = browser.new_page()
    page.viewport(1200, 660)
    page.navigate(f"http://127.0.0.1:{a.port}/")
    expected = sorted(["a.example.com", "b.example.com", *SHOWCASE])
    assert page.wait_for(f"(h => h.length === {len(expected)} && h)({HOSTS})") == expected
    chips = page.evaluate(row_js("a.example.com", "[...r.querySelectorAll('.chip')].map("
                                 "c => [c.querySelector('.k')?.textContent ?? null, "
                                 "c.querySelector('.v').textContent])"))
    assert chips == [["location", "prague"], ["public_ip4", "192.0.2.1"], ["service", "web"]]
    assert page.evaluate(row_js("b.example.com", "r.querySelector('.chip .v').textContent"
                                " + '|' + r.querySelectorAll('.chip .k').length")) == "plain|1"
    assert page.wait_for(row_js("a.example.com", "/^heard \\d+ s ago$/.test("
                                "r.querySelector('.age').textContent)"))
    assert page.evaluate("document.getElementById('count').textContent") == \
        f"{len(expected)} hosts"
    state = page.wait_for("(t => t.includes('NATS connected') && t)("
                          "document.getElementById('state').innerText)")
    assert f"nats://127.0.0.1:{a.nats.port}" in state and "since" in state
    assert "a.example.com" in page.evaluate("document.getElementById('self').textContent")
    page.evaluate(WATCH_MARKS)
    status, _, _ = b.request("POST", "/v1/labels", "role:relay")
    assert status == 200
    page.wait_for(mark_seen("b.example.com", "changed", "changed"), what="b's change marked")
    page.screenshot(tmp_path / "page.png")
    if os.environ.get("LOBBYD_PAGE_SCREENSHOT"):  # how docs/page.png is made
        shutil.copy(tmp_path / "page.png", os.environ["LOBBYD_PAGE_SCREENSHOT"])
    assert (tmp_path / "page.png").read_bytes().startswith(b"\x89PNG")


def test_page_follows_joins_changes_and_leaves(lobbyd, browser) -> None:
    a = lobbyd("a.example.com", LABELS="service:web")
    page = open_page(browser, a)
    page.wait_for(f"{HOSTS}.length === 1", what="the first host")
    page.evaluate(WATCH_MARKS)
    c = lobbyd("c.example.com", LABELS="service:cache")
    page.wait_for(mark_seen("c.example.com", "joined", "new"), what="c marked as new")
    page.wait_for(row_js("c.example.com", "!/joined|changed|left/.test(r.className)"),
                  what="the mark fading")
    status, _, _ = c.request("POST", "/v1/labels", "role:primary")
    assert status == 200
    page.wait_for(mark_seen("c.example.com", "changed", "primary"), what="c's change marked")
    assert page.evaluate(row_js("c.example.com", "r.textContent.includes('primary')"))
    c.stop()  # SIGTERM: a goodbye
    page.wait_for(mark_seen("c.example.com", "left", "said goodbye"), what="c marked as left")
    page.wait_for(f"JSON.stringify({HOSTS}) === '[\"a.example.com\"]'", what="c gone")
    assert page.evaluate("document.getElementById('count').textContent") == "1 host"


def test_filter_narrows_is_in_the_url_and_keyboard_usable(lobbyd, browser) -> None:
    a = lobbyd("a.example.com", LABELS="service:web,location:prague")
    lobbyd("b.example.com", LABELS="service:smtp,location:brno")
    wait_for(lambda: len(a.hostnames()) == 2, what="a hears b")
    page = open_page(browser, a, "/?labels=service:web")
    assert page.wait_for(f"{HOSTS}.join()") == "a.example.com"
    assert page.evaluate("document.getElementById('filter').value") == "service:web"
    page.evaluate("document.body.focus()")
    page.press("/", "/")
    assert page.evaluate("document.activeElement.id") == "filter"
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") == "solid"
    page.type("location:brno")  # the "/" selected the old text: typing replaces it
    page.wait_for(f"{HOSTS}.join() === 'b.example.com'", what="the filter narrowing to b")
    assert page.evaluate("location.search") == "?labels=location:brno"
    page.press("Escape")
    page.wait_for(f"{HOSTS}.length === 2", what="the filter cleared")
    assert page.evaluate("location.search") == ""
    # prefixes, as the API takes them; a chip's click filters by its label
    page.navigate(f"http://127.0.0.1:{a.port}/ui?prefixes=location:")
    page.wait_for(f"{HOSTS}.length === 2 && "
                  "document.getElementById('mode').value === 'prefixes'", what="prefixes")
    page.evaluate(row_js("b.example.com", "r.querySelector('.chip').click() || true"))
    page.wait_for(f"{HOSTS}.join() === 'b.example.com' && "
                  "location.search === '?labels=location:brno'", what="the chip's filter")


def test_state_ages_tick_and_an_empty_filter_reads_well(lobbyd, browser) -> None:
    a = lobbyd("a.example.com", LABELS="service:web")
    page = open_page(browser, a, "/?prefixes=nomatch")
    STATE = "document.getElementById('state').innerText"
    first = page.wait_for(f"(t => /\\(\\d+ s ago\\)/.test(t) && t)({STATE})")
    # every second, not only at the next poll of /v1/health (5 s)
    page.wait_for(f"{STATE} !== {json.dumps(first)}", timeout=3, what="the age ticking")
    assert page.wait_for("document.getElementById('empty').textContent") == \
        "No host has a label starting with nomatch."
    page.navigate(f"http://127.0.0.1:{a.port}/ui?labels=x:1,y:2")
    assert page.wait_for("(t => t.startsWith('No host') && t)("
                         "document.getElementById('empty').textContent)") == \
        "No host has the label x:1 or y:2."


def test_page_says_it_reconnects_and_does(lobbyd, browser) -> None:
    a = lobbyd("a.example.com", LABELS="service:web")
    page = open_page(browser, a)
    page.wait_for(f"{HOSTS}.length === 1")
    a.stop()
    page.wait_for("document.getElementById('state').innerText.includes('reconnecting') && "
                  "document.getElementById('banner').classList.contains('on')",
                  what="the page saying it reconnects")
    assert page.evaluate(f"{HOSTS}.join()") == "a.example.com"  # the last state stays
    a.env["LABELS"] = "service:web,after:restart"
    a.start()
    page.wait_for(row_js("a.example.com", "r.textContent.includes('restart')") + " && " +
                  "document.getElementById('state').innerText.includes('live') && "
                  "!document.getElementById('banner').classList.contains('on')",
                  timeout=20, what="the page live again after the restart")


def test_token_page_shows_nothing_before_the_token(lobbyd, browser) -> None:
    a = start_guarded(lobbyd, "a.example.com", "s3cret", LABELS="service:web")
    page = open_page(browser, a)
    page.wait_for("document.getElementById('ask').classList.contains('on')",
                  what="the page asking for the token")
    text = page.evaluate("document.documentElement.outerHTML + document.body.innerText")
    assert "a.example.com" not in text
    assert page.evaluate(f"{ROWS}.length") == 0
    page.evaluate("document.getElementById('token').focus()")
    page.type("wrong")
    page.press("Enter")
    page.wait_for("document.getElementById('why').textContent.includes('refused')",
                  what="a wrong token refused")
    assert page.evaluate(f"{ROWS}.length") == 0
    page.evaluate("document.getElementById('token').focus()")
    page.type("s3cret")
    page.press("Enter")
    assert page.wait_for(f"{HOSTS}.join()") == "a.example.com"
    assert page.evaluate("sessionStorage.getItem('lobbyd-token')") == "s3cret"
    assert page.evaluate("localStorage.length") == 0
    assert "s3cret" not in page.evaluate("location.href")
    page.wait_for("document.getElementById('state').innerText.includes('NATS connected')")
    page.evaluate("document.getElementById('forget').click() || true")
    page.wait_for(f"document.getElementById('ask').classList.contains('on') && "
                  f"{ROWS}.length === 0", what="forgetting the token hides the hosts")
    assert "s3cret" not in a.logs()


def test_page_on_a_phone_in_dark_mode(lobbyd, browser, tmp_path) -> None:
    a = lobbyd("a-host-with-a-rather-long-name.example.com",
               LABELS="service:web,location:prague,public_ip4:192.0.2.1,prometheus:node")
    page = browser.new_page()
    page.viewport(390, 844, 2, mobile=True)
    page.colour_scheme("dark")
    page.navigate(f"http://127.0.0.1:{a.port}/")
    page.wait_for(f"{HOSTS}.length === 1")
    assert page.evaluate("document.documentElement.scrollWidth <= innerWidth")
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(14, 17, 22)", background
    page.screenshot(tmp_path / "page-phone-dark.png")


def test_page_shows_the_daemon_losing_and_regaining_nats(lobbyd, nats, browser) -> None:
    a = lobbyd("a.example.com", LABELS="service:web")
    page = open_page(browser, a)
    page.wait_for("document.getElementById('state').innerText.includes('NATS connected')")
    nats.stop()
    state = page.wait_for("(t => t.includes('NATS not connected') && t)("
                          "document.getElementById('state').innerText)", timeout=20,
                          what="the page showing NATS lost")
    assert "since" in state  # (health names no server while disconnected)
    assert page.evaluate("document.querySelector('#state .dot.bad') !== null")
    # cut off from every transport: the page says its list is the last known fleet
    cut = page.wait_for("(e => e.classList.contains('on') && e.innerText)("
                        "document.getElementById('stale'))", timeout=20,
                        what="the page saying it is cut off")
    assert "Cut off from NATS since" in cut and "showing the last known fleet" in cut, cut
    nats.start()
    page.wait_for("document.getElementById('state').innerText.includes('NATS connected')",
                  timeout=30, what="the page showing NATS back")
    page.wait_for("!document.getElementById('stale').classList.contains('on')", timeout=10,
                  what="the cut-off banner gone")


def test_only_the_rows_on_screen_exist_and_scrolling_shows_the_rest(lobbyd, nats,
                                                                    browser) -> None:
    a = lobbyd("a.example.com", LABELS="service:web", TTL="120")
    many = {f"h{i:03d}.example.com": [f"rack:r{i % 7}", "service:batch"] for i in range(400)}
    wait_for(lambda: publish_fleet(nats, many) or len(a.hostnames()) == 401, interval=0.2,
             what="400 simulated hosts")
    page = open_page(browser, a)
    page.wait_for("document.getElementById('count').textContent === '401 hosts'")
    assert page.evaluate(f"{ROWS}.length") < 60  # of 401
    page.evaluate("window.scrollTo(0, document.body.scrollHeight) || true")
    page.wait_for(row_js("h399.example.com", "r.getBoundingClientRect().bottom <= innerHeight"),
                  what="the last host on screen after scrolling down")
    assert page.evaluate(f"{ROWS}.length") < 60
    page.evaluate("document.querySelector('.row[data-host=\"h399.example.com\"] .chip')"
                  ".click() || true")  # rack:r0: every 7th host
    page.wait_for("document.getElementById('count').textContent === "
                  "'58 hosts with labels rack:r0'", what="the chip's filter")
    assert page.evaluate("scrollY") == 0
