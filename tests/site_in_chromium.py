"""Opens the built docs in headless Chromium with every host but this machine unreachable, and checks
that a page's maths is typeset by MathJax and its Mermaid diagrams are drawn.

Run by hand (pytest does not collect it; `tests/test_site.py` checks the built pages statically):

    python tests/site_in_chromium.py [--chromium /usr/bin/chromium] [--screenshots DIR]

It builds the site into a temporary folder, serves it on 127.0.0.1, loads a page with maths and
pages with diagrams, and exits non-zero on any failure.
"""

import argparse
import functools
import http.server
import pathlib
import re
import subprocess
import sys
import tempfile
import threading


ROOT = pathlib.Path(__file__).parent.parent
MATH_PAGE = "guides/what-online-learning-credits/"
DIAGRAM_PAGES = ("", "tutorials/graph-compilation/")


class _Handler(http.server.SimpleHTTPRequestHandler):
    missing: list[str] = []

    def send_error(self, code, message=None, explain=None):
        type(self).missing.append(f"{code} {self.path}")
        super().send_error(code, message, explain)

    def log_message(self, format, *args):
        pass


def _dom(chromium: str, url: str, screenshot: pathlib.Path | None) -> str:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        # Every host but this machine fails to resolve: a CDN script would not load.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--virtual-time-budget=20000",
        "--window-size=1280,2000",
    ]
    if screenshot is not None:
        subprocess.run([chromium, *flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=99)
    result = subprocess.run(
        [chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    )
    return result.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--screenshots", type=pathlib.Path, help="a folder for a PNG of each page")
    args = parser.parse_args()
    if args.screenshots is not None:
        args.screenshots.mkdir(parents=True, exist_ok=True)

    failures = []
    with tempfile.TemporaryDirectory() as site:
        subprocess.run(
            [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", site],
            cwd=ROOT,
            check=True,
        )
        handler = functools.partial(_Handler, directory=site)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        try:
            for page in (MATH_PAGE, *DIAGRAM_PAGES):
                built = (pathlib.Path(site) / page / "index.html").read_text()
                shot = None
                if args.screenshots is not None:
                    shot = args.screenshots / f"{page.strip('/').replace('/', '_') or 'index'}.png"
                dom = _dom(args.chromium, base + page, shot)
                maths = built.count('class="arithmatex"')
                typeset = len(re.findall(r'class="arithmatex">\s*<mjx-container', dom))
                if typeset != maths:
                    failures.append(f"{page}: {maths} maths, {typeset} typeset by MathJax")
                diagrams = len(re.findall(r'<pre class="mermaid"', built))
                drawn = len(re.findall(r'<div class="mermaid">', dom))
                left = len(re.findall(r'<pre class="mermaid"', dom))
                if drawn != diagrams or left:
                    failures.append(f"{page}: {diagrams} diagrams, {drawn} drawn, {left} left as text")
                print(f"/{page}: {typeset}/{maths} maths typeset, {drawn}/{diagrams} diagrams drawn")
        finally:
            server.shutdown()
    if _Handler.missing:
        failures.append(f"requests the site could not answer: {sorted(set(_Handler.missing))}")
    for failure in failures:
        print("FAILED:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
