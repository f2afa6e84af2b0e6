"""report.html in a real browser: headless Debian Chromium, offline, no console errors.

Skips with its reason when Chromium is not installed (`apt-get install -y chromium`; .ci/run
does it). Besides the DOM checks it leaves a screenshot at
<pytest tmp>/browser/report.png for a person to look at.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from report_fixture import write_fixture_run

import advisor.runfolder as rf
from advisor.report.stage import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                       "(apt-get install -y chromium); the HTML report is not opened in a browser"),
]

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
         "--disable-dev-shm-usage", "--hide-scrollbars"]


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp / "profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run(
        [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = write_fixture_run(tmp_path_factory.mktemp("browser") / "run")
    write_report(run)
    return run / rf.REPORT_HTML


def test_page_renders_plots_and_recommendation_without_console_errors(report: Path, tmp_path: Path) -> None:
    res = _chromium(tmp_path, "--enable-logging=stderr", "--v=0", "--virtual-time-budget=3000",
                    "--dump-dom", report.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    assert len(re.findall(r"<svg\b", dom)) == 4, "the four plots are in the DOM"
    assert "block size 16, 0.51 GiB KV cache" in dom and "vllm serve MODEL --enable-prefix-caching" in dom
    assert "<script" not in dom.replace("&lt;script", "")  # the hostile prompt stayed text
    assert "&lt;img src=x onerror=alert(1)&gt;" in dom
    console = [line for line in res.stderr.splitlines()
               if "CONSOLE" in line or "Uncaught" in line or "Refused to" in line or "ERR_" in line]
    assert not console, console


def test_screenshot_is_taken(report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    res = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", report.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000  # a page with content, not blank
