"""A small web demo (FastAPI, server-rendered HTML): a user's history with covers, how the
preference summary evolved block by block, the recommended items with covers and scores, and a
chat box that folds feedback into the memory. `msr web` serves it on 127.0.0.1."""
from __future__ import annotations

import html
from pathlib import Path

from fastapi import FastAPI, Form, HTTPException
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

from mllm_msr.pipeline import Services

STYLE = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1100px;color:#222}
.row{display:flex;flex-wrap:wrap;gap:10px}.card{width:130px;font-size:12px}
.card img{width:128px;height:128px;border:1px solid #ccc;border-radius:4px}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:4px 8px;font-size:13px;vertical-align:top}
.score{font-weight:bold;color:#064}.reply{white-space:pre-wrap;background:#f4f7f4;padding:8px;border-radius:4px}"""


def _page(title: str, body: str) -> HTMLResponse:
    return HTMLResponse(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def create_app(s: Services, users: dict[str, dict]) -> FastAPI:
    """``users``: user id → {"history": [...], "timestamps": [...], "candidates": [...]}."""
    from langchain_core.messages import HumanMessage

    from mllm_msr.graphs.chat import compile_chat
    from mllm_msr.graphs.pipeline import compile_pipeline, thread

    app = FastAPI(title="mllm-msr demo")
    pipeline, chat = compile_pipeline(s), compile_chat(s)
    replies: dict[str, str] = {}
    esc = html.escape

    def card(iid: str, extra: str = "") -> str:
        it = s.catalog[iid]
        return (f"<div class='card' data-item='{esc(iid)}'><img alt='{esc(it.title)}' src='/cover/{esc(iid)}'>"
                f"<div>{esc(it.title)}</div>{extra}</div>")

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        links = "".join(f"<li><a href='/user/{esc(u)}'>{esc(u)}</a> ({len(v['history'])} items)</li>"
                        for u, v in users.items())
        return _page("mllm-msr demo", f"<p>Pick a user.</p><ul>{links}</ul>")

    @app.get("/cover/{item_id}")
    def cover(item_id: str) -> FileResponse:
        it = s.catalog.get(item_id)  # only catalogue items: no path from the URL reaches the disk
        if it is None or it.image_path is None:
            raise HTTPException(404, "no cover")
        return FileResponse(Path(it.image_path))

    @app.get("/user/{user_id}", response_class=HTMLResponse)
    def user_page(user_id: str) -> HTMLResponse:
        u = users.get(user_id)
        if u is None:
            raise HTTPException(404, f"unknown user {user_id}")
        state = pipeline.invoke({"user_id": user_id, "history": u["history"],
                                 "history_timestamps": u["timestamps"], "candidates": u["candidates"]},
                                thread(user_id))
        hist = "".join(card(i) for i in u["history"])
        versions = s.store.user_history(user_id)
        evo = "".join(f"<tr><td>{v.step}</td><td>{v.source}</td><td>{len(v.covered)}</td><td>{esc(v.summary)}</td></tr>"
                      for v in versions)
        recs = "".join(card(r["item_id"], f"<div class='score'>score {r['score']:.3f}</div>")
                       for r in state["ranking"][:10])
        reply = replies.get(user_id, "")
        body = (f"<h2>History ({len(u['history'])} items, oldest first)</h2><div class='row' id='history'>{hist}</div>"
                f"<h2>Preference summary, block by block</h2><table id='evolution'><tr><th>step</th><th>source</th>"
                f"<th>items covered</th><th>summary</th></tr>{evo}</table>"
                f"<h2>Recommended</h2><div class='row' id='recs'>{recs}</div>"
                f"<h2>Chat</h2><form method='post' action='/user/{esc(user_id)}/chat'>"
                f"<input name='message' id='message' size='60' placeholder='more like the blue ones, nothing with stripes'>"
                f"<button type='submit' id='send'>Send</button></form>"
                + (f"<div class='reply' id='reply'>{esc(reply)}</div>" if reply else ""))
        return _page(f"User {user_id}", body)

    @app.post("/user/{user_id}/chat")
    def user_chat(user_id: str, message: str = Form(...)) -> RedirectResponse:
        u = users.get(user_id)
        if u is None:
            raise HTTPException(404, f"unknown user {user_id}")
        st = chat.invoke({"user_id": user_id, "history": u["history"], "messages": [HumanMessage(message)]},
                         thread(f"web:{user_id}"))
        replies[user_id] = str(st["messages"][-1].content)
        return RedirectResponse(f"/user/{user_id}", status_code=303)

    return app
