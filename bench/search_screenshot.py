"""Load the search server's page in headless Chromium, save screenshots, and confirm that
the result thumbnails decoded and appear in the API's order (a manual check, not a test:
it needs a browser).

    apt-get install chromium            # Debian; or pass --browser /path/to/chrome
    python bench/search_screenshot.py [--index INDEX] [--query "a red circle in the top left"] \\
        [--k 12] [--out search.png] [--width 1280]

Without --index it builds (or reuses) the index of 200 demo pictures in --work with a
demo-architecture HAT (bench/search_load.py's `build_demo_index`). It starts the server
(uvicorn in a thread, on a free port of 127.0.0.1), then:

1. loads a copy of the page ``/?q=...&k=...`` with a small measuring script added (and a
   ``<base>`` pointing at the server, so that its thumbnails load from it), in Chromium
   (--dump-dom): the script reports every result's data-path in page order and whether
   its ``<img>`` decoded (complete, naturalWidth > 0) and its natural size. The page
   itself holds no script; the check says so too.
2. checks those paths equal ``/api/search``'s, in order, and every thumbnail decoded (at
   most 256 px a side);
3. screenshots the page itself (--out) and, for a HAT index, the attention page of the
   first result (--out with "-attention" before the extension).

Prints what it measured and where the screenshots went; exit status 0 when every check
passed, 1 otherwise, 2 when there is no browser.
"""
from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gallery_screenshot import chromium  # noqa: E402  (the same headless Chromium call)

MEASURE = """<script>
window.addEventListener("load", function () {
  var items = Array.prototype.slice.call(document.querySelectorAll("li[data-path]"));
  var report = items.map(function (li) {
    var img = li.querySelector("img");
    return {path: li.getAttribute("data-path"), decoded: !!(img && img.complete && img.naturalWidth > 0),
            width: img ? img.naturalWidth : 0, height: img ? img.naturalHeight : 0};
  });
  var out = document.createElement("pre");
  out.id = "measured";
  out.textContent = "MEASURED " + JSON.stringify({results: report,
      scrollWidth: document.documentElement.scrollWidth, scrollHeight: document.documentElement.scrollHeight});
  document.body.appendChild(out);
});
</script>"""


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=300) as response:
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8")


def start(index_folder: str):
    """The server of the index in a thread -> (uvicorn.Server, port)."""
    import uvicorn

    from hat.search import SearchIndex
    from hat.search.server import create_app, listening_socket

    app = create_app(SearchIndex.open(index_folder))
    sock = listening_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    deadline = time.monotonic() + 120
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        raise SystemExit("error: the server did not start")
    return server, sock.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", help="an index to serve (default: the demo one in --work)")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "hat-search-screenshot"),
                        help="where the demo pictures, checkpoint and index go")
    parser.add_argument("--query", default="a red circle in the top left and a blue square in the bottom right")
    parser.add_argument("--k", type=int, default=12)
    parser.add_argument("--out", default="search.png", help="the screenshot of the page (PNG)")
    parser.add_argument("--width", type=int, default=1280, help="window width in CSS pixels")
    parser.add_argument("--height", type=int, default=1100, help="window height of the screenshot")
    parser.add_argument("--browser", default=shutil.which("chromium") or shutil.which("chromium-browser")
                        or shutil.which("google-chrome") or "chromium")
    args = parser.parse_args(argv)
    if not shutil.which(args.browser) and not os.path.isfile(args.browser):
        print(f"error: no browser at {args.browser}; install Chromium (apt-get install chromium) or pass "
              f"--browser", file=sys.stderr)
        return 2

    if args.index:
        index_folder = args.index
    else:
        from search_load import build_demo_index

        index_folder, _ = build_demo_index(argparse.Namespace(work=args.work, pictures=200, checkpoint=None,
                                                              model="hat", distinct=1, seed=0))
    from hat.search import SearchError

    try:
        server, port = start(index_folder)
    except SearchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    base = f"http://127.0.0.1:{port}"
    query = urllib.parse.urlencode({"q": args.query, "k": args.k})
    failures = []
    try:
        status, api = fetch(f"{base}/api/search?{query}")
        expected = [result["path"] for result in json.loads(api)["results"]]
        status, page = fetch(f"{base}/?{query}")
        if status != 200:
            failures.append(f"the page answered {status}")
        if "<script" in page.lower():
            failures.append("the page holds a script")
        with tempfile.TemporaryDirectory() as tmp:
            probe = os.path.join(tmp, "measure.html")
            with open(probe, "w", encoding="utf-8") as handle:
                handle.write(page.replace("<head>", f"<head><base href=\"{html.escape(base)}/\">", 1)
                             .replace("</body>", MEASURE + "</body>", 1))
            dom = chromium(args.browser, f"--window-size={args.width},{args.height}", "--virtual-time-budget=20000",
                           "--dump-dom", f"file://{probe}")
        found = re.search(r"MEASURED (\{.*?\})</pre>", dom, re.S)
        if not found:
            print("error: the page did not report its results (did it load?)", file=sys.stderr)
            return 1
        measured = json.loads(html.unescape(found.group(1)))
        shown = [item["path"] for item in measured["results"]]
        decoded = sum(item["decoded"] for item in measured["results"])
        largest = max((max(item["width"], item["height"]) for item in measured["results"]), default=0)
        if shown != expected:
            failures.append(f"the page shows {shown}, the API answers {expected}")
        if decoded != len(shown) or not shown:
            failures.append(f"{decoded} of {len(shown)} thumbnails decoded")
        if largest > 256:
            failures.append(f"a thumbnail is {largest} px")
        if measured["scrollWidth"] > args.width:
            failures.append(f"the page is {measured['scrollWidth']} px wide at {args.width} px")
        print(f"{base}/?{query}: {len(shown)} results in the API's order: {shown == expected}; {decoded} of "
              f"{len(shown)} thumbnails decoded (largest side {largest} px); page {measured['scrollWidth']} x "
              f"{measured['scrollHeight']} px at a {args.width} px window; script in the page: "
              f"{'<script' in page.lower()}")

        out = os.path.abspath(args.out)
        chromium(args.browser, f"--window-size={args.width},{args.height}", "--virtual-time-budget=20000",
                 f"--screenshot={out}", f"{base}/?{query}")
        print(f"screenshot ({args.width} x {args.height}): {out}")
        health = json.loads(fetch(f"{base}/api/health")[1])
        if health["model"] == "hat" and expected:
            target = f"{base}/attention?" + urllib.parse.urlencode({"q": args.query, "path": expected[0]})
            status, attention = fetch(target)
            maps = attention.count('class="heatmap"')
            if status != 200 or not maps:
                failures.append(f"the attention page answered {status} with {maps} maps")
            root, ext = os.path.splitext(out)
            shot = f"{root}-attention{ext or '.png'}"
            chromium(args.browser, f"--window-size={args.width},{args.height}", "--virtual-time-budget=20000",
                     f"--screenshot={shot}", target)
            print(f"attention page of {expected[0]}: {maps} heat maps; screenshot: {shot}")
    finally:
        server.should_exit = True
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
