"""Loaders: on-disk layouts → :class:`Dataset`, validated, with every skip counted and reported.

Every delimited file (CSV, TSV, RecBole atomic files) is parsed by the ``csv`` module as
RFC 4180: quoted fields may hold delimiters, doubled quotes and newlines; a UTF-8 BOM and CRLF
line ends are accepted. Fatal problems (a required file missing, a wrong header, a quoted field
never closed) raise :class:`DataError` naming the file, line and field. Bad rows are skipped,
counted in ``dataset.report`` and warned about with the file and line. Images are only ever read
from local folders (never downloaded), must resolve inside the dataset root (``../`` and symlink
escapes are rejected) and are verified cheaply with PIL; an item whose image is unusable keeps ``image_path=None``.
"""
from __future__ import annotations

import codecs
import csv
import importlib.util
import io
import itertools
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from mllm_msr.data.schema import DataError, Dataset, Interaction, Item, LoadReport

if TYPE_CHECKING:
    from mllm_msr.data.remote import RemoteImageConfig

log = logging.getLogger(__name__)

MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb guard
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
Image.MAX_IMAGE_PIXELS = min(Image.MAX_IMAGE_PIXELS or MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS)


# --------------------------------------------------------------------------- helpers

class DataWarning(UserWarning):
    """A row or file a loader skipped or repaired; the message names the file and line."""


def _warn(report: LoadReport, reason: str, message: str) -> None:
    """Count the skip; warn (up to the report's message cap, so huge files stay quiet)."""
    shown = len(report.warnings)
    report.drop(reason, message)
    if len(report.warnings) > shown:
        log.warning(message)
        warnings.warn(message, DataWarning, stacklevel=3)


def _require(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"required {what} file is missing", file=path)
    return path


def _read_text(path: Path, report: LoadReport) -> str:
    """The file decoded as UTF-8 (a leading BOM dropped); undecodable bytes become U+FFFD and
    every line holding them is reported."""
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        for n, b in enumerate(raw.split(b"\n"), start=1):
            try:
                b.decode("utf-8")
            except UnicodeDecodeError:
                _warn(report, "non_utf8_replaced",
                      f"{path}:{n}: text is not valid UTF-8; decoded with replacement characters")
        return raw.decode("utf-8", errors="replace")


def _read_lines(path: Path, report: LoadReport) -> list[str]:
    """The file's lines (for line-oriented formats such as JSONL), ``\r\n`` or ``\n`` ended; only
    those end a line (JSON strings may hold a raw U+2028, which ``str.splitlines`` would split)."""
    lines = _read_text(path, report).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def _rows(path: Path, report: LoadReport, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """``(first line, fields)`` of each non-blank record of a delimited file, parsed as RFC 4180
    (quoted fields may hold the delimiter, doubled quotes and newlines; CRLF or LF line ends).

    A record the ``csv`` module rejects is skipped and reported with its file:line. A quoted
    field still open at the end of the file would swallow every record after it, so it raises
    :class:`DataError` naming the line where that field started.
    """
    text = _read_text(path, report)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    end = 0
    while True:
        start = end + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            if "unexpected end of data" in str(e):
                raise DataError("a quoted field is never closed (unbalanced '\"'), so it would swallow the "
                                "rest of the file", file=path, line=start,
                                field_name=f"column {_open_column(text, start, delimiter)}") from e
            _warn(report, "malformed_row", f"{path}:{start}: malformed delimited row ({e}); skipped")
            end = reader.line_num
            continue
        end = reader.line_num
        if any(f.strip() for f in row):
            yield start, row


def _open_column(text: str, line: int, delimiter: str) -> int:
    """1-based column of the quoted field left open in the record starting at ``line``."""
    tail = itertools.islice(io.StringIO(text, newline=""), line - 1, None)
    return len(next(csv.reader(tail, delimiter=delimiter), [""]))


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):
        return False


