"""The web demo in a real headless Chromium (Debian's package): `msr web` on loopback with a tiny
model; the browser's DOM must show the history covers (loaded images), the summary evolution and
the ranked items; a screenshot is written for a person to look at. Every title carries HTML/JS and
attribute-breaking quotes (tests/test_web.py's HOSTILE) and the server requires a token: the browser
authenticates once with ?token=, loads the covers through the cookie, and runs no script."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ci_strict import ci_mode
from helpers import free_port, wait_for_http
from test_web import HOSTILE, PWNED, TOKEN, ParsedPage, hostile_benchmark

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None and not ci_mode(), reason="chromium not installed (CI installs it)")
def test_web_demo_renders_in_headless_chromium(tmp_path, tiny_idefics3):
    assert CHROMIUM, "CI must install Debian's chromium"
    port = free_port()
    sets = {"generator.model": tiny_idefics3, "scorer.model": tiny_idefics3, "run_dir": tmp_path / "run",
            "store.path": tmp_path / "chroma", "dataset": hostile_benchmark(tmp_path / "hostile"),
            "recommender.adapter": "null"}
    cmd = [sys.executable, "-m", "mllm_msr.cli", "web", "--port", str(port), "--users", "3"]
    cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MSR_HOME": str(tmp_path / "home"), "MSR_WEB_TOKEN": TOKEN}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        index = wait_for_http(f"{base}/?token={TOKEN}", server).decode()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + "/", timeout=10)
        assert refused.value.code == 401
        user = re.search(r"href='/user/([^']+)'", index).group(1)
        url = f"{base}/user/{user}?token={TOKEN}"
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,1400"]
        dom = subprocess.run([CHROMIUM, *flags, "--virtual-time-budget=8000", "--dump-dom", url],
                             capture_output=True, text=True, timeout=120).stdout
        assert "Preference summary, block by block" in dom and "id=\"recs\"" in dom
        assert dom.count("/cover/") >= 10 and dom.count("score ") == 10
        parsed = ParsedPage(dom)  # the DOM after the page ran: no payload became markup, none executed
        assert "script" not in parsed.tags
        assert not [a for a, _ in parsed.attrs if a.startswith("on") or a == PWNED]
        assert sum(all(h in t for h in HOSTILE) for t in parsed.text) >= 10  # the titles show as text
        shot = tmp_path / "web.png"
        subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
        assert shot.exists() and shot.stat().st_size > 20_000  # covers rendered, not a blank page
        from PIL import Image

        img = Image.open(shot).convert("RGB")
        colours = img.resize((60, 70)).getcolors(60 * 70) or []
        assert len(colours) > 20  # a page with coloured covers, not a plain error page
        out = Path(os.environ.get("MSR_SCREENSHOT_DIR", tmp_path))
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / "web_demo.png")
    finally:
        server.terminate()
        server.wait(timeout=30)
