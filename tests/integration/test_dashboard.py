"""The HTML dashboard in a real headless browser (Debian's chromium, which
.ci/run installs; the test skips, saying why, where it is absent)."""
import os
import re
import shutil
import subprocess

import pytest

from tests.conftest import wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def browse(url, directory, *extra):
    profile = os.path.join(directory, "chrome-profile")
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}",
                           "--virtual-time-budget=5000", *extra, url],
                          capture_output=True, text=True, timeout=90)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_the_dashboard_updates_in_place_with_charts_units_and_reload_history(server):
    for _ in range(50):
        server.get("/")
    server.get("/big")   # some bytes, to be shown with a unit
    with open(server.config) as fh:
        text = fh.read()
    with open(server.config, "w") as fh:
        fh.write(text.replace('app = "tests.apps.basic:app"', 'app = "tests.apps.broken:app"'))
    assert server.cli("reload").returncode == 1   # a failed reload, to be shown
    wait_for(lambda: len(server.status()["history"]["rps"]) >= 2, message="two chart points")
    dom = browse(server.url + "/_status", server.dir, "--dump-dom").stdout
    assert re.search(r'<body[^>]* data-updated="\d+"', dom), "the script did not update the page"
    assert re.search(r'class="rps" points="[\d.]+,[\d.]+ [\d.]+,[\d.]+', dom), "no chart"
    assert re.search(r"\d+(\.\d)? (B|KiB|MiB)", dom), "bytes without units"
    assert "The last reload failed" in dom and "failed: ImportError" in dom
    assert " in 0.0ms" not in dom and "0 in 0.0" not in dom


def test_without_scripts_the_page_still_refreshes_itself(server):
    page = server.get("/_status").text
    assert '<noscript><meta http-equiv="refresh"' in page
    assert "<script>" in page and "http://" not in page.split("<script>")[1].split("</script>")[0]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
@pytest.mark.parametrize("width", [1280, 390])
def test_no_box_of_the_dashboard_overlaps_another_on_a_wide_or_a_phone_screen(server, width):
    for _ in range(20):
        server.get("/")
    wait_for(lambda: len(server.status()["history"]["rps"]) >= 2, message="two chart points")
    dom = browse(f"{server.url}/layout-check?{width}", server.dir, "--dump-dom").stdout
    result = re.search(r'<pre id="result">(.*?)</pre>', dom, re.S)
    assert result is not None, dom[-2000:]
    assert result.group(1) == "OK", result.group(1)
