"""Item and user summaries in Chroma, keyed so that nothing is ever summarised twice.

- Item summaries: one record per (content hash of image+text, prompt versions, model id). Editing a
  prompt or swapping the model changes the key, so exactly what it produced is recomputed.
- User summaries: one record per (user, step) version with the key of everything it was computed
  from (previous summary's key, the block's item keys, prompt version, model id), so an unchanged
  history prefix is a cache hit and a new interaction costs at most one block update.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import chromadb
from chromadb.api.types import EmbeddingFunction
from chromadb.config import Settings
from chromadb.errors import ChromaError, NotFoundError
from pydantic import BaseModel, Field

from mllm_msr.hashing import file_sha256
from mllm_msr.stores.embeddings import MiniLMEmbedding

ITEMS = "item_summaries"
USERS = "user_summaries"


class StoreConfig(BaseModel):
    """Where summaries live."""

    path: str = Field("runs/store/chroma", description="Folder of the embedded Chroma PersistentClient.")
    host: str | None = Field(None, description="Chroma server host; when set, use HttpClient instead of the folder.")
    port: int = Field(8000, description="Chroma server port (with host).")
    database: str = Field(chromadb.DEFAULT_DATABASE, description="Database on the Chroma server (with host; "
                          "created if missing), so several runs or benchmarks can share one server.")


class StoreError(RuntimeError):
    """The summary store cannot be opened or written (read-only folder, full disk, server down).

    The message names the store's location; what was stored before stays intact (Chroma writes
    each batch in one transaction)."""


def _cause(err: BaseException) -> str:
    text = str(err)
    if "readonly" in text or "read-only" in text.lower() or getattr(err, "errno", None) in (13, 30):
        return "it is read-only (check the folder's permissions and mount)"
    if "disk is full" in text or getattr(err, "errno", None) == 28:
        return "the disk is full (free space there and rerun: stored summaries are kept)"
    return "the store failed"


@contextmanager
def store_errors(where: str, action: str) -> Iterator[None]:
    """Turn Chroma / OS failures into a :class:`StoreError` that names ``where``."""
    try:
        yield
    except (ChromaError, OSError) as e:
        raise StoreError(f"cannot {action} the summary store at {where}: {_cause(e)} ({e})") from e


def file_digest(path: str | Path | None) -> str:
    return "no-image" if path is None else file_sha256(path)[:24]


@dataclass(frozen=True)
class ItemSummary:
    item_id: str
    key: str
    summary: str
    image_description: str
    text_summary: str


@dataclass(frozen=True)
class UserSummaryVersion:
    user_id: str
    step: int
    key: str
    summary: str
    covered: tuple[str, ...]  # item ids folded in so far, chronological
    timestamp: float
    prompt_version: str
    model_id: str
    source: str = "history"  # or "feedback" (chat)


def http_client(cfg: StoreConfig) -> Any:
    """A client of the Chroma server at ``cfg.host:cfg.port``, on ``cfg.database`` (created if missing)."""
    if cfg.database != chromadb.DEFAULT_DATABASE:
        admin = chromadb.AdminClient(Settings(chroma_api_impl="chromadb.api.fastapi.FastAPI",
                                              chroma_server_host=cfg.host, chroma_server_http_port=cfg.port))
        try:
            admin.get_database(cfg.database)
        except NotFoundError:
            try:
                admin.create_database(cfg.database)
            except ChromaError as lost:
                # another process created it meanwhile: the server answers UniqueConstraintError or,
                # over HTTP, a plain ChromaError "Database [x] already exists"; fine if it exists now
                try:
                    admin.get_database(cfg.database)
                except NotFoundError:
                    raise lost from None
    return chromadb.HttpClient(host=str(cfg.host), port=cfg.port, database=cfg.database)


class SummaryStore:
    """Chroma-backed store; the only place that reads or writes summaries."""

    def __init__(self, cfg: StoreConfig | None = None, *, client: Any = None,
                 embedding: EmbeddingFunction | None = None) -> None:
        cfg = cfg or StoreConfig()
        self.where = (f"chroma://{cfg.host}:{cfg.port}/{cfg.database}" if cfg.host
                      else str(Path(cfg.path).resolve())) if client is None else "the given Chroma client"
        self.embedding = embedding or MiniLMEmbedding()
        meta = {"hnsw:space": "cosine"}
        with store_errors(self.where, "open"):
            if client is None:
                if cfg.host:
                    client = http_client(cfg)
                else:
                    Path(cfg.path).mkdir(parents=True, exist_ok=True)
                    client = chromadb.PersistentClient(path=cfg.path)
            self.items = client.get_or_create_collection(ITEMS, embedding_function=self.embedding, metadata=meta)
            self.users = client.get_or_create_collection(USERS, embedding_function=self.embedding, metadata=meta)
        self.client = client

    # ---- items -----------------------------------------------------------------------------
    def get_items(self, keys: Sequence[str]) -> dict[str, ItemSummary]:
        if not keys:
            return {}
        got = self.items.get(ids=list(dict.fromkeys(keys)), include=["documents", "metadatas"])
        return {k: ItemSummary(m["item_id"], k, d, m.get("image_description", ""), m.get("text_summary", ""))
                for k, d, m in zip(got["ids"], got["documents"], got["metadatas"], strict=True)}

    def put_items(self, summaries: Iterable[ItemSummary], extra: dict[str, Any] | None = None) -> None:
        rows = list(summaries)
        if not rows:
            return
        with store_errors(self.where, f"write {len(rows)} item summaries to"):
            self.items.upsert(
                ids=[s.key for s in rows], documents=[s.summary for s in rows],
                metadatas=[{"item_id": s.item_id, "image_description": s.image_description,
                            "text_summary": s.text_summary, **(extra or {})} for s in rows])

    def search_items(self, query: str, n: int, exclude: AbstractSet[str] = frozenset(),
                     where: dict[str, Any] | None = None) -> list[tuple[str, float]]:
        """Item ids most similar to ``query`` (cosine similarity), skipping ``exclude``."""
        total = self.items.count()
        if total == 0:
            return []
        res = self.items.query(query_texts=[query], n_results=min(total, n + len(exclude) + 8),
                               where=where, include=["metadatas", "distances"])
        out, seen = [], set()
        for m, d in zip(res["metadatas"][0], res["distances"][0], strict=True):
            iid = m["item_id"]
            if iid in exclude or iid in seen:
                continue
            seen.add(iid)
            out.append((iid, 1.0 - float(d)))
        return out[:n]

    # ---- users -----------------------------------------------------------------------------
    def get_user_version(self, key: str) -> UserSummaryVersion | None:
        got = self.users.get(ids=[key], include=["documents", "metadatas"])
        if not got["ids"]:
            return None
        return self._user_from(got["ids"][0], got["documents"][0], got["metadatas"][0])

    def put_user_versions(self, versions: Iterable[UserSummaryVersion]) -> None:
        rows = list(versions)
        if not rows:
            return
        with store_errors(self.where, f"write {len(rows)} user summaries to"):
            self.users.upsert(
                ids=[v.key for v in rows], documents=[v.summary for v in rows],
                metadatas=[{"user_id": v.user_id, "step": v.step, "timestamp": v.timestamp,
                            "covered": json.dumps(list(v.covered)), "n_covered": len(v.covered),
                            "prompt_version": v.prompt_version, "model_id": v.model_id,
                            "source": v.source} for v in rows])

    def user_history(self, user_id: str) -> list[UserSummaryVersion]:
        """Every stored version for a user, by step (then by how much history it covers)."""
        got = self.users.get(where={"user_id": user_id}, include=["documents", "metadatas"])
        vs = [self._user_from(k, d, m) for k, d, m in zip(got["ids"], got["documents"], got["metadatas"], strict=True)]
        return sorted(vs, key=lambda v: (v.step, len(v.covered), v.timestamp))

    @staticmethod
    def _user_from(key: str, doc: str, m: dict[str, Any]) -> UserSummaryVersion:
        return UserSummaryVersion(m["user_id"], int(m["step"]), key, doc, tuple(json.loads(m["covered"])),
                                  float(m["timestamp"]), m["prompt_version"], m["model_id"],
                                  m.get("source", "history"))
