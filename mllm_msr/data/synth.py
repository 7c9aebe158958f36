"""A bundled synthetic multimodal benchmark in the MicroLens layout, deterministic by seed.

Design (a fair, learnable test of the paper's claims):

* Items have visual attributes (colour, shape, pattern) drawn on their cover and never written
  in the title, and a textual genre that is written in the title.
* Each user has latent ADDITIVE preferences: one liked colour, one liked genre and a weaker liked
  pattern. Each interaction is sampled with probability
  ``∝ exp(beta * (match_colour + match_genre + pattern_weight * match_pattern))``, so every
  single attribute carries signal on its own.
* Preferences drift: from ``drift_at`` (a fraction of the sequence) on, the liked colour switches
  to another colour; the final target follows the latest preference.
* Cold items (``cold_item_fraction``) never appear in any history; they appear only as final
  targets of the test users of the default protocol split (``split_seed``), so ID-only models
  meet items they never saw.
* The vocabulary (colour / shape / pattern / genre values, title words) and the cover style come
  from a registered catalog (``catalog``: :data:`mllm_msr.data.covers.CATALOGS`). "default" is the
  original benchmark; "alt" is a disjoint vocabulary in another cover style, used without designed
  cold items (``configs/synth-alt.yaml``) to check that nothing is tuned to one catalog.

Files written to ``out_dir``: ``synth_pairs.tsv`` (``user\\titem item …`` chronological),
``synth_titles.csv`` (``item,title``), ``synth_timestamps.tsv`` (``user\\titem\\tunix_seconds``),
``covers/{item}.jpg`` (128 px, JPEG quality 95) and ``ground_truth.json`` (with ``catalog`` when it
is not "default").
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from mllm_msr.data.covers import DEFAULT_CATALOG, Catalog, CatalogName, caption, draw_cover, get_catalog
from mllm_msr.hashing import json_digest, omit_at_default
from mllm_msr.paths import msr_home  # noqa: F401 (re-exported)

GENERATOR_VERSION = "1"
PREFIX = "synth"

# The default catalog's genres and title words (the vocabulary lives in mllm_msr.data.covers).
GENRES: tuple[str, ...] = DEFAULT_CATALOG.genres
ADJECTIVES, NOUNS = DEFAULT_CATALOG.title_words()


class SynthConfig(BaseModel):
    """Settings of the synthetic benchmark; the hash of these names its cache folder."""

    n_users: int = Field(3000, ge=10, description="Number of users. 3000 gives 300 test users at the paper's 80/10/10 split, so an AUC's 95% bootstrap interval is about ±0.03 (120 users gave 12 test users and ±0.16).")
    n_items: int = Field(240, ge=20, description="Number of items in the catalogue.")
    min_history: int = Field(7, ge=1, description="Minimum history length (interactions before the final target).")
    max_history: int = Field(12, ge=1, description="Maximum history length (interactions before the final target).")
    seed: int = Field(0, description="Random seed; the same seed gives byte-identical files.")
    drift_at: float = Field(0.6, ge=0.0, le=1.0, description="Fraction of a user's sequence after which the liked colour switches (1.0 = no drift).")
    cold_item_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of items held out of every history; they appear only as test users' final targets.")
    cold_target_prob: float = Field(0.5, ge=0.0, le=1.0, description="Probability that a test user's final target is drawn from the cold items.")
    beta: float = Field(3.0, ge=0.0, description="Preference strength: p(item) ∝ exp(beta * score). 3.0: an oracle that knows the attributes of the last 3 history items reaches test AUC ~0.84 (2.0: ~0.65, too weak a signal for a 135M model to learn from ~700 SFT examples).")
    pattern_weight: float = Field(0.5, ge=0.0, description="Weight of the liked pattern in the score (colour and genre weigh 1).")
    split_seed: int = Field(0, description="Seed of the by-user split the cold items are reserved for; equal to ProtocolConfig.seed by default.")
    train_frac: float = Field(0.8, gt=0.0, lt=1.0, description="Training fraction of the by-user split (as ProtocolConfig).")
    valid_frac: float = Field(0.1, ge=0.0, lt=1.0, description="Validation fraction of the by-user split (as ProtocolConfig).")
    image_size: int = Field(128, ge=16, description="Cover size in pixels.")
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG quality of the covers.")
    catalog: CatalogName = Field("default", description="Vocabulary and cover style (mllm_msr.data.covers.CATALOGS): 'default' (8 colours, 5 shapes, 3 patterns, 8 genres, light covers) or 'alt', a disjoint vocabulary of the same sizes (other colours, shapes, textures, genres and title words) drawn as dark framed posters with a smaller off-centre shape. 'alt' is meant without designed cold items: cold_item_fraction=0 and cold_target_prob=0 (configs/synth-alt.yaml). Left out of the dump (and so of the hash and ground_truth.json) when 'default', so existing benchmarks keep their folder and bytes.")

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict:
        return omit_at_default(handler(self), self, "catalog")

    def vocabulary(self) -> Catalog:
        return get_catalog(self.catalog)

    def config_hash(self) -> str:
        return json_digest({"v": GENERATOR_VERSION, **self.model_dump()}, 12)



def default_benchmark_dir(cfg: SynthConfig | None = None) -> Path:
    """The cache folder of a configuration: ``$MSR_HOME/data/synth-<hash>``."""
    cfg = cfg or SynthConfig()
    return msr_home() / "data" / f"synth-{cfg.config_hash()}"


def item_caption(item_attrs: Mapping[str, str], catalog: Catalog = DEFAULT_CATALOG) -> str:
    """The ground-truth visual caption of an item from its attributes (for alignment)."""
    return caption(item_attrs["colour"], item_attrs["shape"], item_attrs["pattern"], catalog)


def _is_complete(out_dir: Path, cfg: SynthConfig) -> bool:
    gt = out_dir / "ground_truth.json"
    if not gt.is_file():
        return False
    try:
        meta = json.loads(gt.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if meta.get("config_hash") != cfg.config_hash():
        return False
    needed = [out_dir / f"{PREFIX}_pairs.tsv", out_dir / f"{PREFIX}_titles.csv",
              out_dir / f"{PREFIX}_timestamps.tsv"]
    needed += [out_dir / "covers" / f"{i}.jpg" for i in meta.get("items", {})]
    return all(p.is_file() for p in needed)


def _make_title(rng: random.Random, genre: str, used: set[str], catalog: Catalog) -> str:
    adjectives, nouns = catalog.title_words()
    for _ in range(1000):
        adj, adj2 = rng.sample(adjectives, 2)
        noun, noun2 = rng.sample(nouns, 2)
        title = rng.choice(catalog.templates).format(adj=adj, adj2=adj2, noun=noun, noun2=noun2, genre=genre)
        if title not in used:
            used.add(title)
            return title
    raise RuntimeError("could not make a unique title")  # pragma: no cover


def _weighted_pick(rng: random.Random, pool: list[str], weights: list[float]) -> str:
    total = sum(weights)
    x = rng.random() * total
    acc = 0.0
    for item, w in zip(pool, weights):
        acc += w
        if x < acc:
            return item
    return pool[-1]


def _generate(cfg: SynthConfig) -> dict:
    """All content of the benchmark as plain data (no files)."""
    if cfg.min_history > cfg.max_history:
        raise ValueError("min_history must be <= max_history")
    rng = random.Random(cfg.seed)
    cat = cfg.vocabulary()
    colours, genres = list(cat.colours), list(cat.genres)
    width = max(4, len(str(cfg.n_items)))
    items: dict[str, dict] = {}
    used: set[str] = set()
    for n in range(1, cfg.n_items + 1):
        iid = f"i{n:0{width}d}"
        genre = genres[(n - 1) % len(genres)] if n <= len(genres) else rng.choice(genres)
        items[iid] = {"colour": rng.choice(colours), "shape": rng.choice(cat.shapes),
                      "pattern": rng.choice(cat.patterns), "genre": genre}
        items[iid]["title"] = _make_title(rng, genre, used, cat)
    item_ids = list(items)
    n_cold = int(round(cfg.cold_item_fraction * cfg.n_items))
    cold = sorted(rng.sample(item_ids, n_cold))
    cold_set = set(cold)
    warm = [i for i in item_ids if i not in cold_set]
    for iid in item_ids:
        items[iid]["cold"] = iid in cold_set

    uwidth = max(4, len(str(cfg.n_users)))
    user_ids = [f"u{n:0{uwidth}d}" for n in range(1, cfg.n_users + 1)]
    # Reserve cold items for the test users of the default by-user split.
    from mllm_msr.data.protocol import split_users
    _, valid_u, test_u = split_users(user_ids, seed=cfg.split_seed, train_frac=cfg.train_frac,
                                     valid_frac=cfg.valid_frac)
    test_set, valid_set = set(test_u), set(valid_u)

    def score(iid: str, colour: str, genre: str, pattern: str) -> float:
        a = items[iid]
        s = (a["colour"] == colour) + (a["genre"] == genre) + cfg.pattern_weight * (a["pattern"] == pattern)
        return math.exp(cfg.beta * s)

    users: dict[str, dict] = {}
    sequences: dict[str, list[str]] = {}
    timestamps: dict[str, list[int]] = {}
    for uid in user_ids:
        c1 = rng.choice(colours)
        c2 = rng.choice([c for c in colours if c != c1])
        g = rng.choice(genres)
        p = rng.choice(list(cat.patterns))
        seq_len = rng.randint(cfg.min_history, cfg.max_history) + 1
        drift = seq_len if cfg.drift_at >= 1.0 else min(seq_len - 1, max(1, round(cfg.drift_at * seq_len)))
        seq: list[str] = []
        for pos in range(seq_len):
            colour = c1 if pos < drift else c2
            if pos == seq_len - 1 and uid in test_set:
                pool = [i for i in item_ids if i not in seq]
                if cold and rng.random() < cfg.cold_target_prob:
                    pool = [i for i in cold if i not in seq] or pool
            else:
                pool = [i for i in warm if i not in seq]
            seq.append(_weighted_pick(rng, pool, [score(i, colour, g, p) for i in pool]))
        t = 1_700_000_000 + rng.randint(0, 30 * 86400)
        ts = []
        for _ in seq:
            t += rng.randint(3600, 3 * 86400)
            ts.append(t)
        sequences[uid], timestamps[uid] = seq, ts
        timeline = [{"start": 0, "colour": c1, "genre": g, "pattern": p}]
        if drift < seq_len:
            timeline.append({"start": drift, "colour": c2, "genre": g, "pattern": p})
        users[uid] = {
            "liked_colour_before": c1, "liked_colour_after": c2 if drift < seq_len else c1,
            "liked_genre": g, "liked_pattern": p, "drift_index": drift, "length": seq_len,
            "timeline": timeline,
            "split": "test" if uid in test_set else "valid" if uid in valid_set else "train",
        }
    return {"items": items, "users": users, "sequences": sequences, "timestamps": timestamps,
            "cold_items": cold, "test_users": sorted(test_set)}


def _write(out_dir: Path, cfg: SynthConfig, data: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{PREFIX}_pairs.tsv", "w", encoding="utf-8", newline="\n") as f:
        for uid, seq in data["sequences"].items():
            f.write(f"{uid}\t{' '.join(seq)}\n")
    with open(out_dir / f"{PREFIX}_titles.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["item", "title"])
        for iid, attrs in data["items"].items():
            w.writerow([iid, attrs["title"]])
    with open(out_dir / f"{PREFIX}_timestamps.tsv", "w", encoding="utf-8", newline="\n") as f:
        for uid, seq in data["sequences"].items():
            for iid, t in zip(seq, data["timestamps"][uid]):
                f.write(f"{uid}\t{iid}\t{t}\n")
    covers = out_dir / "covers"
    covers.mkdir(exist_ok=True)
    cat = cfg.vocabulary()
    for iid, a in data["items"].items():
        img = draw_cover(a["colour"], a["shape"], a["pattern"], size=cfg.image_size,
                         rng=random.Random(f"{cfg.seed}:{iid}"), catalog=cat)
        img.save(covers / f"{iid}.jpg", format="JPEG", quality=cfg.jpeg_quality)
    gt = {
        "version": GENERATOR_VERSION, "config": cfg.model_dump(), "config_hash": cfg.config_hash(),
        "genres": list(cat.genres), "items": data["items"], "users": data["users"],
        "cold_items": data["cold_items"], "test_users": data["test_users"],
        "timestamps_file": f"{PREFIX}_timestamps.tsv",
    }
    if cat is not DEFAULT_CATALOG:  # absent = default: the default benchmark's bytes predate catalogs
        gt["catalog"] = cat.name
    (out_dir / "ground_truth.json").write_text(json.dumps(gt, indent=1, sort_keys=True), encoding="utf-8")


def generate_benchmark(out_dir: Path, cfg: SynthConfig | None = None) -> Path:
    """Write the benchmark to ``out_dir`` (skipped when it already holds this config) and return it.

    Writing goes to a temporary sibling folder that is renamed into place, so a concurrent reader
    never sees a half-written benchmark.
    """
    cfg = cfg or SynthConfig()
    out_dir = Path(out_dir)
    if _is_complete(out_dir, cfg):
        return out_dir
    data = _generate(cfg)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        _write(tmp, cfg, data)
        if out_dir.exists():
            if _is_complete(out_dir, cfg):  # another process won the race
                return out_dir
            if any(out_dir.iterdir()) and not (out_dir / "ground_truth.json").exists():
                raise FileExistsError(f"{out_dir} exists and is not a synthetic benchmark; not overwriting")
            shutil.rmtree(out_dir)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not _is_complete(out_dir, cfg):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_ground_truth(root: Path) -> dict:
    """The benchmark's ``ground_truth.json``; ``catalog`` is always set (absent in the file = "default")."""
    gt = json.loads((Path(root) / "ground_truth.json").read_text(encoding="utf-8"))
    gt.setdefault("catalog", DEFAULT_CATALOG.name)
    return gt


def ground_truth_catalog(gt: Mapping) -> Catalog:
    """The vocabulary a benchmark's ground truth was generated with."""
    return get_catalog(gt.get("catalog", DEFAULT_CATALOG.name))
