"""ID-based sequential baselines on the same :class:`Splits` as the MLLM rows.

* :class:`Popularity`: number of training interactions of the candidate.
* :class:`GRU4Rec`: a GRU over item-id embeddings, next-item loss at every position.
* :class:`SASRec`: causal self-attention (pre-norm blocks, learned positions).
* :class:`SASRecImage`: SASRec whose item embedding is the id embedding plus a linear projection
  of a cheap cover feature (8x8 RGB thumbnail + 4x4x4 colour histogram, standardised), the idea of
  the paper's multimodal "F" baselines.

Training data are the training users' whole sequences (:attr:`Splits.train_sequences`; for
``leave_one_out`` everything before the validation target). As in RecBole, every prefix is one
next-item example: the target is the prefix's last item, the input the up to ``max_len`` items
before it, the loss (softmax over all training items, or BPR) is taken at the last position.
After every epoch the model scores the validation cases with the test protocol's metrics; the
epoch with the best ``valid_metric`` is restored, and training stops after ``patience`` epochs
without improvement (``epochs`` is the cap). :func:`tune` runs a small recorded grid
(:class:`BaselineGrid`) on validation and returns the chosen config with every point's metrics.
Items never seen in training ("cold") have no id of their own: they map to the padding id,
whose embedding is fixed at zero, so ID-only models score every cold candidate the same (0),
while :class:`SASRecImage` still sees its cover feature. Everything is seeded.

API: ``model = SASRec(cfg).fit(splits, dataset)``; ``model.score(case)`` returns one float per
``case.candidates``; ``model.score_many(cases)`` does the same for many cases in batches.
"""
from __future__ import annotations

import copy
import itertools
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, PrivateAttr

from mllm_msr.data.protocol import EvalCase, Splits
from mllm_msr.data.schema import Dataset
from mllm_msr.metrics import evaluate


class BaselineConfig(BaseModel):
    """Settings shared by the trained baselines (defaults train in seconds on the benchmark)."""

    epochs: int = Field(50, ge=0, description="Most passes over the training prefixes (the cap when early stopping).")
    patience: int = Field(5, ge=0, description=(
        "Stop after this many epochs without a better validation metric and restore the best epoch "
        "(0 = no early stopping: train all epochs, keep the last)."))
    valid_metric: Literal["ndcg@5", "hr@5", "mrr@5", "auc"] = Field("ndcg@5", description=(
        "Validation metric (test protocol's) that early stopping and the grid maximise."))
    dim: int = Field(32, ge=2, description="Embedding / hidden size.")
    lr: float = Field(3e-3, gt=0, description="Adam learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay.")
    max_len: int = Field(20, ge=1, description="Most recent items of a sequence fed to the model.")
    seed: int = Field(0, description="Seed of initialisation, shuffling, dropout and negatives.")
    batch_size: int = Field(256, ge=1, description="Prefixes (next-item examples) per optimisation step.")
    dropout: float = Field(0.5, ge=0, lt=1, description="Dropout on embeddings and blocks.")
    loss: Literal["ce", "bpr"] = Field("ce", description=(
        "'ce': softmax over all training items; 'bpr': one sampled negative per position."))
    n_blocks: int = Field(2, ge=1, description="Self-attention blocks (SASRec).")
    n_heads: int = Field(2, ge=1, description="Attention heads (SASRec); must divide dim.")
    ff_mult: int = Field(1, ge=1, description="Feed-forward width of a SASRec block as a multiple of dim.")
    thumb_size: int = Field(8, ge=0, description=(
        "Side of the RGB thumbnail in the image feature (SASRecImage; 0 = none)."))
    hist_bins: int = Field(4, ge=0, description="Bins per channel of the joint colour histogram (SASRecImage).")
    use_eval_histories: bool = Field(False, description=(
        "Also train on validation/test users' histories (never their targets)."))


# --------------------------------------------------------------------------- shared helpers

def training_sequences(splits: Splits, include_eval_histories: bool = False) -> dict[str, list[str]]:
    """Each training user's whole training sequence in time order (:attr:`Splits.train_sequences`;
    splits built without it fall back to the latest history + positive target of the user's
    training examples). ``include_eval_histories`` adds validation/test users' histories (never
    their targets) under ``"<user>#eval"``."""
    out: dict[str, list[str]] = {u: list(s) for u, s in splits.train_sequences.items()}
    if not out:
        latest: dict[str, tuple[list[str], float]] = {}
        for ex in splits.train:
            if ex.label != 1:
                continue
            seq = [*ex.history, ex.item_id]
            last_t = ex.history_timestamps[-1] if ex.history_timestamps else -math.inf
            prev = latest.get(ex.user_id)
            if prev is None or (last_t, len(seq)) >= (prev[1], len(prev[0])):
                latest[ex.user_id] = (seq, last_t)
        out = {u: s for u, (s, _) in latest.items()}
    if include_eval_histories:
        for case in (*splits.valid, *splits.test):
            if len(case.history) >= 2 and case.user_id not in out:
                out[f"{case.user_id}#eval"] = list(case.history)
    return dict(sorted(out.items()))


