"""The per-user recipe, written once: services, the preference text, and per-case scoring.

Everything that turns a config and a dataset into scores goes through this module:

* :func:`finalize_config` resolves the config once (shipped adapters attached, or zero-shot when
  the wanted one is missing), as RecBole's ``Config`` does; :func:`build_services` calls it.
* :class:`Services` holds the agents, the store and the scorer's cache key (adapter weights hash
  included). :meth:`Services.preference_text` is the one place that decides what the recommender
  reads about a user (titles or summary, recent item summaries, the "no preferences" fallback).
* :func:`score_cases` scores many users stage by stage (all item summaries, then every user's
  memory block b as one batch, then each user's candidates in one prefix-shared call) and
  **returns rows**; :func:`run_cases` adds metrics, timings and the resumable ``scores.jsonl``.

The graph nodes, the batch runner, ``msr eval``, prompt eval and SFT example building all call
these; none re-implements them.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import Progress

from mllm_msr.agents.item_summarizer import ItemSummarizer
from mllm_msr.agents.recommender import Recommender
from mllm_msr.agents.user_memory import UserHistory, UserMemory
from mllm_msr.config import MSRConfig
from mllm_msr.data.protocol import EvalCase
from mllm_msr.data.schema import DataError, Dataset, Item
from mllm_msr.hashing import digest
from mllm_msr.metrics import evaluate, user_bootstrap
from mllm_msr.models.base import ModelBackend
from mllm_msr.models.factory import ModelConfig, resolve_model_path
from mllm_msr.paths import adapter_sha256
from mllm_msr.stores.summaries import ItemSummary, SummaryStore, UserSummaryVersion

log = logging.getLogger(__name__)

NO_PREFERENCES = "No preferences known yet."
WEIGHTS = Path(__file__).resolve().parent / "weights"
SHIPPED_ADAPTER = WEIGHTS / "rec_adapter"
SHIPPED_TALLREC_ADAPTER = WEIGHTS / "tallrec_adapter"
SHIPPED_RECENT_ADAPTER = WEIGHTS / "rec_recent_adapter"
SHIPPED_MEMORY_ADAPTER = WEIGHTS / "memory_adapter"
# adapter name → shipped folder (trained for the embedded default on the bundled benchmark):
# "rec" = MLLM-MSR (the paper's input), "tallrec" = titles-only baseline, "rec_recent" = the
# recent-items extension
SHIPPED_ADAPTERS = {"rec": SHIPPED_ADAPTER, "tallrec": SHIPPED_TALLREC_ADAPTER, "rec_recent": SHIPPED_RECENT_ADAPTER}


# ------------------------------------------------------------------------------ config, data

def load_data(cfg: MSRConfig) -> Dataset:
    """The configured dataset; 'synth' generates the bundled benchmark once (cached by config hash)."""
    from mllm_msr.data.loaders import load_dataset, load_microlens
    from mllm_msr.data.synth import default_benchmark_dir, generate_benchmark

    if cfg.dataset == "synth":
        root = generate_benchmark(default_benchmark_dir(cfg.synth), cfg.synth)
        return load_microlens(root)
    return load_dataset(cfg.dataset)


def finalize_config(cfg: MSRConfig) -> MSRConfig:
    """The config as it will really run: the shipped LoRA adapters attached for the embedded
    default ("rec" = MLLM-MSR, "tallrec" = the titles-only baseline), or zero-shot (with a
    warning) when the wanted adapter is missing. Idempotent."""
    adapters = dict(cfg.scorer.adapters)
    if cfg.scorer.model == "embedded":
        for n, folder in SHIPPED_ADAPTERS.items():
            if n not in adapters and (folder / "adapter_config.json").exists():
                adapters[n] = str(folder)
    if adapters != cfg.scorer.adapters:
        cfg = cfg.model_copy(update={"scorer": cfg.scorer.model_copy(update={"adapters": adapters})})
    cfg = _finalize_memory_adapter(cfg)
    name = cfg.recommender.adapter
    if name is None or name in adapters:
        return cfg
    log.warning("no LoRA adapter %r configured or shipped for %s: scoring zero-shot", name, cfg.scorer.model)
    return cfg.model_copy(update={"recommender": cfg.recommender.model_copy(update={"adapter": None})})


def _finalize_memory_adapter(cfg: MSRConfig) -> MSRConfig:
    """The memory's LoRA on the generator: the shipped one for the embedded default, or the base
    model when the wanted adapter is neither configured nor shipped."""
    name = cfg.memory.adapter
    if name is None:
        return cfg
    gen = dict(cfg.generator.adapters)
    if name == "auto":
        if "memory" in gen:
            name = "memory"
        elif cfg.generator.model == "embedded" and (SHIPPED_MEMORY_ADAPTER / "adapter_config.json").exists():
            name, gen["memory"] = "memory", str(SHIPPED_MEMORY_ADAPTER)
            cfg = cfg.model_copy(update={"generator": cfg.generator.model_copy(update={"adapters": gen})})
        else:
            name = None
    elif name not in gen:
        log.warning("no memory adapter %r in generator.adapters: the memory writes with the base model", name)
        name = None
    return cfg.model_copy(update={"memory": cfg.memory.model_copy(update={"adapter": name})})


def memory_adapter_folder(cfg: MSRConfig) -> str | None:
    """The folder of the adapter the user memory writes with (None: the base model)."""
    name = cfg.memory.adapter
    return cfg.generator.adapters.get(name) if name and name != "auto" else None


def adapter_folder(cfg: MSRConfig) -> str | None:
    """The folder of the adapter the recommender scores with (None: zero-shot)."""
    name = cfg.recommender.adapter
    return cfg.scorer.adapters.get(name) if name else None


class LeakError(ValueError):
    """Scoring would use a LoRA adapter on users it was trained on."""


_warned_no_record: set[str] = set()


def adapter_leak(cfg: MSRConfig, dataset: Dataset, user_ids: Sequence[str]) -> str | None:
    """Why scoring ``user_ids`` with the config's LoRA adapters would leak (None: it would not).

    Both adapters are checked: the recommender's and the user memory's. An adapter's
    ``PROVENANCE.json`` records the dataset fingerprint and the ids of the users it was trained on.
    On the same data (same fingerprint), scoring any of those users is a leak. An adapter without
    such a record gets a warning (it cannot be checked)."""
    for role, name, folder in (("recommender", cfg.recommender.adapter, adapter_folder(cfg)),
                               ("memory", cfg.memory.adapter, memory_adapter_folder(cfg))):
        why = _leak(role, name, folder, dataset, user_ids) if folder else None
        if why:
            return why
    return None


def _leak(role: str, name: str | None, folder: str, dataset: Dataset, user_ids: Sequence[str]) -> str | None:
    prov_file = Path(folder) / "PROVENANCE.json"
    data: dict = {}
    if prov_file.is_file():
        try:
            data = json.loads(prov_file.read_text(encoding="utf-8")).get("data") or {}
        except (OSError, ValueError):
            data = {}
    trained = data.get("train_user_ids")
    fp = (data.get("dataset_fingerprint") or {}).get("digest")
    if trained is None or fp is None:
        if folder not in _warned_no_record:
            _warned_no_record.add(folder)
            log.warning("%s adapter %r (%s) has no record of its training users in PROVENANCE.json: "
                        "cannot check that the users it scores were not its training users", role, name, folder)
        return None
    if fp != dataset.fingerprint()["digest"]:
        return None  # trained on other data: other users altogether
    overlap = sorted(set(trained) & set(user_ids))
    if not overlap:
        return None
    return (f"{role} adapter {name!r} ({folder}) was trained on {len(overlap)} of the {len(set(user_ids))} users to "
            f"score (e.g. {', '.join(overlap[:5])}) on this dataset ({fp}): their scores would leak training "
            "data; score held-out users (the split's valid/test users) or another adapter")


def check_no_leak(cfg: MSRConfig, dataset: Dataset, user_ids: Sequence[str]) -> None:
    """Raise :class:`LeakError` when :func:`adapter_leak` finds an overlap."""
    why = adapter_leak(cfg, dataset, user_ids)
    if why:
        raise LeakError(why)


# ---------------------------------------------------------------------------------- backends

class LazyBackend(ModelBackend):
    """Builds the real backend on first use, so a fully cached run never loads a model.

    Its ``model_id`` names the model, not the backend (folder name + dtype, or model@endpoint):
    transformers and vLLM on the same weights share cached summaries.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self._backend: ModelBackend | None = None
        self._building = threading.Lock()  # one build, also when warm_up() runs in a thread
        if cfg.base_url:
            self.model_id = f"{cfg.model}@{cfg.base_url}"
        else:
            self.model_id = f"{resolve_model_path(cfg.model).name}:{cfg.dtype}"

    @property
    def backend(self) -> ModelBackend:
        if self._backend is None:
            with self._building:
                if self._backend is None:
                    from mllm_msr.models.factory import make_backend

                    self._backend = make_backend(self.cfg)
        return self._backend

    def warm_up(self) -> threading.Thread:
        """Build the backend in a daemon thread (imports + weights) while the caller goes on, e.g.
        while an interactive command waits for the user's first words; the first real call waits
        for it. A failure is left for that call to raise."""
        def build() -> None:
            try:
                self.backend  # noqa: B018
            except Exception:  # noqa: BLE001 - the first real call rebuilds and raises it
                log.debug("background model build failed", exc_info=True)
        t = threading.Thread(target=build, name="msr-warm-up", daemon=True)
        t.start()
        return t

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
        # one instance serves both roles; adapters apply per request (the memory's and the scorer's)
        shared = LazyBackend(sc_cfg.model_copy(update={"adapters": {**gen_cfg.adapters, **sc_cfg.adapters}}))
        return shared, shared
    return LazyBackend(gen_cfg), LazyBackend(sc_cfg)


