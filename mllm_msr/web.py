"""A small web demo (FastAPI, server-rendered HTML): a user's history with covers, how the
preference summary evolved block by block, the recommended items with covers and scores, and a
chat box that folds feedback into the memory. `msr web` serves it on 127.0.0.1.

Security: it binds loopback unless the user passes ``--allow-remote`` *and* a token (see
:func:`check_bind`); with a token every request must carry it (``Authorization: Bearer``,
``?token=``, or the cookie a valid ``?token=`` sets) or gets 401. Every catalogue or model string
is HTML-escaped (quotes included) and ids in URLs are percent-encoded; a Content-Security-Policy
that allows no script at all backs that up.
"""
from __future__ import annotations

import hmac
import html
import ipaddress
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Form, HTTPException, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse

from mllm_msr.pipeline import Services

STYLE = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1100px;color:#222}
.row{display:flex;flex-wrap:wrap;gap:10px}.card{width:130px;font-size:12px}
.card img{width:128px;height:128px;border:1px solid #ccc;border-radius:4px}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:4px 8px;font-size:13px;vertical-align:top}
.score{font-weight:bold;color:#064}.reply{white-space:pre-wrap;background:#f4f7f4;padding:8px;border-radius:4px}"""


TOKEN_ENV = "MSR_WEB_TOKEN"
TOKEN_COOKIE = "msr_web_token"
MIN_TOKEN_CHARS = 16
SECURITY_HEADERS = {
    # no script of any kind, no plugins, no framing; images and forms only from this server
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
                               "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, allow_remote: bool, token: str | None) -> None:
    """Refuse (``ValueError`` with the reason) to serve on a non-loopback ``host`` unless the user
    asked for it explicitly (``allow_remote``) and set a token of at least ``MIN_TOKEN_CHARS``."""
    if is_loopback(host):
        return
    if not allow_remote:
        raise ValueError(f"refusing to bind {host!r}: the demo serves 127.0.0.1 only unless you pass "
                         f"--allow-remote and a token (--token or ${TOKEN_ENV})")
    if not token or len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"binding {host!r} needs a token of at least {MIN_TOKEN_CHARS} characters "
                         f"(--token or ${TOKEN_ENV}); requests without it get 401")


def _presented_token(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE) or ""


def _page(title: str, body: str) -> HTMLResponse:
    return HTMLResponse(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def create_app(s: Services, users: dict[str, dict], token: str | None = None) -> FastAPI:
    """``users``: user id → {"history": [...], "timestamps": [...], "candidates": [...]}.
    With ``token``, every request without it is answered 401."""
    from langchain_core.messages import HumanMessage

    from mllm_msr.graphs.chat import compile_chat
    from mllm_msr.graphs.pipeline import compile_pipeline, thread

    app = FastAPI(title="mllm-msr demo")
    pipeline, chat = compile_pipeline(s), compile_chat(s)
    replies: dict[str, str] = {}
    esc = html.escape

    def url(*parts: str) -> str:
        """A path whose every segment is percent-encoded, then HTML-escaped for an attribute."""
        return esc("/" + "/".join(quote(p, safe="") for p in parts))

    @app.middleware("http")
    async def guard(request: Request, call_next) -> Response:
        presented = _presented_token(request) if token else ""
        if token and not hmac.compare_digest(presented.encode(), token.encode()):
            response: Response = JSONResponse({"detail": "missing or wrong token"}, status_code=401,
                                              headers={"WWW-Authenticate": "Bearer"})
        else:
            response = await call_next(request)
            if token and request.query_params.get("token"):  # a browser keeps it for the links it follows
                response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        response.headers.update(SECURITY_HEADERS)
        return response

    def card(iid: str, extra: str = "") -> str:
        it = s.catalog[iid]
        return (f"<div class='card' data-item='{esc(iid)}'><img alt='{esc(it.title)}' src='{url('cover', iid)}'>"
                f"<div>{esc(it.title)}</div>{extra}</div>")

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        links = "".join(f"<li><a href='{url('user', u)}'>{esc(u)}</a> ({len(v['history'])} items)</li>"
                        for u, v in users.items())
        return _page("mllm-msr demo", f"<p>Pick a user.</p><ul>{links}</ul>")

    @app.get("/cover/{item_id}")
    def cover(item_id: str) -> FileResponse:
        it = s.catalog.get(item_id)  # only catalogue items: no path from the URL reaches the disk
        if it is None or it.image_path is None:
            raise HTTPException(404, "no cover")
        return FileResponse(Path(it.image_path))

    @app.get("/user/{user_id:path}", response_class=HTMLResponse)  # :path: ids may hold "/"
    def user_page(user_id: str) -> HTMLResponse:
        u = users.get(user_id)
        if u is None:
            raise HTTPException(404, f"unknown user {user_id}")
        state = pipeline.invoke({"user_id": user_id, "history": u["history"],
                                 "history_timestamps": u["timestamps"], "candidates": u["candidates"]},
                                thread(user_id))
        hist = "".join(card(i) for i in u["history"])
        versions = s.store.user_history(user_id)
        evo = "".join(f"<tr><td>{v.step}</td><td>{esc(str(v.source))}</td><td>{len(v.covered)}</td>"
                      f"<td>{esc(v.summary)}</td></tr>"
                      for v in versions)
        recs = "".join(card(r["item_id"], f"<div class='score'>score {r['score']:.3f}</div>")
                       for r in state["ranking"][:10])
        reply = replies.get(user_id, "")
        body = (f"<h2>History ({len(u['history'])} items, oldest first)</h2><div class='row' id='history'>{hist}</div>"
                f"<h2>Preference summary, block by block</h2><table id='evolution'><tr><th>step</th><th>source</th>"
                f"<th>items covered</th><th>summary</th></tr>{evo}</table>"
                f"<h2>Recommended</h2><div class='row' id='recs'>{recs}</div>"
                f"<h2>Chat</h2><form method='post' action='{url('user', user_id, 'chat')}'>"
                "<input name='message' id='message' size='60' "
                "placeholder='more like the blue ones, nothing with stripes'>"
                "<button type='submit' id='send'>Send</button></form>"
                + (f"<div class='reply' id='reply'>{esc(reply)}</div>" if reply else ""))
        return _page(f"User {user_id}", body)

    @app.post("/user/{user_id:path}/chat")
    def user_chat(user_id: str, message: str = Form(...)) -> RedirectResponse:
        u = users.get(user_id)
        if u is None:
            raise HTTPException(404, f"unknown user {user_id}")
        st = chat.invoke({"user_id": user_id, "history": u["history"], "messages": [HumanMessage(message)]},
                         thread(f"web:{user_id}"))
        replies[user_id] = str(st["messages"][-1].content)
        return RedirectResponse("/user/" + quote(user_id, safe=""), status_code=303)

    return app
