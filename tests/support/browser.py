"""Headless Chromium for tests that look at the daemon's pages as a browser does (Debian's `chromium` package)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
SKIP_REASON = "needs /usr/bin/chromium (Debian package `chromium`, installed by .ci/run)"


def chromium_flags(profile: Path) -> list[str]:
    """Headless, no first-run or background traffic, one profile dir (cookies persist in it between runs)."""
    return [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ]


def run_chromium(
    profile: Path, url: str, *extra: str, budget_ms: int = 10000, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Open ``url`` and let its scripts run for ``budget_ms`` of virtual time (network waits pause it), with
    ``extra`` flags such as ``--dump-dom`` or ``--screenshot=PATH``."""
    env = {**os.environ, "HOME": str(profile.parent)}
    flags = [*chromium_flags(profile), f"--virtual-time-budget={budget_ms}", *extra, url]
    return subprocess.run(flags, capture_output=True, text=True, timeout=timeout, env=env)