# ---------------------------------------------------------------------------------- services

@dataclass
class Services:
    """Everything the nodes and batch stages need; built once by :func:`build_services`."""

    cfg: MSRConfig
    dataset: Dataset
    summarizer: ItemSummarizer
    memory: UserMemory
    recommender: Recommender
    store: SummaryStore
    retrieve_n: int = 20
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.catalog: dict[str, Item] = self.dataset.items
        r = self.recommender
        titles = r.cfg.history == "titles"
        # what a cached score depends on: model, adapter CONTENT, prompts and the recipe's settings
        self.scorer_key = digest(r.backend.model_id, r.cfg.adapter, adapter_sha256(adapter_folder(self.cfg)),
                                 r.p_image.version, r.p_text.version, r.cfg.use_images, r.cfg.recent_items,
                                 r.cfg.history, r.p_titles.version if titles else None,
                                 r.cfg.title_history if titles else None)

    def warm_up(self) -> None:
        """Start loading the models not loaded yet in the background (interactive commands call this
        first, so imports and weights load while the store opens and the user types)."""
        backends = {id(b): b for b in (self.summarizer.llm, self.memory.llm, self.recommender.backend)}
        for b in backends.values():
            if isinstance(b, LazyBackend) and b._backend is None:
                b.warm_up()

    def check_users(self, user_ids: Sequence[str]) -> None:
        """The leak guard every scoring path calls (batch runs, graph nodes, chat, web, eval)."""
        check_no_leak(self.cfg, self.dataset, user_ids)

    @property
    def uses_summaries(self) -> bool:
        """False for the TALLRec-style titles mode, which reads no item or user summaries."""
        return self.recommender.cfg.history != "titles"

    def items(self, ids: Sequence[str], what: str) -> list[Item]:
        unknown = [i for i in ids if i not in self.catalog]
        if unknown:
            raise DataError(f"{what}: unknown item ids {unknown[:5]}", field_name="item_id")
        return [self.catalog[i] for i in ids]

    def preference_text(self, history: Sequence[str], summary: str | None,
                        item_summaries: Mapping[str, ItemSummary] | None = None) -> str:
        """What the recommender reads about a user whose chronological ``history`` (item ids) is
        given and whose latest preference summary is ``summary`` (None: no summary yet).

        * titles mode (TALLRec-style): the latest history titles, no summaries;
        * summary mode (MLLM-MSR): the summary (or :data:`NO_PREFERENCES`), followed by the
          summaries of the last ``recommender.recent_items`` history items when that extension is
          on (0 = the paper's input exactly). ``item_summaries`` may hold them already; missing
          ones are summarized (cached in the store).
        """
        rec = self.recommender
        if not self.uses_summaries:
            return rec.titles_context([t.title for t in self.items(history, "history")])
        k = rec.cfg.recent_items
        last = list(history[-k:]) if k else []
        sums: Mapping[str, ItemSummary] = item_summaries or {}
        if any(i not in sums for i in last):
            sums = {**sums, **self.summarizer.summarize(self.items(last, "history"))}
        return rec.context(summary or NO_PREFERENCES, [sums[i].summary for i in last])


