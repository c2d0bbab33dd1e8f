"""The leaderboard site in headless Chromium (Debian's `chromium`; skipped without it): rank order, sorting,
links, console errors, phone width. Screenshots go to `test-artifacts/`."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from memeval.leaderboard import build_site
from test_leaderboard import ARTIFACTS, EXPECTED, FIXTURES

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class CDP:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws_url: str):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=20, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_event(self, name: str, timeout: float = 15.0) -> dict:
        end = time.time() + timeout
        for i, ev in enumerate(self.events):
            if ev.get("method") == name:
                return self.events.pop(i)
        while time.time() < end:
            msg = json.loads(self.ws.recv())
            if msg.get("method") == name:
                return msg
            self.events.append(msg)
        raise TimeoutError(name)

    def eval(self, expr: str):
        res = self.send("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(res["exceptionDetails"])
        return res["result"].get("value")

    def goto(self, url: str) -> None:
        self.events = [e for e in self.events if e.get("method") != "Page.loadEventFired"]
        self.send("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")

    def errors(self) -> list[str]:
        errs = []
        for ev in self.events:
            m, p = ev.get("method"), ev.get("params", {})
            if m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                errs.append(f"{(d.get('exception') or {}).get('description') or d.get('text')} ({d.get('url', '')})")
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errs.append(json.dumps(p.get("args", []))[:300])
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                errs.append(f"{p['entry'].get('text')} {p['entry'].get('url', '')}")
        return errs


@pytest.fixture(scope="module")
def served_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("served") / "site"
    stats = build_site([FIXTURES], site)
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", stats, site
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium; CI installs it)")
    pytest.importorskip("websocket", reason="websocket-client is needed to drive chromium (test extra)")
    profile = Path(tempfile.mkdtemp(prefix="memeval-chromium-"))
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-port=0",
         "--remote-allow-origins=*", "--window-size=1280,900", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        end = time.time() + 20
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.time() > end or proc.poll() is not None:
                pytest.fail("chromium did not start (no DevToolsActivePort)")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(t for t in targets if t["type"] == "page")
        cdp = CDP(page["webSocketDebuggerUrl"])
        for domain in ("Page", "Runtime", "Log"):
            cdp.send(f"{domain}.enable")
        yield cdp
        cdp.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.slow
def test_site_in_headless_chromium(served_site, browser):
    base, stats, _ = served_site
    cdp = browser

    # every page: no console errors, every internal href/src resolves
    seen_pages, checked, queue = set(), {}, [base + "index.html"]
    while queue:
        url = queue.pop()
        if url in seen_pages:
            continue
        seen_pages.add(url)
        cdp.events.clear()
        cdp.goto(url)
        assert cdp.eval("document.readyState") == "complete"
        links = cdp.eval("Array.from(document.querySelectorAll('a[href], img[src], script[src], link[href]'))"
                         ".map(e => e.href || e.src)")
        assert cdp.errors() == [], f"console errors on {url}"
        for link in links:
            link = urllib.parse.urldefrag(link)[0]
            if not link.startswith(base):
                assert link.startswith(("https://", "http://", "data:", "mailto:")), link
                continue
            if link not in checked:
                try:
                    checked[link] = urllib.request.urlopen(link, timeout=10).status
                except urllib.error.HTTPError as err:
                    checked[link] = err.code
            if link.endswith(".html"):
                queue.append(link)
    broken = {k: v for k, v in checked.items() if v != 200}
    assert broken == {}, f"broken links: {broken}"
    assert len(seen_pages) == stats["pages"]  # every page is reachable from the overview
    assert any(k.endswith(".svg") for k in checked) and any(k.endswith("results.jsonl") for k in checked)

    # overview: every method in the right rank order
    cdp.goto(base + "index.html")
    order = cdp.eval("Object.fromEntries(Array.from(document.querySelectorAll('table.ranking')).map(t => "
                     "[t.dataset.task, Array.from(t.tBodies[0].rows).map(r => r.cells[1].innerText.trim())]))")
    assert order == EXPECTED
    ranks = cdp.eval("Array.from(document.querySelectorAll('table.ranking')[0].tBodies[0].rows)"
                     ".map(r => r.cells[0].innerText.trim())")
    assert ranks == ["1", "2", "3", "4"]

    # full-page screenshot of the overview (desktop), the test artifact
    ARTIFACTS.mkdir(exist_ok=True)
    height = cdp.eval("Math.ceil(document.documentElement.scrollHeight)")
    cdp.send("Emulation.setDeviceMetricsOverride", width=1280, height=height, deviceScaleFactor=1, mobile=False)
    import base64

    shot = cdp.send("Page.captureScreenshot", format="png")
    (ARTIFACTS / "leaderboard-overview.png").write_bytes(base64.b64decode(shot["data"]))

    # click a header (a real mouse event) to sort by method name, then again to reverse
    def click_header(text: str) -> None:
        box = cdp.eval("(() => { const th = Array.from(document.querySelectorAll('table.ranking')[0].tHead.rows[0]"
                       f".cells).find(c => c.innerText.startsWith({json.dumps(text)})); th.scrollIntoView();"
                       " const r = th.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            cdp.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    first_table = ("Array.from(document.querySelectorAll('table.ranking')[0].tBodies[0].rows)"
                   ".map(r => r.cells[1].innerText.trim())")
    click_header("Method")
    assert cdp.eval(first_table) == sorted(EXPECTED["inj_organism"])
    click_header("Method")
    assert cdp.eval(first_table) == sorted(EXPECTED["inj_organism"], reverse=True)
    click_header("Rank")
    assert cdp.eval(first_table) == EXPECTED["inj_organism"]
    assert cdp.eval("document.querySelectorAll('table.ranking')[0].tHead.rows[0].cells[0]"
                    ".getAttribute('aria-sort')") == "ascending"

    # a phone: the page itself does not scroll sideways (wide tables scroll inside their box)
    cdp.send("Emulation.setDeviceMetricsOverride", width=390, height=844, deviceScaleFactor=2, mobile=True)
    cdp.goto(base + "index.html")
    assert cdp.eval("document.documentElement.scrollWidth <= window.innerWidth + 1")
    shot = cdp.send("Page.captureScreenshot", format="png")
    (ARTIFACTS / "leaderboard-overview-phone.png").write_bytes(base64.b64decode(shot["data"]))
    assert cdp.errors() == []


@pytest.mark.slow
def test_browser_check_catches_errors(served_site, browser):
    """The console-error check is not vacuous: a thrown error and a 404 resource are both reported."""
    base, _, site = served_site
    (site / "broken.html").write_text('<!DOCTYPE html><link rel="icon" href="data:,"><img src="missing.png">'
                                      '<script>throw new Error("boom")</script>')
    browser.events.clear()
    browser.goto(base + "broken.html")
    time.sleep(0.3)
    browser.eval("1")  # drain pending events
    errs = " ".join(browser.errors())
    assert "boom" in errs and "404" in errs, errs
