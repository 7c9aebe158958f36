import csv
import hashlib
import json
import random
import re
import statistics
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mllm_msr.config import MSRConfig, load_config
from mllm_msr.data.covers import (
    ALT_CATALOG,
    DEFAULT_CATALOG,
    VISUAL_ATTRIBUTES,
    caption,
    draw_cover,
    get_catalog,
    parse_caption,
)
from mllm_msr.data.loaders import load_dataset, load_microlens
from mllm_msr.data.protocol import ProtocolConfig, build_splits
from mllm_msr.data.synth import (
    GENRES,
    SynthConfig,
    default_benchmark_dir,
    generate_benchmark,
    ground_truth_catalog,
    item_caption,
    load_ground_truth,
)
from mllm_msr.metrics import evaluate


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return generate_benchmark(tmp_path_factory.mktemp("synth") / "b", SynthConfig())


@pytest.fixture(scope="module")
def ds(bench):
    return load_microlens(bench, prefix="synth")


@pytest.fixture(scope="module")
def splits(ds):
    return build_splits(ds, ProtocolConfig())


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_sizes(bench, ds):
    gt = load_ground_truth(bench)
    assert (bench / "synth_pairs.tsv").is_file() and (bench / "synth_titles.csv").is_file()
    assert (bench / "synth_titles.csv").read_text().splitlines()[0] == "item,title"
    assert len(gt["items"]) == 240 and len(gt["users"]) == 3000
    assert ds.stats()["users"] == 3000 and len(ds.items) == 240
    assert ds.report.total_dropped == 0
    assert all(it.image_path is not None for it in ds.items.values())
    with Image.open(next(iter(ds.items.values())).image_path) as im:
        assert im.size == (128, 128) and im.format == "JPEG"
    for seq in ds.sequences().values():
        assert 8 <= len(seq) <= 13
        ts = [i.timestamp for i in seq]
        assert ts == sorted(ts) and ts[0] > 1e9  # real timestamps from synth_timestamps.tsv
    it = ds.items["i0001"]
    assert set(it.attributes) == {"colour", "shape", "pattern", "genre"}
    assert item_caption(it.attributes).startswith("A ")


def test_deterministic_and_seed_sensitive(tmp_path, bench):
    a = generate_benchmark(tmp_path / "a", SynthConfig())
    assert _files(a) == _files(bench)
    b = generate_benchmark(tmp_path / "b", SynthConfig(seed=1))
    fa, fb = _files(a), _files(b)
    assert fa["synth_pairs.tsv"] != fb["synth_pairs.tsv"]
    assert fa["synth_titles.csv"] != fb["synth_titles.csv"]


def test_idempotent_and_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MSR_HOME", str(tmp_path / "home"))
    cfg = SynthConfig(n_users=20, n_items=40)
    d = default_benchmark_dir(cfg)
    assert d.parent == tmp_path / "home" / "data" and d.name.startswith("synth-")
    assert default_benchmark_dir(SynthConfig(n_users=21, n_items=40)) != d
    generate_benchmark(d, cfg)
    mtime = (d / "synth_pairs.tsv").stat().st_mtime_ns
    generate_benchmark(d, cfg)
    assert (d / "synth_pairs.tsv").stat().st_mtime_ns == mtime
    loaded = load_dataset("synth", n_users=20, n_items=40)
    assert loaded.root == d and len(loaded.items) == 40


def test_titles_hide_visual_attributes_but_state_genre(ds):
    words = [w for vals in VISUAL_ATTRIBUTES.values() for w in vals]
    for it in ds.items.values():
        low = it.title.lower()
        for w in words:
            assert not re.search(rf"\b{re.escape(w)}\b", low), (it.title, w)
        assert it.attributes["genre"] in low
    assert len({it.title for it in ds.items.values()}) == len(ds.items)  # varied titles


def test_preferences_are_additive_and_drift(bench, ds):
    gt = load_ground_truth(bench)
    seqs = ds.sequences()
    colour_pre = colour_post = genre = n_pre = n_post = 0
    for u, info in gt["users"].items():
        assert info["liked_colour_after"] != info["liked_colour_before"]
        d = info["drift_index"]
        assert 0 < d < info["length"]
        for pos, inter in enumerate(seqs[u]):
            a = ds.items[inter.item_id].attributes
            genre += a["genre"] == info["liked_genre"]
            if pos < d:
                n_pre += 1
                colour_pre += a["colour"] == info["liked_colour_before"]
            else:
                n_post += 1
                colour_post += a["colour"] == info["liked_colour_after"]
    total = n_pre + n_post
    # chance is 1/8; both single attributes carry signal on their own
    assert colour_pre / n_pre > 0.3 and colour_post / n_post > 0.3 and genre / total > 0.3


