"""Render a run's gallery.html in headless Chromium and save a screenshot (a manual check,
not a test: it needs a browser).

    apt-get install chromium            # Debian; or pass --browser /path/to/chrome
    python bench/gallery_screenshot.py runs/1 --out gallery.png [--width 1280]

Prints the page's measured layout at that window width: its scroll width (the page is
readable at the width when it does not exceed it: long attention rows scroll inside their
own box), its height, the images Chromium decoded, and where the screenshot went. The
measurement runs in a temporary copy of the page with a small script added; the gallery
itself holds no script.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

MEASURE = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var decoded = images.filter(function (img) { return img.complete && img.naturalWidth > 0; }).length;
  var out = document.createElement("pre");
  out.id = "measured";
  out.textContent = "scrollWidth=" + document.documentElement.scrollWidth + " scrollHeight=" +
      document.documentElement.scrollHeight + " images=" + images.length + " decoded=" + decoded;
  document.body.appendChild(out);
});
</script>"""


def chromium(browser: str, *args: str, timeout: int = 120) -> str:
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{browser} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return proc.stdout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gallery", help="gallery.html, or the run folder holding it")
    parser.add_argument("--out", default="gallery.png", help="the screenshot (PNG)")
    parser.add_argument("--width", type=int, default=1280, help="window width in CSS pixels")
    parser.add_argument("--max-height", type=int, default=12000, help="cap on the screenshot's height")
    parser.add_argument("--browser", default=shutil.which("chromium") or shutil.which("chromium-browser")
                        or shutil.which("google-chrome") or "chromium")
    args = parser.parse_args(argv)
    page = os.path.join(args.gallery, "gallery.html") if os.path.isdir(args.gallery) else args.gallery
    if not os.path.isfile(page):
        print(f"error: {page} does not exist; pass a gallery.html or a run folder with one", file=sys.stderr)
        return 2
    if not shutil.which(args.browser) and not os.path.isfile(args.browser):
        print(f"error: no browser at {args.browser}; install Chromium (apt-get install chromium) or pass "
              f"--browser", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        probe = os.path.join(tmp, "measure.html")
        with open(page, encoding="utf-8") as handle:
            html = handle.read()
        with open(probe, "w", encoding="utf-8") as handle:
            handle.write(html.replace("</body>", MEASURE + "</body>", 1))
        dom = chromium(args.browser, f"--window-size={args.width},1000", "--virtual-time-budget=10000",
                       "--dump-dom", f"file://{os.path.abspath(probe)}")
    found = re.search(r"scrollWidth=(\d+) scrollHeight=(\d+) images=(\d+) decoded=(\d+)", dom)
    if not found:
        print("error: the page did not report its layout (did it load?)", file=sys.stderr)
        return 1
    width, height, images, decoded = (int(v) for v in found.groups())
    shot_height = min(height, args.max_height)
    chromium(args.browser, f"--window-size={args.width},{shot_height}",
             f"--screenshot={os.path.abspath(args.out)}", f"file://{os.path.abspath(page)}")
    fits = "fits" if width <= args.width else "DOES NOT FIT"
    print(f"{page}: at {args.width} px the page is {width} px wide ({fits}) and {height} px tall; "
          f"{decoded} of {images} embedded images decoded")
    print(f"screenshot ({args.width} x {shot_height}): {args.out}")
    return 0 if width <= args.width and decoded == images else 1


if __name__ == "__main__":
    sys.exit(main())