def build_services(cfg: MSRConfig, dataset: Dataset, *, generator: ModelBackend | None = None,
                   scorer: ModelBackend | None = None, store: SummaryStore | None = None) -> Services:
    """Services for ``cfg`` (finalized here: callers never resolve adapters themselves)."""
    cfg = finalize_config(cfg)
    if generator is None or scorer is None:
        g, s = make_backends(cfg)
        generator, scorer = generator or g, scorer or s
    store = store or SummaryStore(cfg.store)
    return Services(
        cfg=cfg,
        dataset=dataset,
        summarizer=ItemSummarizer(generator, generator, store, cfg.items),
        memory=UserMemory(generator, store, cfg.memory, adapter_sha256(memory_adapter_folder(cfg))),
        recommender=Recommender(scorer, cfg.recommender),
        store=store,
        retrieve_n=cfg.retrieve_n,
    )


# ------------------------------------------------------------------------------ case scoring

def _read_done(path: Path) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                    done[row["key"]] = row
                except (ValueError, KeyError):
                    continue  # a line cut by a kill mid-write: recompute that user
    return done


Advance = Callable[[str, int, int | None], None]  # (stage, n done, total or None)
# engine.kind → the module that implements score_cases on that engine; the module registers its
# implementation in ENGINES when imported (so the pipeline does not import the engines above it)
ENGINE_MODULES = {"ray": "mllm_msr.distributed"}
ENGINES: dict[str, Callable[..., list[dict]]] = {}