def test_cold_items_only_in_test_targets(bench, ds, splits):
    gt = load_ground_truth(bench)
    cold = set(gt["cold_items"])
    assert len(cold) == 24
    assert set(splits.test_users) == set(gt["test_users"])
    for u, seq in ds.sequences().items():
        hist = {i.item_id for i in seq[:-1]}
        assert not hist & cold
        if u not in splits.test_users:
            assert seq[-1].item_id not in cold
    cold_targets = [c for c in splits.test if c.target in splits.cold_items]
    assert cold_targets, "some test targets are cold"
    in_test = {x for c in splits.test for x in c.candidates}
    assert cold & in_test and cold & in_test <= splits.cold_items


def _attr_scorer(items):
    def score(case, cand):
        a = items[cand].attributes
        s = 0.0
        for k, h in enumerate(case.history):
            ha = items[h].attributes
            recent = k >= len(case.history) - 3
            s += (ha["colour"] == a["colour"]) * (1.0 if recent else 0.0) + 0.3 * (ha["genre"] == a["genre"])
        return s
    return score


def test_learnable_from_attributes_and_hard_for_popularity():
    # a larger instance for stable estimates (still fast: covers are tiny)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        cfg = SynthConfig(n_users=400)
        ds = load_microlens(generate_benchmark(Path(d) / "b", cfg), prefix="synth")
        sp = build_splits(ds, ProtocolConfig(seed=cfg.split_seed))
    f = _attr_scorer(ds.items)
    attr = [[f(c, x) for x in c.candidates] for c in sp.test]
    pop_c = Counter(i for ex in sp.train if ex.label == 1 for i in ex.history + (ex.item_id,))
    pop = [[pop_c[x] for x in c.candidates] for c in sp.test]
    cold = [k for k, c in enumerate(sp.test) if c.target in sp.cold_items]
    assert len(cold) >= 10
    r_attr, r_pop = evaluate(sp.test, attr), evaluate(sp.test, pop)
    assert r_attr["auc"] > 0.6
    sub = lambda xs: [xs[k] for k in cold]  # noqa: E731
    c_attr = evaluate(sub(sp.test), sub(attr))
    c_pop = evaluate(sub(sp.test), sub(pop))
    assert c_attr["auc"] > 0.6
    assert c_pop["auc"] < c_attr["auc"] - 0.2
    assert r_pop["auc"] < r_attr["auc"]


def test_recency_helps_after_drift(ds, splits):
    """Scoring by the latest colour beats scoring by the earliest colour (drift is real)."""
    items = ds.items
    cases = splits.valid + splits.test
    recent = [[sum(items[h].attributes["colour"] == items[x].attributes["colour"] for h in c.history[-3:])
               for x in c.candidates] for c in cases]
    early = [[sum(items[h].attributes["colour"] == items[x].attributes["colour"] for h in c.history[:3])
              for x in c.candidates] for c in cases]
    assert evaluate(cases, recent)["auc"] > evaluate(cases, early)["auc"]


def test_config_validation():
    with pytest.raises(ValueError):
        generate_benchmark(Path("/nonexistent/never"), SynthConfig(min_history=9, max_history=3))
    assert len(GENRES) == 8
    assert json.loads(SynthConfig().model_dump_json())["n_users"] == 3000


def test_default_split_has_at_least_300_test_users(ds):
    """The evidence issue's power target: 1 positive + 20 negatives for >= 300 test users."""
    from mllm_msr.data.protocol import ProtocolConfig, build_splits

    sp = build_splits(ds, ProtocolConfig())
    assert len(sp.test) >= 300 and all(len(c.candidates) == 21 for c in sp.test)
    assert all(len(c.candidates) == 21 for c in sp.valid)  # validation uses the test protocol