def check_image(path: Path, root: Path, report: LoadReport, item_id: str) -> Path | None:
    """``path`` if it is a readable image inside ``root``; otherwise None, with the reason reported."""
    try:
        if ".." in Path(path).parts or not _inside(path, root):
            _warn(report, "image_path_escape", f"{path}: image of item {item_id!r} resolves outside {root}; ignored")
            return None
        if not path.is_file():
            report.dropped["missing_image"] += 1  # common in real datasets: counted, not warned each
            return None
        if path.stat().st_size == 0:
            _warn(report, "empty_image", f"{path}: image of item {item_id!r} is empty (0 bytes)")
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise Image.DecompressionBombError(f"{w}x{h} pixels")
                im.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        _warn(report, "image_too_large", f"{path}: image of item {item_id!r} is too large ({e})")
        return None
    except Exception as e:  # noqa: BLE001 - any decoder failure means unusable
        _warn(report, "corrupt_image", f"{path}: image of item {item_id!r} is unreadable ({type(e).__name__}: {e})")
        return None
    return path


def _find_image(folder: Path, item_id: str, index: dict[str, Path] | None = None) -> Path:
    """The candidate image file of ``item_id`` in ``folder`` (may not exist)."""
    if "/" in item_id or "\\" in item_id or item_id == "..":
        return folder / item_id  # a path, not a file name: check_image rejects any "../"
    if index is not None and item_id in index:
        return index[item_id]
    for ext in IMAGE_EXTENSIONS:
        p = folder / f"{item_id}{ext}"
        if p.exists() or p.is_symlink():
            return p
    return folder / f"{item_id}.jpg"


def _image_index(folder: Path) -> dict[str, Path]:
    """stem → file for every image-like file in ``folder`` (preferring the usual extensions)."""
    index: dict[str, Path] = {}
    if not folder.is_dir():
        return index
    rank = {e: n for n, e in enumerate(IMAGE_EXTENSIONS)}
    for name in sorted(os.listdir(folder)):
        p = folder / name
        stem, ext = os.path.splitext(name)
        prev = index.get(stem)
        if prev is None or rank.get(ext.lower(), 99) < rank.get(prev.suffix.lower(), 99):
            index[stem] = p
    return index


def _finish(name: str, items: dict[str, Item], raw: list[tuple[str, float, str, float | None, str]],
            report: LoadReport, root: Path | None, has_images: bool) -> Dataset:
    """Drop unknown items, dedupe (keep earliest) and empty users; build the Dataset.

    ``raw`` rows are (user, timestamp, item, rating, where) with ``where`` = "file:line".
    """
    inter: list[tuple[Interaction, str]] = []
    for user, ts, item, rating, where in raw:
        if item not in items:
            _warn(report, "unknown_item",
                  f"{where}: interaction of user {user!r} references unknown item {item!r}; skipped")
            continue
        inter.append((Interaction(user, ts, item, rating), where))
    inter.sort(key=lambda x: (x[0].user_id, x[0].timestamp))  # stable: same-second ties keep file order
    seen: set[tuple[str, str]] = set()
    kept: list[Interaction] = []
    for it, where in inter:
        key = (it.user_id, it.item_id)
        if key in seen:
            _warn(report, "duplicate_interaction",
                  f"{where}: duplicate interaction user {it.user_id!r} item {it.item_id!r}; kept the first")
            continue
        seen.add(key)
        kept.append(it)
    if report.total_dropped:
        log.info("%s: loader report %s", name, dict(report.dropped))
    return Dataset(name=name, items=items, interactions=kept, root=root, report=report,
                   has_images=has_images)


# --------------------------------------------------------------------------- MicroLens

def _pick_prefix(root: Path, prefix: str | None) -> str:
    if prefix is not None:
        return prefix
    found = sorted(p.name[: -len("_pairs.tsv")] for p in root.glob("*_pairs.tsv"))
    if not found:
        raise DataError("no *_pairs.tsv file found (MicroLens layout needs <prefix>_pairs.tsv)", file=root)
    if len(found) > 1:
        raise DataError(f"several *_pairs.tsv files {found}; pass prefix=", file=root)
    return found[0]