def summarize_cases(s: Services, cases: Sequence[EvalCase], advance: Advance | None = None,
                    timings: dict[str, float] | None = None
                    ) -> tuple[dict[str, ItemSummary], dict[str, UserSummaryVersion]]:
    """Stages 1-2 for many users: every needed item summary (batched, cached), then the recurrent
    memory with all users' block b in one batch. Returns (item summaries, latest version per user)."""
    timings = timings if timings is not None else {}
    if not s.uses_summaries:
        return {}, {}
    t0 = time.perf_counter()
    ids = list(dict.fromkeys(i for c in cases for i in (*c.history, *c.candidates)))
    summaries = s.summarizer.summarize(s.items(ids, "cases"),
                                       progress=(lambda n: advance("item summaries", n, len(ids))) if advance else None)
    timings["items_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    hist = [UserHistory(c.user_id, tuple(c.history), tuple(c.history_timestamps)) for c in cases]
    latest = s.memory.update_many(hist, s.catalog, summaries,
                                  progress=(lambda n: advance("user summaries", n, None)) if advance else None)
    timings["users_s"] = time.perf_counter() - t1
    return summaries, latest


def score_cases(s: Services, cases: Sequence[EvalCase], *, resume_file: str | Path | None = None,
                advance: Advance | None = None, timings: dict[str, float] | None = None) -> list[dict]:
    """One row per case: ``key, user_id, candidates, labels, scores, summary`` (the preference text
    the recommender read). With ``resume_file`` (JSONL), rows already there under the same key are
    reused and new rows are appended and fsynced as they are scored, so a killed run resumes."""
    s.check_users([c.user_id for c in cases])
    if s.cfg.engine.kind != "local":  # the same stages on another engine (e.g. Ray Data: mllm_msr/distributed.py)
        importlib.import_module(ENGINE_MODULES[s.cfg.engine.kind])  # registers itself in ENGINES
        return ENGINES[s.cfg.engine.kind](s, cases, resume_file=resume_file, advance=advance, timings=timings)
    timings = timings if timings is not None else {}
    summaries, latest = summarize_cases(s, cases, advance, timings)
    t2 = time.perf_counter()
    done = _read_done(Path(resume_file)) if resume_file else {}
    rows: list[dict] = []
    out = open(resume_file, "a", encoding="utf-8") if resume_file else None
    try:
        for n, c in enumerate(cases, 1):
            v = latest.get(c.user_id)
            text = s.preference_text(c.history, v.summary if v else None, summaries)
            key = digest(c.user_id, v.key if v else text, list(c.candidates), s.scorer_key)
            row = done.get(key)
            if row is None:
                scores = s.recommender.score(text, s.items(c.candidates, f"user {c.user_id} candidates"))
                row = {"key": key, "user_id": c.user_id, "candidates": list(c.candidates),
                       "labels": list(c.labels), "scores": scores, "summary": text}
                if out is not None:
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                    os.fsync(out.fileno())
            rows.append(row)
            if advance:
                advance("scoring", n, len(cases))
    finally:
        if out is not None:
            out.close()
    timings["scoring_s"] = time.perf_counter() - t2
    return rows


def run_cases(s: Services, cases: Sequence[EvalCase], run_dir: str | Path,
              show_progress: bool = True) -> dict[str, Any]:
    """Score every case (resumable ``scores.jsonl`` in ``run_dir``) and return
    ``{"metrics", "users", "model_calls", "timings_s", "rows"}``; also writes ``metrics.json``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    calls0 = (s.summarizer.model_calls, s.memory.model_calls, s.recommender.model_calls)
    with Progress(disable=not show_progress, transient=False) as prog:
        tasks: dict[str, Any] = {}

        def advance(stage: str, n: int, total: int | None) -> None:
            if stage not in tasks:
                tasks[stage] = prog.add_task(stage, total=total)
            if stage == "scoring":
                prog.update(tasks[stage], completed=n)
            else:
                prog.advance(tasks[stage], n)

        rows = score_cases(s, cases, resume_file=run_dir / "scores.jsonl", advance=advance, timings=timings)
    metrics = evaluate(cases, [r["scores"] for r in rows])
    if len(cases) > 1:  # AUC's 95% bootstrap interval over users (the evidence, not just the number)
        ci = user_bootstrap(cases, [r["scores"] for r in rows], metrics=["auc"])["auc"]
        metrics.update(auc_ci95_low=ci["low"], auc_ci95_high=ci["high"])
    calls = (s.summarizer.model_calls, s.memory.model_calls, s.recommender.model_calls)
    result = {
        "metrics": metrics,
        "users": len(cases),
        "model_calls": {"item_summaries": calls[0] - calls0[0], "user_summaries": calls[1] - calls0[1],
                        "scored_pairs": calls[2] - calls0[2]},
        "timings_s": {k: round(v, 2) for k, v in {**timings, "total_s": time.perf_counter() - t0}.items()},
    }
    (run_dir / "metrics.json").write_text(json.dumps(result, indent=1))
    return {**result, "rows": rows}
