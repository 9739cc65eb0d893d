"""Write `align report` for a registry and a headless-Chromium screenshot of it, to look at the page as users will.

    .venv/bin/python bench/report_screenshot.py [--registry artifacts] [REF ...]

Outputs bench/out/report.html and bench/out/report.png; exits 2 with a message when Chromium or the registry
is missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")


class ScreenshotError(Exception):
    """Chromium is absent, or it ran and wrote no screenshot."""


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable on PATH (or /usr/bin/chromium), None when there is none."""
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def screenshot(html_path: str | Path, png_path: str | Path, *, width: int = 1280, height: int = 4000,
               chromium: str | None = None, timeout: float = 180) -> Path:
    """Render `html_path` in headless Chromium to `png_path`; ScreenshotError when Chromium is absent or fails."""
    browser = chromium or find_chromium()
    if browser is None:
        raise ScreenshotError("no Chromium found (looked for " + ", ".join(CHROMIUM_CANDIDATES) + "): install it "
                              "to take report screenshots")
    png_path = Path(png_path).absolute()
    png_path.unlink(missing_ok=True)  # so a stale screenshot can never pass for a fresh one
    # Flags that work as root in a sandboxed container, with no network and a throwaway profile.
    with tempfile.TemporaryDirectory(prefix="align-chromium-") as profile:
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png_path}",
                   f"--window-size={width},{height}", Path(html_path).absolute().as_uri()]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False,
                                  env={**os.environ, "HOME": profile})
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ScreenshotError(f"{browser} could not take the screenshot: {exc}") from None
    if not png_path.is_file() or png_path.stat().st_size == 0:
        raise ScreenshotError(f"{browser} wrote no screenshot (exit {done.returncode}): "
                              f"{done.stderr.strip()[-800:]}")
    return png_path


def png_dimensions(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header, without an image library."""
    header = path.read_bytes()[:24]
    if header[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    return struct.unpack(">II", header[16:24])


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, write the report, take the screenshot, print where both are."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("refs", nargs="*", help="artifacts to include (default: latest of every name)")
    parser.add_argument("--registry", default="artifacts", help="registry root (default: artifacts)")
    parser.add_argument("--width", type=int, default=1280, help="browser window width in pixels")
    parser.add_argument("--height", type=int, default=4000, help="browser window height in pixels")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))  # run from a checkout without installing
    from align.artifacts import Registry
    from align.errors import AlignError
    from align.report import write_report

    if find_chromium() is None:
        print("error: no Chromium found (chromium, chromium-browser, google-chrome or /usr/bin/chromium); "
              "install it to take the screenshot", file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        html_path = write_report(Registry(args.registry), args.refs, OUT / "report.html")
        png_path = screenshot(html_path, OUT / "report.png", width=args.width, height=args.height)
    except (AlignError, ScreenshotError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    width, height = png_dimensions(png_path)
    print(f"report     {html_path} ({html_path.stat().st_size / 1024:.0f} KiB)")
    print(f"screenshot {png_path} ({width}x{height} px, {png_path.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
