"""Remote images: never fetched by default; opt-in only over http(s) with size and time limits.
Served by a real local HTTP server on 127.0.0.1."""
from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from mllm_msr.data.loaders import load_amazon2023
from mllm_msr.data.remote import RemoteImageConfig, RemoteImageError, fetch_image


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server():
    hits: list[str] = []
    body = _jpeg()

    class H(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            if self.path.startswith("/big"):
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"\xff" * 200_000)  # no Content-Length: the cap must stop the read
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", hits
    srv.shutdown()


def _amazon(tmp_path, url):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "meta.jsonl").write_text(json.dumps({"parent_asin": "A1", "title": "Toy",
                                                     "images": [{"large": url}]}) + "\n")
    (tmp_path / "rev.jsonl").write_text("\n".join(json.dumps({"user_id": "u", "parent_asin": "A1", "rating": 5,
                                                              "timestamp": 1000 * i}) for i in range(2)) + "\n")
    return tmp_path / "rev.jsonl", tmp_path / "meta.jsonl", tmp_path / "imgs"


def test_urls_are_not_fetched_by_default(tmp_path, server):
    base, hits = server
    n = len(hits)
    ds = load_amazon2023(*_amazon(tmp_path, f"{base}/a.jpg"))
    assert ds.items["A1"].image_path is None and len(hits) == n


def test_opt_in_fetches_http_images_within_limits(tmp_path, server):
    base, hits = server
    ds = load_amazon2023(*_amazon(tmp_path, f"{base}/a.jpg"), remote_images=RemoteImageConfig(enabled=True))
    assert ds.items["A1"].image_path is not None and ds.items["A1"].image_path.read_bytes()[:2] == b"\xff\xd8"
    cfg = RemoteImageConfig(enabled=True, max_bytes=50_000)
    with pytest.raises(RemoteImageError, match="50000"):
        fetch_image(f"{base}/big", tmp_path / "big.jpg", cfg)
    assert not (tmp_path / "big.jpg").exists() and not list(tmp_path.glob("*.part"))
    for bad in ("file:///etc/passwd", "ftp://127.0.0.1/x.jpg", "/etc/passwd"):
        with pytest.raises(RemoteImageError, match="only http"):
            fetch_image(bad, tmp_path / "x.jpg", cfg)


def test_failed_fetch_is_reported_not_fatal(tmp_path):
    ds = load_amazon2023(*_amazon(tmp_path, "http://127.0.0.1:9/nothing.jpg"),
                         remote_images=RemoteImageConfig(enabled=True, timeout_s=2))
    assert ds.items["A1"].image_path is None
    assert ds.report.dropped["remote_image_failed"] == 1
    assert any("meta.jsonl:1" in w and "A1" in w for w in ds.report.warnings)
