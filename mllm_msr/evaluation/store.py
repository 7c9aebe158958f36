"""The committed per-user records of `msr eval`: ``<results>/rows/<row>/<seed>.json.gz``.

Each file is one row's per-seed record exactly as :func:`mllm_msr.evaluation.run.run_eval` caches
it (``cases`` with per-user scores, ``metrics``, ``valid_metrics``, ``info``, ``cache_key``,
``config``, ``adapter_sha256``, ``split``, the ``command`` that produced it, ...). They are what
makes the committed results folder accumulate: a row whose cache key matches is reused instead of
recomputed (also on a fresh clone), and ``results.json`` is rebuilt from every committed row that
is comparable with the evaluation at hand (same dataset, protocol seed, validation users, and the
same test users and candidates), so a row added later is paired user by user with rows computed
earlier. Files are deterministic (gzip without a timestamp, sorted keys, scores rounded to
:data:`SCORE_DECIMALS` decimals): writing the same record again gives the same bytes.
"""
from __future__ import annotations

import gzip
import io
import json
import logging
from pathlib import Path
from typing import Any

from mllm_msr.evaluation.rows import REFERENCE_ROW, ROWS

log = logging.getLogger(__name__)

SCORE_DECIMALS = 6


def row_path(results_dir: Path, row: str, seed: int) -> Path:
    return results_dir / "rows" / row / f"{seed}.json.gz"


def round_scores(rec: dict[str, Any]) -> dict[str, Any]:
    """Round the per-user scores in place (files stay small; a reused record equals the written one)."""
    for c in rec.get("cases") or []:
        c["scores"] = [round(float(x), SCORE_DECIMALS) for x in c["scores"]]
    return rec


def encode(rec: dict[str, Any]) -> bytes:
    """The file's bytes: sorted-key JSON, gzip with no name and mtime 0 (deterministic)."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
        gz.write(json.dumps(rec, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    return buf.getvalue()


def save(results_dir: Path, rec: dict[str, Any]) -> Path:
    """Write ``rec`` (it names its ``row`` and ``seed``); an unchanged file is left untouched."""
    path = row_path(results_dir, rec["row"], rec["seed"])
    data = encode(round_scores(rec))
    if path.is_file() and path.read_bytes() == data:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def load(path: Path) -> dict[str, Any] | None:
    """The record in ``path``; None when missing or unreadable (a warning for the latter)."""
    if not path.is_file():
        return None
    try:
        rec = json.loads(gzip.decompress(path.read_bytes()).decode("utf-8"))
    except (OSError, ValueError) as e:
        log.warning("committed eval record %s unreadable (%s): ignored", path, e)
        return None
    return rec if isinstance(rec, dict) else None


def _users(rec: dict[str, Any]) -> list[tuple[str, tuple[str, ...]]]:
    return [(c["user_id"], tuple(c["candidates"])) for c in rec.get("cases") or []]


def committed_rows(results_dir: Path, seed: int, *, dataset: dict[str, Any], valid_users: int,
                   anchor: dict[str, Any] | None = None, skip: frozenset[str] = frozenset()) -> dict[str, dict]:
    """Every committed record of protocol seed ``seed`` comparable with the evaluation at hand:
    row → record, in the order of ``ROWS``. A record is left out (with a warning) when its dataset
    fingerprint or number of validation users differs, or when its test users and candidates are not
    those of ``anchor`` (a record of the evaluation at hand; None: the committed reference row, else
    the first committed row). Rows in ``skip`` are not read."""
    found: dict[str, dict] = {}
    for path in sorted((results_dir / "rows").glob(f"*/{seed}.json.gz")):
        key = path.parent.name
        if key in skip:
            continue
        if key not in ROWS:
            log.warning("committed eval record %s: no row %r any more: left out", path, key)
            continue
        rec = load(path)
        if rec is None:
            continue
        if rec.get("dataset") != dataset or rec.get("seed") != seed or rec.get("valid_users") != valid_users:
            log.warning("committed row %s (%s) left out: another dataset, seed or number of validation users "
                        "(%s, seed %s, %s valid users; here %s, seed %s, %s)", key, path, rec.get("dataset"),
                        rec.get("seed"), rec.get("valid_users"), dataset, seed, valid_users)
            continue
        found[key] = rec
    if anchor is None:
        anchor = found.get(REFERENCE_ROW) or next((found[k] for k in ROWS if k in found), None)
    if anchor is None:
        return {}
    users = _users(anchor)
    out: dict[str, dict] = {}
    for key in (k for k in ROWS if k in found):
        if _users(found[key]) != users:
            log.warning("committed row %s left out: its test users or candidates differ from this evaluation's "
                        "(%d users); rerun it with --results to replace it", key, len(found[key].get("cases") or []))
            continue
        out[key] = found[key]
    return out
