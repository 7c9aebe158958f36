"""Build the shared services (dataset, backends, store, agents) from one config."""
from __future__ import annotations

import logging
from pathlib import Path

from mllm_msr.agents.item_summarizer import ItemSummarizer
from mllm_msr.agents.recommender import Recommender
from mllm_msr.agents.user_memory import UserMemory
from mllm_msr.config import MSRConfig
from mllm_msr.data.schema import Dataset
from mllm_msr.graphs.nodes import Services
from mllm_msr.models.base import ModelBackend
from mllm_msr.models.factory import ModelConfig, resolve_model_path
from mllm_msr.stores.summaries import SummaryStore

log = logging.getLogger(__name__)

SHIPPED_ADAPTER = Path(__file__).resolve().parent / "weights" / "rec_adapter"
SHIPPED_TALLREC_ADAPTER = SHIPPED_ADAPTER.parent / "tallrec_adapter"
# adapter name → shipped folder (trained for the embedded default on the bundled benchmark)
SHIPPED_ADAPTERS = {"rec": SHIPPED_ADAPTER, "tallrec": SHIPPED_TALLREC_ADAPTER}


def load_data(cfg: MSRConfig) -> Dataset:
    """The configured dataset; 'synth' generates the bundled benchmark once (cached by config hash)."""
    from mllm_msr.data.loaders import load_dataset, load_microlens
    from mllm_msr.data.synth import default_benchmark_dir, generate_benchmark

    if cfg.dataset == "synth":
        root = generate_benchmark(default_benchmark_dir(cfg.synth), cfg.synth)
        return load_microlens(root)
    return load_dataset(cfg.dataset)


def resolve_adapter(cfg: MSRConfig) -> MSRConfig:
    """Attach the shipped LoRA adapters for the embedded default ("rec" = MLLM-MSR, "tallrec" =
    the titles-only baseline), or fall back to zero-shot when the wanted one is missing."""
    adapters = dict(cfg.scorer.adapters)
    if cfg.scorer.model == "embedded":
        for n, folder in SHIPPED_ADAPTERS.items():
            if n not in adapters and (folder / "adapter_config.json").exists():
                adapters[n] = str(folder)
    if adapters != cfg.scorer.adapters:
        cfg = cfg.model_copy(update={"scorer": cfg.scorer.model_copy(update={"adapters": adapters})})
    name = cfg.recommender.adapter
    if name is None or name in adapters:
        return cfg
    log.warning("no LoRA adapter %r configured or shipped for %s: scoring zero-shot", name, cfg.scorer.model)
    return cfg.model_copy(update={"recommender": cfg.recommender.model_copy(update={"adapter": None})})


class LazyBackend(ModelBackend):
    """Builds the real backend on first use, so a fully cached run never loads a model.

    Its ``model_id`` names the model, not the backend (folder name + dtype, or model@endpoint):
    transformers and vLLM on the same weights share cached summaries.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self._backend: ModelBackend | None = None
        if cfg.base_url:
            self.model_id = f"{cfg.model}@{cfg.base_url}"
        else:
            self.model_id = f"{resolve_model_path(cfg.model).name}:{cfg.dtype}"

    @property
    def backend(self) -> ModelBackend:
        if self._backend is None:
            from mllm_msr.models.factory import make_backend

            self._backend = make_backend(self.cfg)
        return self._backend

    @property
    def supports_images(self) -> bool:  # type: ignore[override]
        return self.backend.supports_images

    def generate(self, requests, **kw):
        return self.backend.generate(requests, **kw)

    def score_yes_no(self, requests):
        return self.backend.score_yes_no(requests)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()


def make_backends(cfg: MSRConfig) -> tuple[ModelBackend, ModelBackend]:
    """(generator, scorer); one shared instance when both roles use the same model and backend."""
    gen_cfg, sc_cfg = cfg.generator, cfg.scorer
    if gen_cfg.model_dump(exclude={"adapters"}) == sc_cfg.model_dump(exclude={"adapters"}):
        shared = LazyBackend(sc_cfg)  # adapters apply per request; generation uses the base model
        return shared, shared
    return LazyBackend(gen_cfg), LazyBackend(sc_cfg)


def build_services(cfg: MSRConfig, dataset: Dataset, *, generator: ModelBackend | None = None,
                   scorer: ModelBackend | None = None, store: SummaryStore | None = None) -> Services:
    if generator is None or scorer is None:
        g, s = make_backends(cfg)
        generator, scorer = generator or g, scorer or s
    store = store or SummaryStore(cfg.store)
    return Services(
        catalog=dataset.items,
        summarizer=ItemSummarizer(generator, generator, store, cfg.items),
        memory=UserMemory(generator, store, cfg.memory),
        recommender=Recommender(scorer, cfg.recommender),
        store=store,
        retrieve_n=cfg.retrieve_n,
    )