def load_microlens(root: Path, prefix: str | None = None) -> Dataset:
    """MicroLens layout: ``<prefix>_pairs.tsv``, ``<prefix>_titles.csv``, ``covers/{item}.jpg|png``.

    Optional: ``<prefix>_timestamps.tsv`` (``user\\titem\\ttimestamp`` rows); without it the
    position in the user's line is the timestamp. ``ground_truth.json`` (the synthetic
    benchmark) attaches colour/shape/pattern/genre to ``Item.attributes``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError("dataset folder does not exist", file=root)
    prefix = _pick_prefix(root, prefix)
    report = LoadReport()
    pairs_path = _require(root / f"{prefix}_pairs.tsv", "pairs")
    titles_path = _require(root / f"{prefix}_titles.csv", "titles")

    # titles
    rows = _rows(titles_path, report, ",")
    first = next(rows, None)
    if first is None:
        raise DataError("titles file is empty; expected header 'item,title'", file=titles_path, line=1)
    header = [h.strip().lower() for h in first[1]]
    title_col = next((k for k, h in enumerate(header) if "title" in h), None)
    if header[0] not in ("item", "item_id") or title_col is None:
        raise DataError("titles header must start 'item,title' (extra columns allowed), "
                        f"got {','.join(first[1])[:80]!r}",
                        file=titles_path, line=first[0], field_name="header")
    gt: dict[str, Any] = {}
    gt_path = root / "ground_truth.json"
    if gt_path.is_file():
        try:
            gt = json.loads(gt_path.read_text(encoding="utf-8")).get("items", {})
        except (OSError, ValueError) as e:
            _warn(report, "bad_ground_truth", f"{gt_path}: unreadable ground truth ({e}); attributes not attached")
    covers = root / "covers"
    index = _image_index(covers)
    items: dict[str, Item] = {}
    for n, row in rows:
        if len(header) == 2 and len(row) > 2:  # 'item,title' with an unquoted comma in the title
            row = [row[0], ",".join(row[1:])]
        if len(row) != len(header) or not row[0].strip():
            field = "item" if row and not row[0].strip() else "field count"
            _warn(report, "malformed_row",
                  f"{titles_path}:{n}: field {field!r}: expected {len(header)} fields ({','.join(header)}) "
                  f"with an item id, got {len(row)}: {','.join(row)[:80]!r}; skipped")
            continue
        iid, title = row[0].strip(), row[title_col].strip()
        if iid in items:
            _warn(report, "duplicate_item", f"{titles_path}:{n}: duplicate item id {iid!r}; kept the first")
            continue
        image = check_image(_find_image(covers, iid, index), covers, report, iid) if covers.is_dir() else None
        attrs = {k: str(v) for k, v in gt.get(iid, {}).items()
                 if k in ("colour", "shape", "pattern", "genre")} if isinstance(gt.get(iid), dict) else {}
        items[iid] = Item(iid, title, None, image, attrs)

    # optional timestamps
    stamps: dict[tuple[str, str], float] = {}
    ts_path = root / f"{prefix}_timestamps.tsv"
    if ts_path.is_file():
        for n, parts in _rows(ts_path, report, "\t"):
            try:
                if len(parts) != 3:
                    raise ValueError(f"expected 3 tab-separated fields (user, item, timestamp), got {len(parts)}")
                t = float(parts[2])
                if not math.isfinite(t):
                    raise ValueError("field 'timestamp' is not finite")
            except ValueError as e:
                _warn(report, "malformed_timestamp", f"{ts_path}:{n}: {e}: {chr(9).join(parts)[:80]!r}; skipped")
                continue
            stamps.setdefault((parts[0].strip(), parts[1].strip()), t)

    # pairs
    per_user: dict[str, list[tuple[str, str]]] = {}
    for n, parts in _rows(pairs_path, report, "\t"):
        user = parts[0].strip()
        if len(parts) < 2 or not user:
            _warn(report, "malformed_row", f"{pairs_path}:{n}: field 'user': expected 'user<TAB>item item …', "
                                           f"got {chr(9).join(parts)[:80]!r}; skipped")
            continue
        seq = [(i, f"{pairs_path}:{n}") for i in " ".join(parts[1:]).replace(",", " ").split()]
        if not seq:
            _warn(report, "empty_user", f"{pairs_path}:{n}: user {user!r} has no interactions; skipped")
            continue
        per_user.setdefault(user, []).extend(seq)
    raw: list[tuple[str, float, str, float | None, str]] = []
    for user, seq in per_user.items():
        known = [(i, w) for i, w in seq if i in items]
        if not known:
            for i, w in seq:
                _warn(report, "unknown_item",
                      f"{w}: interaction of user {user!r} references unknown item {i!r}; skipped")
            _warn(report, "empty_user", f"{seq[0][1]}: user {user!r} has no interactions with known items; skipped")
            continue
        use_stamps = bool(stamps) and all((user, i) in stamps for i, _ in known)
        if stamps and not use_stamps:
            _warn(report, "missing_timestamp",
                  f"{ts_path}: user {user!r} lacks timestamps for some items; using positions")
        for pos, (i, w) in enumerate(seq):
            raw.append((user, stamps[(user, i)] if use_stamps and (user, i) in stamps else float(pos), i, None, w))
    return _finish(prefix, items, raw, report, root, has_images=covers.is_dir())


# --------------------------------------------------------------------------- Amazon Reviews 2023

def _jsonl(path: Path, report: LoadReport):
    for n, line in enumerate(_read_lines(path, report), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            _warn(report, "malformed_row", f"{path}:{n}: malformed JSON ({e}); skipped")
            continue
        yield n, row


def _text_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list):
        return [str(v) for v in value if isinstance(v, (str, int, float)) and str(v).strip()]
    return []


def _first_image_url(row: dict) -> str | None:
    imgs = row.get("images")
    if isinstance(imgs, list):
        for im in imgs:
            if isinstance(im, dict):
                for k in ("large", "hi_res", "thumb"):
                    if isinstance(im.get(k), str) and im[k].strip():
                        return im[k].strip()
    return None


def load_amazon2023(reviews_jsonl: Path, meta_jsonl: Path, image_dir: Path | None = None,
                    remote_images: RemoteImageConfig | None = None) -> Dataset:
    """Amazon Reviews 2023: reviews (``user_id, parent_asin, rating, timestamp`` in ms) joined with
    meta (``parent_asin, title, description, features, images``) on ``parent_asin``.

    Images come from ``image_dir`` as ``{parent_asin}.<ext>``. The ``images[*].large`` URLs are
    fetched only when ``remote_images.enabled`` (http(s), size and time limits) into ``image_dir``.
    """
    from mllm_msr.data.remote import RemoteImageError, fetch_image
    reviews_jsonl, meta_jsonl = _require(reviews_jsonl, "reviews JSONL"), _require(meta_jsonl, "meta JSONL")
    report = LoadReport()
    img_root = Path(image_dir) if image_dir is not None else None
    if img_root is not None and not img_root.is_dir():
        raise DataError("image folder does not exist", file=img_root)
    index = _image_index(img_root) if img_root is not None else {}
    items: dict[str, Item] = {}
    for n, row in _jsonl(meta_jsonl, report):
        asin = row.get("parent_asin")
        if not isinstance(asin, str) or not asin.strip():
            _warn(report, "missing_field", f"{meta_jsonl}:{n}: field 'parent_asin' missing or not a string; skipped")
            continue
        asin = asin.strip()
        if asin in items:
            _warn(report, "duplicate_item", f"{meta_jsonl}:{n}: duplicate parent_asin {asin!r}; kept the first")
            continue
        title = row.get("title")
        title = title.strip() if isinstance(title, str) else ""
        text = "\n".join(_text_list(row.get("features")) + _text_list(row.get("description"))) or None
        attrs = {k: str(row[k]) for k in ("main_category", "store") if isinstance(row.get(k), str)}
        image = None
        if img_root is not None:
            local = _find_image(img_root, asin, index)
            url = _first_image_url(row)
            if not local.is_file() and url and remote_images is not None and remote_images.enabled:
                try:
                    local = fetch_image(url, img_root / f"{asin}.jpg", remote_images)
                except (RemoteImageError, DataError) as e:
                    _warn(report, "remote_image_failed", f"{meta_jsonl}:{n}: item {asin!r}: {e}")
            image = check_image(local, img_root, report, asin)
        items[asin] = Item(asin, title, text, image, attrs)
    raw = []
    for n, row in _jsonl(reviews_jsonl, report):
        where = f"{reviews_jsonl}:{n}"
        user, asin = row.get("user_id"), row.get("parent_asin")
        if not isinstance(user, str) or not user.strip() or not isinstance(asin, str) or not asin.strip():
            _warn(report, "missing_field", f"{where}: field 'user_id' or 'parent_asin' missing; skipped")
            continue
        try:
            ts = float(row.get("timestamp"))  # type: ignore[arg-type]
            if not math.isfinite(ts):
                raise ValueError
        except (TypeError, ValueError):
            _warn(report, "bad_timestamp", f"{where}: field 'timestamp' is not a number; skipped")
            continue
        rating = row.get("rating")
        rating = float(rating) if isinstance(rating, (int, float)) and not isinstance(rating, bool) else None
        raw.append((user.strip(), ts / 1000.0, asin.strip(), rating, where))
    return _finish(reviews_jsonl.stem, items, raw, report, img_root, has_images=img_root is not None)


# --------------------------------------------------------------------------- RecBole atomic files

def _atomic_header(path: Path, rows: Iterator[tuple[int, list[str]]], kind: str) -> list[str]:
    first = next(rows, None)
    if first is None:
        raise DataError(f"empty {kind} file; expected a header", file=path, line=1)
    names = [h.split(":", 1)[0].strip() for h in first[1]]
    if not all(names):
        raise DataError(f"bad RecBole header {chr(9).join(first[1])[:80]!r}", file=path, line=first[0],
                        field_name="header")
    return names


def load_recbole(inter_path: Path, item_path: Path | None = None, name: str | None = None) -> Dataset:
    """RecBole atomic files: ``.inter`` (``user_id:token, item_id:token[, rating, timestamp]``)
    and ``.item`` (``item_id:token`` plus e.g. ``movie_title:token_seq``; the first ``*title*``
    column is the title, the other columns go to ``text`` and ``attributes``). Text only.
    Tab-separated, quoted fields allowed (as RecBole's own pandas reader)."""
    inter_path = _require(inter_path, "RecBole .inter")
    report = LoadReport()
    items: dict[str, Item] = {}
    if item_path is not None:
        item_path = _require(item_path, "RecBole .item")
        rows = _rows(item_path, report, "\t")
        cols = _atomic_header(item_path, rows, ".item")
        if "item_id" not in cols:
            raise DataError("header has no item_id column", file=item_path, line=1, field_name="item_id")
        id_col = cols.index("item_id")
        title_col = next((k for k, c in enumerate(cols) if "title" in c.lower()), None)
        for n, parts in rows:
            if len(parts) != len(cols) or not parts[id_col].strip():
                _warn(report, "malformed_row", f"{item_path}:{n}: field 'item_id': expected {len(cols)} tab-separated "
                                               f"fields with an item id, got {len(parts)}; skipped")
                continue
            iid = parts[id_col].strip()
            if iid in items:
                _warn(report, "duplicate_item", f"{item_path}:{n}: duplicate item id {iid!r}; kept the first")
                continue
            title = parts[title_col].strip() if title_col is not None else iid
            extra = {c: parts[k].strip() for k, c in enumerate(cols)
                     if k not in (id_col, title_col) and parts[k].strip()}
            text = "; ".join(f"{c.replace('_', ' ')}: {v}" for c, v in extra.items()) or None
            items[iid] = Item(iid, title, text, None, extra)
    rows = _rows(inter_path, report, "\t")
    cols = _atomic_header(inter_path, rows, ".inter")
    for need in ("user_id", "item_id"):
        if need not in cols:
            raise DataError(f"header has no {need} column", file=inter_path, line=1, field_name=need)
    u_col, i_col = cols.index("user_id"), cols.index("item_id")
    t_col = cols.index("timestamp") if "timestamp" in cols else None
    r_col = cols.index("rating") if "rating" in cols else None
    raw = []
    position: dict[str, int] = {}
    for n, parts in rows:
        where = f"{inter_path}:{n}"
        if len(parts) != len(cols) or not parts[u_col].strip() or not parts[i_col].strip():
            _warn(report, "malformed_row",
                  f"{where}: expected {len(cols)} tab-separated fields with user_id and item_id, "
                  f"got {len(parts)}; skipped")
            continue
        user, iid = parts[u_col].strip(), parts[i_col].strip()
        field = "timestamp"
        try:
            if t_col is not None:
                ts = float(parts[t_col])
                if not math.isfinite(ts):
                    raise ValueError
            else:
                ts = float(position.get(user, 0))
            field = "rating"
            rating = float(parts[r_col]) if r_col is not None and parts[r_col].strip() else None
        except ValueError:
            _warn(report, "malformed_row", f"{where}: field {field!r} is not a number; skipped")
            continue
        position[user] = position.get(user, 0) + 1
        if item_path is None and iid not in items:
            items[iid] = Item(iid, iid)
        raw.append((user, ts, iid, rating, where))
    return _finish(name or inter_path.stem, items, raw, report, inter_path.parent, has_images=False)


def movielens100k_dir() -> Path:
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the recbole package (which ships ml-100k) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"


def load_movielens100k() -> Dataset:
    """MovieLens-100k as shipped in ``recbole/dataset_example/ml-100k`` (text only)."""
    d = movielens100k_dir()
    return load_recbole(d / "ml-100k.inter", d / "ml-100k.item", name="ml-100k")


# --------------------------------------------------------------------------- dispatcher

def load_dataset(name_or_path: str | Path, **kw: Any) -> Dataset:
    """``"synth"`` (generated into the cache, kwargs are SynthConfig fields or ``config=``),
    ``"ml-100k"``, or a folder whose layout is detected (MicroLens, RecBole, Amazon 2023)."""
    key = str(name_or_path)
    if key == "synth":
        from mllm_msr.data.synth import SynthConfig, default_benchmark_dir, generate_benchmark
        cfg = kw.pop("config", None) or SynthConfig(**kw)
        root = generate_benchmark(default_benchmark_dir(cfg), cfg)
        return load_microlens(root, prefix="synth")
    if key.lower() in ("ml-100k", "movielens-100k", "ml100k"):
        return load_movielens100k()
    path = Path(key).expanduser()
    if path.is_file() and path.suffix == ".inter":
        item = path.with_suffix(".item")
        return load_recbole(path, item if item.is_file() else None)
    if not path.is_dir():
        raise DataError(f"unknown dataset {key!r}: not 'synth', 'ml-100k' or an existing folder", file=path)
    if list(path.glob("*_pairs.tsv")):
        return load_microlens(path, **kw)
    inters = sorted(path.glob("*.inter"))
    if inters:
        item = inters[0].with_suffix(".item")
        return load_recbole(inters[0], item if item.is_file() else None)
    metas = sorted(path.glob("meta_*.jsonl"))
    reviews = sorted(p for p in path.glob("*.jsonl") if not p.name.startswith("meta_"))
    if metas and reviews:
        images = kw.get("image_dir") or (path / "images" if (path / "images").is_dir() else None)
        return load_amazon2023(reviews[0], metas[0], images)
    raise DataError("cannot detect the layout (no *_pairs.tsv, *.inter, or meta_*.jsonl + reviews *.jsonl)", file=path)