# ------------------------------------------------------------------ catalogs (issue #18)
# Computed with the code before catalogs existed: the default benchmark keeps its cache folder,
# its files and its cover pixels.
DEFAULT_CONFIG_HASH = "9a8a3e8c53d8"
SMALL = SynthConfig(n_users=40, n_items=60, seed=1, image_size=32)
SMALL_CONFIG_HASH = "4a8c85aab5cf"
SMALL_TEXT_DIGEST = "24dcafa36ab323fca9abbfcb5d7ad4fa48501937aa5bb64aff25193a8b4b51df"
DEFAULT_PIXELS_DIGEST = "4639fba0d148ee0febbcf05df91f619a2b054ee8cc41bcd1bd7d5239e33daff7"
ALT_PRESET = Path(__file__).resolve().parent.parent / "configs" / "synth-alt.yaml"


def _text_digest(root: Path) -> str:
    h = hashlib.sha256()
    for name in ("synth_pairs.tsv", "synth_titles.csv", "synth_timestamps.tsv", "ground_truth.json"):
        h.update((root / name).read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def alt_cfg():
    """The shipped alt-catalog config, with fewer users (the catalog does not depend on them)."""
    cfg = load_config(ALT_PRESET).synth
    return cfg.model_copy(update={"n_users": 400})


@pytest.fixture(scope="module")
def alt_bench(tmp_path_factory, alt_cfg):
    return generate_benchmark(tmp_path_factory.mktemp("synth-alt") / "b", alt_cfg)


def test_default_catalog_keeps_hash_files_and_pixels(tmp_path):
    assert SynthConfig().config_hash() == SynthConfig(catalog="default").config_hash() == DEFAULT_CONFIG_HASH
    assert "catalog" not in SynthConfig().model_dump() and "catalog" not in MSRConfig().model_dump()["synth"]
    assert SynthConfig(catalog="alt").config_hash() != DEFAULT_CONFIG_HASH
    assert SynthConfig(catalog="alt").model_dump()["catalog"] == "alt"
    assert SMALL.config_hash() == SMALL_CONFIG_HASH
    root = generate_benchmark(tmp_path / "small", SMALL)
    assert _text_digest(root) == SMALL_TEXT_DIGEST
    assert "catalog" not in json.loads((root / "ground_truth.json").read_text())  # the old bytes
    assert load_ground_truth(root)["catalog"] == "default"
    h = hashlib.sha256()
    for c, s, p in DEFAULT_CATALOG.combinations():
        for size in (32, 128):
            h.update(draw_cover(c, s, p, size=size, rng=random.Random(f"{c}{s}{p}")).tobytes())
    assert h.hexdigest() == DEFAULT_PIXELS_DIGEST


def test_alt_preset_sets_the_catalog_without_cold_items(alt_cfg, alt_bench):
    full = load_config(ALT_PRESET).synth
    assert full.catalog == "alt" and full.cold_item_fraction == 0 and full.cold_target_prob == 0
    assert full.model_copy(update={"catalog": "default", "cold_item_fraction": 0.1,
                                   "cold_target_prob": 0.5}) == SynthConfig()  # nothing else changes
    gt = load_ground_truth(alt_bench)
    assert gt["cold_items"] == [] and not any(it["cold"] for it in gt["items"].values())
    sp = build_splits(load_microlens(alt_bench, prefix="synth"), ProtocolConfig(seed=alt_cfg.split_seed))
    assert not sp.cold_items and len(sp.test) == 40


def test_alt_catalog_is_deterministic_and_its_own_benchmark(tmp_path, alt_cfg, alt_bench):
    again = generate_benchmark(tmp_path / "again", alt_cfg)
    assert _files(again) == _files(alt_bench)
    default = _files(generate_benchmark(tmp_path / "default", alt_cfg.model_copy(update={"catalog": "default"})))
    alt = _files(alt_bench)
    assert alt["synth_titles.csv"] != default["synth_titles.csv"]
    assert alt["covers/i0001.jpg"] != default["covers/i0001.jpg"]
    assert alt_cfg.config_hash() != alt_cfg.model_copy(update={"catalog": "default"}).config_hash()


def test_ground_truth_names_the_catalog_and_its_values(alt_bench):
    gt = load_ground_truth(alt_bench)
    raw = json.loads((alt_bench / "ground_truth.json").read_text())
    assert raw["catalog"] == "alt" and raw["config"]["catalog"] == "alt"
    assert ground_truth_catalog(gt) is ALT_CATALOG and gt["genres"] == list(ALT_CATALOG.genres)
    vocab = {**ALT_CATALOG.attributes, "genre": ALT_CATALOG.genres}
    for it in gt["items"].values():
        assert all(it[a] in vocab[a] for a in vocab)
    for a, values in vocab.items():  # every value is used
        assert {it[a] for it in gt["items"].values()} == set(values)
    ds = load_microlens(alt_bench, prefix="synth")
    assert ds.items["i0001"].attributes["colour"] in ALT_CATALOG.colours


def test_catalog_vocabularies_are_disjoint():
    d, a = DEFAULT_CATALOG, ALT_CATALOG
    for attr in d.attributes:
        assert len(d.attributes[attr]) == len(a.attributes[attr])  # same difficulty, other words
        assert not set(d.attributes[attr]) & set(a.attributes[attr])
    assert len(d.genres) == len(a.genres) and not set(d.genres) & set(a.genres)
    everything = lambda c: {*c.visual_words, *c.genres}  # noqa: E731
    assert not everything(d) & everything(a)
    assert not set(d.colours.values()) & set(a.colours.values())
    assert not set(d.adjectives + d.nouns) & set(a.adjectives + a.nouns)
    assert d.style != a.style and d.caption_template != a.caption_template
    assert get_catalog("alt") is a and get_catalog("default") is d
    with pytest.raises(ValueError):
        get_catalog("nope")
    with pytest.raises(ValueError):  # another catalog's value is not drawn
        draw_cover("red", "circle", "solid", catalog=a)


def test_alt_titles_hide_every_visual_word_but_state_the_genre(alt_bench):
    words = {*DEFAULT_CATALOG.visual_words, *ALT_CATALOG.visual_words, *DEFAULT_CATALOG.genres}
    titles = dict(csv.reader((alt_bench / "synth_titles.csv").read_text().splitlines()[1:]))
    gt = load_ground_truth(alt_bench)
    for iid, title in titles.items():
        low = title.lower()
        for w in words:
            assert not re.search(rf"\b{re.escape(w)}\b", low), (title, w)
        assert re.search(rf"\b{re.escape(gt['items'][iid]['genre'])}\b", low)
        others = [g for g in ALT_CATALOG.genres if g != gt["items"][iid]["genre"]]
        assert not any(re.search(rf"\b{g}\b", low) for g in others), title
    assert len(set(titles.values())) == len(titles)


def _luminance(im: Image.Image) -> float:
    return float(np.asarray(im.convert("L"), dtype=float).mean())


def test_alt_covers_have_another_style(alt_bench, bench):
    """Dark framed posters with a smaller shape vs a large shape on a light background."""
    def look(root: Path) -> tuple[float, float]:
        lum, shape = [], []
        for p in sorted((root / "covers").glob("*.jpg"))[:40]:
            with Image.open(p) as im:
                rgb = im.convert("RGB")
            lum.append(_luminance(rgb))
            px = np.asarray(rgb, dtype=int)
            corner = px[20, 20]  # the background, inside the poster frame
            shape.append(float((np.abs(px - corner).max(axis=2) > 60).mean()))
        return statistics.fmean(lum), statistics.fmean(shape)

    d_lum, d_shape = look(bench)
    a_lum, a_shape = look(alt_bench)
    assert d_lum > 150 and a_lum < 100
    assert a_shape < 0.6 * d_shape  # the poster's shape covers a smaller share of the cover
    cover = draw_cover("teal", "heart", "wavy", catalog=ALT_CATALOG)
    m = round(128 * 0.06)
    assert _luminance(cover.crop((m + 4, m, 128 - m - 4, m + 1))) > 180  # the light frame line


@pytest.mark.parametrize("catalog", [DEFAULT_CATALOG, ALT_CATALOG], ids=lambda c: c.name)
def test_captions_round_trip(catalog):
    other = ALT_CATALOG if catalog is DEFAULT_CATALOG else DEFAULT_CATALOG
    combos = catalog.combinations()
    assert len(combos) == len(set(combos)) == 120
    for c, s, p in combos:
        text = caption(c, s, p, catalog)
        assert parse_caption(text, catalog) == {"colour": c, "shape": s, "pattern": p}
        assert parse_caption(text, other) == {"colour": None, "shape": None, "pattern": None}
        assert item_caption({"colour": c, "shape": s, "pattern": p}, catalog) == text
    assert caption("red", "star", "dotted") == "A dotted red star on a light background."
    assert caption("teal", "heart", "wavy", ALT_CATALOG) == "A wavy teal heart on a dark poster."
