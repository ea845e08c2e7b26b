"""Open a page in Debian's headless Chromium and check what it drew.

Reports and maps are judged by a real browser, not by grepping their HTML: a page whose script
throws, or which needs the network, draws nothing, and a screenshot catches that."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def chromium() -> str:
    """The browser binary; skipped locally without one, a failure under CI (.ci/run installs it)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    import os

    if os.environ.get("CI") == "true":
        pytest.fail("headless chromium is missing: .ci/run installs Debian's `chromium`")
    pytest.skip("no chromium on this machine (apt-get install chromium)")


def screenshot(page: Path, out: Path, width: int = 1200, height: int = 900, wait_ms: int = 3000) -> Path:
    """Render a local HTML file with the network off and save a PNG of the window."""
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        "--no-first-run", "--disable-extensions", "--user-data-dir=" + str(out.parent / "chromium-profile"),
        # No proxy that resolves: anything the page fetches from the network fails, as it would offline.
        "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
        f"--window-size={width},{height}", f"--virtual-time-budget={wait_ms}",
        f"--screenshot={out}", page.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not out.exists():
        raise AssertionError(f"chromium could not render {page}: rc={done.returncode}\n{done.stderr[-2000:]}")
    return out


def drawn_fraction(png: Path) -> float:
    """Share of pixels that differ from the page's most common colour (its background)."""
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    background = colours[counts.argmax()]
    return float((pixels != background).any(axis=1).mean())


def assert_drawn(png: Path, at_least: float = 0.02) -> None:
    """A blank or nearly blank screenshot means the page failed to draw its content."""
    share = drawn_fraction(png)
    assert share >= at_least, f"{png} is blank: only {share:.3%} of its pixels differ from the background"
