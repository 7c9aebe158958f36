"""One schema for every dataset: items, interactions, and a report of what loading dropped.

Loaders turn on-disk layouts into a :class:`Dataset`; everything downstream (protocol, graph,
baselines) reads only this, so a new layout needs only a new loader.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    """Input that cannot be used; the message names the file, line and field."""

    def __init__(self, message: str, *, file: str | Path | None = None, line: int | None = None,
                 field_name: str | None = None):
        where = ", ".join(p for p in (
            f"file {file}" if file is not None else "",
            f"line {line}" if line is not None else "",
            f"field {field_name!r}" if field_name else "",
        ) if p)
        super().__init__(f"{message} ({where})" if where else message)
        self.file, self.line, self.field_name = file, line, field_name


@dataclass(frozen=True)
class Item:
    """A catalogue item. ``attributes`` is ground truth for analysis, never shown to models by default."""

    item_id: str
    title: str
    text: str | None = None
    image_path: Path | None = None
    attributes: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.item_id, str) or not self.item_id.strip():
            raise DataError("item id must be a non-empty string", field_name="item_id")
        if not isinstance(self.title, str):
            raise DataError(f"item {self.item_id}: title must be a string", field_name="title")


@dataclass(frozen=True, order=True)
class Interaction:
    """One user-item event. Ordering is (user, timestamp, item) so sorting gives chronology."""

    user_id: str
    timestamp: float
    item_id: str
    rating: float | None = field(default=None, compare=False)


@dataclass
class LoadReport:
    """What a loader skipped and why: never a silent drop."""

    dropped: Counter = field(default_factory=Counter)
    warnings: list[str] = field(default_factory=list)

    def drop(self, reason: str, message: str, *, max_messages: int = 50) -> None:
        self.dropped[reason] += 1
        if len(self.warnings) < max_messages:
            self.warnings.append(message)

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())


@dataclass
class Dataset:
    """Items plus interactions, validated: every interaction's item exists."""

    name: str
    items: dict[str, Item]
    interactions: list[Interaction]
    root: Path | None = None
    report: LoadReport = field(default_factory=LoadReport)
    has_images: bool = True

    def __post_init__(self) -> None:
        unknown = [i for i in self.interactions if i.item_id not in self.items]
        if unknown:
            first = unknown[0]
            raise DataError(f"{len(unknown)} interactions reference unknown items, e.g. user "
                            f"{first.user_id} item {first.item_id}; loaders must drop and report them",
                            field_name="item_id")

    def sequences(self) -> dict[str, list[Interaction]]:
        """Each user's interactions in time order (equal timestamps keep the input/file order)."""
        seqs: dict[str, list[Interaction]] = defaultdict(list)
        for inter in sorted(self.interactions, key=lambda i: (i.user_id, i.timestamp)):
            seqs[inter.user_id].append(inter)
        return dict(seqs)

    @property
    def users(self) -> list[str]:
        return sorted({i.user_id for i in self.interactions})

    def fingerprint(self) -> dict[str, int | str]:
        """Identity of the data (name, sizes, digest of every interaction): eval cache keys and the
        adapters' leak guard compare it, so a regenerated or edited dataset is never mistaken for
        the one an adapter was trained on."""
        from mllm_msr.hashing import json_digest

        rows = sorted((i.user_id, i.timestamp, i.item_id) for i in self.interactions)
        digest = json_digest(rows, 20)
        return {"name": self.name, "items": len(self.items), "interactions": len(self.interactions),
                "digest": digest}

    def stats(self) -> dict[str, float | int | str]:
        seqs = self.sequences()
        lengths = [len(s) for s in seqs.values()] or [0]
        n_users, n_items = len(seqs), len(self.items)
        return {
            "name": self.name,
            "users": n_users,
            "items": n_items,
            "interactions": len(self.interactions),
            "items_with_images": sum(1 for it in self.items.values() if it.image_path is not None),
            "mean_history": round(sum(lengths) / max(1, len(lengths)), 2),
            "max_history": max(lengths),
            "density": round(len(self.interactions) / max(1, n_users * n_items), 5),
            "dropped_on_load": self.report.total_dropped,
        }
