"""One layered configuration (like RecBole): defaults → YAML file → ``--set key.sub=value`` flags.

Every key is typed and documented (pydantic ``Field(description=...)``); ``msr config`` prints them.
"""
from __future__ import annotations

import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Field

from mllm_msr.agents.item_summarizer import ItemSummarizerConfig
from mllm_msr.agents.recommender import RecommenderConfig
from mllm_msr.agents.user_memory import MemoryConfig
from mllm_msr.data.protocol import ProtocolConfig
from mllm_msr.data.synth import SynthConfig
from mllm_msr.models.factory import ModelConfig
from mllm_msr.stores.summaries import StoreConfig


class EngineConfig(BaseModel):
    """Where the dataset-wide stages run."""

    kind: Literal["local", "ray"] = Field(
        "local", description="'local' = this process; 'ray' = Ray Data pipelines (map_batches over actor pools) "
                             "on the cluster at engine.ray_address; needs the Chroma server (store.host).")
    ray_address: str | None = Field(
        None, description="Ray cluster to join ('auto', 'HOST:6379' or 'ray://HOST:10001'); None = start a local "
                          "Ray with engine.num_cpus CPUs.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray started when ray_address is None "
                                                         "(None = all).")
    actors: int = Field(2, ge=1, description="Actors per stage (each holds its own backends).")
    cpus_per_actor: float = Field(1.0, ge=0, description="CPUs Ray reserves for each actor.")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs Ray reserves for each actor (in-process vLLM on "
                                                         "GPUs: its tensor_parallel size).")
    users_per_batch: int = Field(8, ge=1, description="Users per batch in the memory and scoring stages.")



class MSRConfig(BaseModel):
    """The whole framework's settings."""

    dataset: str = Field("synth",
        description="'synth' (bundled benchmark), 'ml-100k' (recbole wheel, text only), or a dataset folder (MicroLens"
                    " / Amazon 2023 / RecBole layout).")
    synth: SynthConfig = Field(default_factory=SynthConfig, description="Bundled benchmark settings.")
    protocol: ProtocolConfig = Field(default_factory=ProtocolConfig,
        description="Splits and negatives (paper protocol).")
    generator: ModelConfig = Field(default_factory=lambda: ModelConfig(backend="vllm"),
        description="Model that writes item and user summaries. Default: vLLM in process, float32 "
                    "(bench/results/bench_summarize.json: ~2x transformers' best batch, on par with a managed "
                    "vLLM server and no second process); summaries cached by either backend are shared.")
    scorer: ModelConfig = Field(default_factory=ModelConfig,
        description="Model that scores candidates (with the LoRA adapter).")
    items: ItemSummarizerConfig = Field(default_factory=ItemSummarizerConfig, description="Item summarizer.")
    memory: MemoryConfig = Field(default_factory=MemoryConfig, description="Recurrent user memory.")
    recommender: RecommenderConfig = Field(default_factory=RecommenderConfig, description="Recommender.")
    store: StoreConfig = Field(default_factory=StoreConfig, description="Chroma store.")
    checkpointer: str | None = Field(
        None, pattern=r"^(sqlite:///|postgres(ql)?://)",
        description="Where LangGraph checkpoints live: 'postgresql://user:pass@host:port/db' "
                    "(LangGraph's Postgres checkpointer), 'sqlite:///PATH', or None = SQLite files in run_dir.")
    engine: EngineConfig = Field(default_factory=EngineConfig,
        description="Where the dataset-wide stages run: this process, or Ray Data pipelines on a cluster.")
    run_dir: str = Field("runs/default", description="Where results, scores and checkpoints are written.")
    max_test_users: int | None = Field(100,
        description="`msr run` scores the first N test users of the split (None = all). 100 keeps the main job within "
                    "its 15-minute budget on 2 cores; `msr eval` always scores every test user.")
    retrieve_n: int = Field(20, description="Candidates retrieved from Chroma when none are given.")
    seed: int = Field(0, description="Global seed.")


M = TypeVar("M", bound=BaseModel)


def _section(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (also inside ``X | None``), else None (a leaf or a dict)."""
    if get_origin(annotation) in (Union, types.UnionType):
        return next((a for a in map(_section, get_args(annotation)) if a is not None), None)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _set_dotted(cls: type[BaseModel], d: dict, dotted: str, value: Any) -> None:
    """``d[k1][k2]... = value``; every key inside a pydantic section must be one of its fields
    (keys inside a dict-valued setting, e.g. ``scorer.adapters.rec``, are free)."""
    keys = dotted.split(".")
    section: type[BaseModel] | None = cls
    for n, k in enumerate(keys):
        if section is not None:
            if k not in section.model_fields:
                raise ValueError(f"unknown setting {'.'.join(keys[:n + 1])!r}; one of {sorted(section.model_fields)}")
            section = _section(section.model_fields[k].annotation)
        if n == len(keys) - 1:
            d[k] = value
            return
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ValueError(f"config override {dotted!r}: {k!r} is not a section")


def apply_overrides(model: type[M] | M, overrides: Iterable[str]) -> M:
    """``key.sub=value`` overrides (values parsed as YAML) on a pydantic config: a class (its
    defaults) or an instance. Unknown keys are an error naming the known ones; the result is validated."""
    cls = model if isinstance(model, type) else type(model)
    data = (model() if isinstance(model, type) else model).model_dump()
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} must look like key.sub=value")
        k, v = ov.split("=", 1)
        _set_dotted(cls, data, k.strip(), yaml.safe_load(v))
    return cls.model_validate(data)


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
    return apply_overrides(MSRConfig.model_validate(data), overrides)


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