def prefix_examples(seqs: Sequence[Sequence[str]], max_len: int) -> tuple[list[list[str]], list[str]]:
    """Every prefix of every sequence as (input = up to ``max_len`` items before, target)."""
    inputs: list[list[str]] = []
    targets: list[str] = []
    for s in seqs:
        for t in range(1, len(s)):
            inputs.append(list(s[max(0, t - max_len):t]))
            targets.append(s[t])
    return inputs, targets


@lru_cache(maxsize=100_000)
def _image_feature_cached(path: str, mtime: float, thumb: int, bins: int) -> tuple[float, ...]:
    from PIL import Image

    with Image.open(path) as im:
        rgb = im.convert("RGB")
        small = (np.asarray(rgb.resize((thumb, thumb), Image.Resampling.BOX), dtype=np.float32) / 255.0
                 if thumb else np.zeros(0, dtype=np.float32))
        arr = np.asarray(rgb.resize((64, 64), Image.Resampling.BILINEAR), dtype=np.int64)
    hist = np.zeros(0, dtype=np.float32)
    if bins:
        q = np.minimum(arr * bins // 256, bins - 1)
        codes = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
        hist = np.bincount(codes.ravel(), minlength=bins ** 3).astype(np.float32)
        hist /= max(1.0, hist.sum())
    return tuple(np.concatenate([small.ravel(), np.sqrt(hist)]).tolist())


def image_feature(path: str | Path | None, thumb: int = 8, bins: int = 4) -> np.ndarray | None:
    """Cheap cover feature: ``thumb``x``thumb`` RGB thumbnail (box-downsampled) + sqrt of the joint
    ``bins``³ colour histogram; None when the item has no readable image."""
    if path is None:
        return None
    p = Path(path)
    try:
        return np.asarray(_image_feature_cached(str(p), p.stat().st_mtime, thumb, bins), dtype=np.float32)
    except (OSError, ValueError):
        return None


def _set_seed(seed: int):
    import torch

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- popularity

class Popularity:
    """Score = number of training interactions of the item (0 for cold items)."""

    name = "popularity"

    def __init__(self, cfg: BaselineConfig | None = None):
        self.cfg = cfg or BaselineConfig()
        self.counts: Counter = Counter()
        self.losses: list[float] = []

    def fit(self, splits: Splits, dataset: Dataset | None = None, cfg: BaselineConfig | None = None) -> Popularity:
        self.cfg = cfg or self.cfg
        self.counts = Counter(i for s in training_sequences(splits, self.cfg.use_eval_histories).values() for i in s)
        return self

    def score(self, case: EvalCase) -> list[float]:
        return [float(self.counts.get(c, 0)) for c in case.candidates]

    def score_many(self, cases: Sequence[EvalCase]) -> list[list[float]]:
        return [self.score(c) for c in cases]


# --------------------------------------------------------------------------- torch models

def _build_modules(kind: str, n_vocab: int, n_feat: int, cfg: BaselineConfig):
    """The torch module of a sequential model (built lazily so importing needs no torch)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class ItemEmbedding(nn.Module):
        """id embedding (padding / unknown id 0 is fixed at zero) + optional feature projection."""

        def __init__(self):
            super().__init__()
            self.ids = nn.Embedding(n_vocab + 1, cfg.dim, padding_idx=0)
            nn.init.normal_(self.ids.weight, std=0.1)
            with torch.no_grad():
                self.ids.weight[0].zero_()
            self.proj = nn.Linear(n_feat, cfg.dim, bias=False) if n_feat else None
            if self.proj is not None:
                nn.init.normal_(self.proj.weight, std=0.1 / math.sqrt(n_feat))

        def forward(self, vid, feats=None):
            e = self.ids(vid)
            if self.proj is not None and feats is not None:
                e = e + self.proj(feats)
            return e

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
            self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
            self.out = nn.Linear(cfg.dim, cfg.dim)
            self.ff = nn.Sequential(nn.Linear(cfg.dim, cfg.ff_mult * cfg.dim), nn.GELU(),
                                    nn.Dropout(cfg.dropout), nn.Linear(cfg.ff_mult * cfg.dim, cfg.dim))
            self.drop = nn.Dropout(cfg.dropout)

        def forward(self, x, mask):
            B, L, D = x.shape
            h = cfg.n_heads
            q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, h, D // h).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=cfg.dropout if self.training else 0.0)
            x = x + self.drop(self.out(a.transpose(1, 2).reshape(B, L, D)))
            return x + self.drop(self.ff(self.ln2(x)))

    class SeqModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.items = ItemEmbedding()
            self.drop = nn.Dropout(cfg.dropout)
            if kind == "gru":
                self.gru = nn.GRU(cfg.dim, cfg.dim, batch_first=True)
            else:
                if cfg.dim % cfg.n_heads:
                    raise ValueError(f"dim {cfg.dim} is not divisible by n_heads {cfg.n_heads}")
                self.pos = nn.Embedding(cfg.max_len, cfg.dim)
                nn.init.normal_(self.pos.weight, std=0.1)
                self.blocks = nn.ModuleList(Block() for _ in range(cfg.n_blocks))
                self.ln = nn.LayerNorm(cfg.dim)

        def encode(self, vid, feats, real):
            """Hidden state at every position of left-padded inputs; ``real`` marks non-padding."""
            x = self.drop(self.items(vid, feats))
            if kind == "gru":
                return self.gru(x)[0]
            L = vid.shape[1]
            x = x + self.pos.weight[-L:].unsqueeze(0)
            causal = torch.ones(L, L, dtype=torch.bool, device=vid.device).tril()
            allowed = causal.unsqueeze(0) & real.unsqueeze(1)  # (B, Lq, Lk)
            allowed = allowed | torch.eye(L, dtype=torch.bool, device=vid.device).unsqueeze(0)
            mask = allowed.unsqueeze(1)
            for blk in self.blocks:
                x = blk(x, mask)
            return self.ln(x)

    return SeqModel()


VALID_METRICS = ("auc", "hr@5", "mrr@5", "ndcg@5")


class _EarlyStopping:
    """Scores the validation cases after each epoch, keeps the best weights, says when to stop."""

    def __init__(self, cfg: BaselineConfig, valid: list[EvalCase]):
        self.cfg, self.valid = cfg, valid
        self.active = cfg.patience > 0 and bool(valid)
        self.best, self.best_epoch, self.bad = -math.inf, 0, 0
        self.best_state: dict | None = None

    def step(self, model: _SequentialBaseline, epoch: int) -> bool:
        """Record ``epoch``; True when training should stop."""
        if not self.active:
            model.best_epoch = epoch
            return False
        metrics = evaluate(self.valid, model.score_many(self.valid), ks=(5,))
        model.valid_history.append({"epoch": epoch, "train_loss": model.losses[-1],
                                    **{k: metrics[k] for k in VALID_METRICS}})
        value = metrics[self.cfg.valid_metric]
        if value > self.best:
            self.best, self.best_epoch, self.bad = value, epoch, 0
            self.best_state = copy.deepcopy(model.model.state_dict())
        else:
            self.bad += 1
        return self.bad >= self.cfg.patience

    def restore(self, model: _SequentialBaseline) -> None:
        if self.best_state is not None:
            model.model.load_state_dict(self.best_state)
            model.best_epoch = self.best_epoch


class _SequentialBaseline:
    """Shared fit / score of the torch sequence models (left-padded, last ``max_len`` items)."""

    name = "sequential"
    kind = "gru"
    use_images = False

    def __init__(self, cfg: BaselineConfig | None = None):
        self.cfg = cfg or BaselineConfig()
        self.losses: list[float] = []
        self.model: Any = None  # the torch module, built in fit
        self.valid_history: list[dict[str, float]] = []  # per evaluated epoch: epoch, loss, metrics
        self.best_epoch = 0  # epoch whose weights were kept (0 = untrained)
        self.vocab: dict[str, int] = {}  # item id -> 1..V (0 = padding / unknown)
        self.feat_index: dict[str, int] = {}  # item id -> row of self.feats (row 0 = zeros)
        self.feats: Any = None  # cover features (torch tensor), built in fit

    # ---- data
    def _item_features(self, dataset: Dataset | None) -> None:
        import torch

        self.feat_index, self.feats = {}, None
        if not self.use_images or dataset is None:
            return
        rows: dict[str, int] = {}
        vecs: list[np.ndarray] = []
        for iid in sorted(dataset.items):
            f = image_feature(dataset.items[iid].image_path, self.cfg.thumb_size, self.cfg.hist_bins)
            if f is not None:
                rows[iid] = len(vecs) + 1
                vecs.append(f)
        if not vecs:
            return
        m = np.stack(vecs)
        m = (m - m.mean(axis=0)) / (m.std(axis=0) + 1e-6)
        self.feat_index = rows
        self.feats = torch.cat([torch.zeros(1, m.shape[1]), torch.tensor(m, dtype=torch.float32)])

    def _encode_items(self, items: Sequence[str]) -> tuple[list[int], list[int]]:
        return [self.vocab.get(i, 0) for i in items], [self.feat_index.get(i, 0) for i in items]

    def _pad(self, seqs: Sequence[Sequence[str]], length: int):
        """Left-padded (vocab ids, feature rows, real mask) of the last ``length`` items of each."""
        import torch

        vid = torch.zeros(len(seqs), length, dtype=torch.long)
        fid = torch.zeros(len(seqs), length, dtype=torch.long)
        real = torch.zeros(len(seqs), length, dtype=torch.bool)
        for n, s in enumerate(seqs):
            s = list(s)[-length:]
            if not s:
                continue
            v, f = self._encode_items(s)
            vid[n, length - len(s):] = torch.tensor(v)
            fid[n, length - len(s):] = torch.tensor(f)
            real[n, length - len(s):] = True
        return vid, fid, real

    def _feats_of(self, fid):
        return None if self.feats is None else self.feats[fid]

    # ---- training
    def fit(self, splits: Splits, dataset: Dataset | None = None, cfg: BaselineConfig | None = None):
        import torch
        from torch.nn import functional as F

        self.cfg = cfg = cfg or self.cfg
        gen = _set_seed(cfg.seed)
        seqs = [s for s in training_sequences(splits, cfg.use_eval_histories).values() if len(s) >= 2]
        self.vocab = {i: n + 1 for n, i in enumerate(sorted({i for s in seqs for i in s}))}
        self._item_features(dataset)
        n_feat = 0 if self.feats is None else self.feats.shape[1]
        self.model = _build_modules(self.kind, len(self.vocab), n_feat, cfg)
        self.losses, self.valid_history, self.best_epoch = [], [], 0
        if not seqs or cfg.epochs == 0:
            self.model.eval()
            return self
        inputs, targets = prefix_examples(seqs, cfg.max_len)
        inp_v, inp_f, real = self._pad(inputs, cfg.max_len)
        tgt = torch.tensor([self.vocab[t] - 1 for t in targets])  # class k = vocab id k+1
        all_v = torch.arange(1, len(self.vocab) + 1)
        all_f = torch.tensor([self.feat_index.get(i, 0) for i in self.vocab]) if self.feats is not None else None
        opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        stopper = _EarlyStopping(cfg, list(splits.valid))
        for epoch in range(1, cfg.epochs + 1):
            self.model.train()
            perm = torch.randperm(len(targets), generator=gen)
            total = 0.0
            for start in range(0, len(targets), cfg.batch_size):
                b = perm[start:start + cfg.batch_size]
                h = self.model.encode(inp_v[b], self._feats_of(inp_f[b]), real[b])[:, -1]
                tk = tgt[b]
                if cfg.loss == "ce":
                    items = self.model.items(all_v, None if all_f is None else self.feats[all_f])
                    loss = F.cross_entropy(h @ items.T, tk)
                else:
                    neg = torch.randint(0, len(self.vocab), tk.shape, generator=gen)
                    neg = torch.where(neg == tk, (neg + 1) % len(self.vocab), neg)
                    pe = self.model.items(tk + 1, None if all_f is None else self.feats[all_f[tk]])
                    ne = self.model.items(neg + 1, None if all_f is None else self.feats[all_f[neg]])
                    loss = -F.logsigmoid((h * pe).sum(-1) - (h * ne).sum(-1)).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(b)
            self.losses.append(total / len(targets))
            if stopper.step(self, epoch):
                break
        stopper.restore(self)
        self.model.eval()
        return self

    # ---- scoring
    def score_many(self, cases: Sequence[EvalCase], batch_size: int = 256) -> list[list[float]]:
        import torch

        if self.model is None:
            raise RuntimeError(f"{type(self).__name__}.score called before fit")
        out: list[list[float]] = []
        self.model.eval()
        with torch.no_grad():
            for start in range(0, len(cases), batch_size):
                chunk = cases[start:start + batch_size]
                vid, fid, real = self._pad([c.history for c in chunk], self.cfg.max_len)
                h = self.model.encode(vid, self._feats_of(fid), real)[:, -1]  # (B, D)
                for n, c in enumerate(chunk):
                    cv, cf = self._encode_items(c.candidates)
                    e = self.model.items(torch.tensor(cv), self._feats_of(torch.tensor(cf)))
                    if not c.history:
                        out.append([0.0] * len(c.candidates))
                    else:
                        out.append((e @ h[n]).tolist())
        return out

    def score(self, case: EvalCase) -> list[float]:
        return self.score_many([case])[0]


class GRU4Rec(_SequentialBaseline):
    """GRU over item-id embeddings; next-item softmax (or BPR) at every position."""

    name = "gru4rec"
    kind = "gru"


class SASRec(_SequentialBaseline):
    """Causal self-attention over item-id + position embeddings (``n_blocks`` pre-norm blocks)."""

    name = "sasrec"
    kind = "sasrec"


class SASRecImage(_SequentialBaseline):
    """SASRec whose item embedding adds a projection of the cover's cheap image feature; cold items
    (unknown id → zero id embedding) are still told apart by their covers. Items without an image
    get a zero feature (= plain SASRec)."""

    name = "sasrec_image"
    kind = "sasrec"
    use_images = True


BASELINES: dict[str, type] = {"popularity": Popularity, "gru4rec": GRU4Rec, "sasrec": SASRec,
                              "sasrec_image": SASRecImage}


# --------------------------------------------------------------------------- validation grid

class BaselineGrid(BaseModel):
    """A small hyper-parameter grid; every combination is trained and scored on validation."""

    dim: list[int] = Field([32, 64], min_length=1, description="Embedding / hidden sizes to try.")
    lr: list[float] = Field([1e-3, 3e-3], min_length=1, description="Adam learning rates to try.")
    dropout: list[float] = Field([0.2, 0.5], min_length=1, description="Dropout rates to try.")
    epochs: list[int] = Field([50], min_length=1,
                              description="Epoch caps to try (early stopping picks the epoch below the cap).")

    def points(self) -> list[dict[str, float | int]]:
        """Every combination, in a fixed order (dim, lr, dropout, epochs vary slowest to fastest)."""
        names = ("dim", "lr", "dropout", "epochs")
        combos = itertools.product(*(getattr(self, n) for n in names))
        return [dict(zip(names, combo, strict=True)) for combo in combos]


class GridPoint(BaseModel):
    """One trained grid point: its settings and its validation metrics at the restored epoch."""

    params: dict[str, float | int] = Field(description="Settings that differ from the base config.")
    valid: dict[str, float] = Field(description="Validation metrics (test protocol's) of the restored model.")
    best_epoch: int = Field(description="Epoch whose weights were kept.")
    fit_s: float = Field(description="Training wall time in seconds (information only).")


class TuneResult(BaseModel):
    """What :func:`tune` chose and why: every grid point with its validation metrics."""

    model: str = Field(description="Baseline key in BASELINES.")
    metric: str = Field(description="Validation metric maximised (ties: the earlier grid point).")
    chosen: BaselineConfig = Field(description="Config of the best grid point.")
    points: list[GridPoint] = Field(description="Every grid point in grid order.")
    _fitted: object = PrivateAttr(default=None)

    @property
    def fitted(self):
        """The chosen point's trained model (not serialised)."""
        return self._fitted


def tune(name: str, splits: Splits, dataset: Dataset | None = None, base: BaselineConfig | None = None,
         grid: BaselineGrid | None = None) -> TuneResult:
    """Train ``BASELINES[name]`` at every point of ``grid`` (over ``base``), score each on
    ``splits.valid`` (test protocol metrics) and keep the point with the best ``base.valid_metric``.
    Popularity has no settings: one point. The test cases are never read."""
    if not splits.valid:
        raise ValueError("tune needs validation cases")
    base = base or BaselineConfig()
    grid = grid or BaselineGrid()
    cls = BASELINES[name]
    points: list[GridPoint] = []
    best: tuple[float, BaselineConfig, object] | None = None
    for params in ([{}] if cls is Popularity else grid.points()):
        cfg = base.model_copy(update=params)
        t0 = time.perf_counter()
        model = cls(cfg).fit(splits, dataset)
        fit_s = time.perf_counter() - t0
        metrics = evaluate(splits.valid, model.score_many(splits.valid), ks=(5,))
        valid = {k: metrics[k] for k in VALID_METRICS}
        points.append(GridPoint(params=params, valid=valid, best_epoch=getattr(model, "best_epoch", 0),
                                fit_s=round(fit_s, 2)))
        if best is None or valid[base.valid_metric] > best[0]:
            best = (valid[base.valid_metric], cfg, model)
    assert best is not None
    result = TuneResult(model=name, metric=base.valid_metric, chosen=best[1], points=points)
    result._fitted = best[2]
    return result
