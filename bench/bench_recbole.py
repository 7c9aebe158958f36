"""Cross-check of our GRU4Rec and SASRec against RecBole 1.2.1 on MovieLens-100k.

    PYTHONPATH=/tmp/rbdeps OMP_NUM_THREADS=1 python bench/bench_recbole.py
    python bench/bench_recbole.py --models gru4rec --epochs 2      # quick look (never commit it)

Both sides use one split: leave-one-out (last item test, the one before validation, the rest
training), chronological with same-second ties in file order (RecBole's stable sort, our
protocol's rule), histories of at most 20 items. Both train on every prefix of each training
sequence with the same settings (below), early-stop on their own validation candidates (1:20,
NDCG@5, patience = RecBole's ``stopping_step``) and restore the best epoch. Both are then scored
on **our** test cases (the same target, history and 20 uniform negatives per user): RecBole's
trained model encodes our history and scores our candidates with its own item embeddings.
RecBole's metrics on its own sampled test candidates are recorded too.
``same_test_target`` / ``same_test_history`` count users whose RecBole test target / history equal
ours: RecBole's ml-100k config min-max normalises timestamps and stores them as float32, so two
ratings about a second apart can tie there and keep file order (4 of 943 targets differ).

RecBole is installed ``--no-deps``; its training imports pandas, colorlog, colorama, texttable,
tabulate and thop, which this script expects on ``PYTHONPATH`` (e.g. ``pip install --target
/tmp/rbdeps ...``). TensorBoard is replaced by a no-op writer, and the numpy aliases RecBole's
config sets (``np.float_`` …, removed in numpy 2) are provided. RecBole's logs go to a temp folder.

Target: ours within 1 point (0.01) of RecBole on HR@5, MRR@5 and NDCG@5 for both models.
Result: ``results/recbole_crosscheck.json``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

from mllm_msr.data.loaders import load_movielens100k, movielens100k_dir
from mllm_msr.data.protocol import EvalCase, ProtocolConfig, Splits, build_splits
from mllm_msr.evaluation.baselines import BASELINES, BaselineConfig
from mllm_msr.metrics import evaluate

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("hr@5", "mrr@5", "ndcg@5")
HISTORY = 20

# the same settings on both sides (RecBole's names in the values' keys)
SHARED = {"lr": 1e-3, "batch_size": 256, "dim": 64}
OURS = {"gru4rec": {"dropout": 0.3}, "sasrec": {"dropout": 0.5, "n_blocks": 2, "n_heads": 2, "ff_mult": 1}}
RECBOLE = {"gru4rec": {"model": "GRU4Rec", "embedding_size": 64, "hidden_size": 64, "num_layers": 1,
                       "dropout_prob": 0.3},
           "sasrec": {"model": "SASRec", "hidden_size": 64, "inner_size": 64, "n_layers": 2, "n_heads": 2,
                      "hidden_dropout_prob": 0.5, "attn_dropout_prob": 0.5}}


def _recbole_compat() -> None:
    """What RecBole 1.2.1 needs from numpy 2 and an environment without TensorBoard."""
    for old, new in {"float_": np.float64, "complex_": np.complex128, "unicode_": np.str_}.items():
        if not hasattr(np, old):
            setattr(np, old, new)
    stub = types.ModuleType("torch.utils.tensorboard")

    class SummaryWriter:  # no-op
        def __init__(self, *a, **k): ...

        def __getattr__(self, name):
            return lambda *a, **k: None

    stub.SummaryWriter = SummaryWriter
    sys.modules.setdefault("torch.utils.tensorboard", stub)


def _scores(cases: list[EvalCase], encode, embed, index) -> list[list[float]]:
    out = []
    with torch.no_grad():
        for start in range(0, len(cases), 512):
            chunk = cases[start:start + 512]
            seq = torch.zeros(len(chunk), HISTORY, dtype=torch.long)
            lens = torch.zeros(len(chunk), dtype=torch.long)
            for n, c in enumerate(chunk):
                ids = [index.get(i, 0) for i in c.history][-HISTORY:]
                seq[n, :len(ids)] = torch.tensor(ids)  # RecBole sequences are left-aligned
                lens[n] = len(ids)
            h = encode(seq, lens)
            for n, c in enumerate(chunk):
                e = embed(torch.tensor([index.get(i, 0) for i in c.candidates]))
                out.append((e @ h[n]).tolist())
    return out


def run_recbole(key: str, splits: Splits, epochs: int, patience: int, seed: int, work: Path) -> dict:
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.trainer import Trainer
    from recbole.utils import get_model, init_seed

    cfg = {**RECBOLE[key], "data_path": str(movielens100k_dir().parent), "dataset": "ml-100k",
           "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "MAX_ITEM_LIST_LENGTH": HISTORY,
           "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user",
                         "mode": {"valid": "uni20", "test": "uni20"}},
           "metrics": ["Hit", "MRR", "NDCG"], "topk": [5], "valid_metric": "NDCG@5",
           "train_neg_sample_args": None, "loss_type": "CE", "epochs": epochs, "stopping_step": patience,
           "learning_rate": SHARED["lr"], "train_batch_size": SHARED["batch_size"], "eval_batch_size": 4096,
           "use_gpu": False, "seed": seed, "reproducibility": True, "show_progress": False,
           "checkpoint_dir": str(work / "ckpt"), "log_wandb": False}
    model_name = cfg.pop("model")
    config = Config(model=model_name, dataset="ml-100k", config_dict=cfg)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    model = get_model(model_name)(config, train_data._dataset).to(config["device"])
    trainer = Trainer(config, model)
    t0 = time.perf_counter()
    trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    fit_s = time.perf_counter() - t0
    state = torch.load(trainer.saved_model_file, map_location="cpu", weights_only=False)
    model.load_state_dict(state["state_dict"])
    model.eval()
    own = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    index = dataset.field2token_id["item_id"]
    scores = _scores(splits.test, model.forward, model.item_embedding, index)
    m = evaluate(splits.test, scores, ks=(5,))
    # same targets and histories as ours?
    tf = test_data._dataset.inter_feat
    tok = dataset.field2id_token
    users = tok["user_id"][tf["user_id"].numpy()]
    targets = dict(zip(users, tok["item_id"][tf["item_id"].numpy()], strict=True))
    hists = {u: [tok["item_id"][i] for i in row[:n]] for u, row, n in
             zip(users, tf["item_id_list"].numpy(), tf["item_length"].numpy(), strict=True)}
    return {"metrics": {k: m[k] for k in (*METRICS, "auc")},
            "own_candidates": {k.lower(): float(v) for k, v in own.items()},
            "best_epoch": int(state["epoch"]) + 1, "fit_s": round(fit_s, 1),
            "same_test_target": sum(targets.get(c.user_id) == c.target for c in splits.test),
            "same_test_history": sum(hists.get(c.user_id) == list(c.history) for c in splits.test),
            "config": {**RECBOLE[key],
                       **{k: cfg[k] for k in ("learning_rate", "train_batch_size", "epochs", "stopping_step")}}}


def run_ours(key: str, splits: Splits, dataset, epochs: int, patience: int, seed: int) -> dict:
    cfg = BaselineConfig(**SHARED, **OURS[key], epochs=epochs, patience=patience, max_len=HISTORY,
                         seed=seed, valid_metric="ndcg@5")
    t0 = time.perf_counter()
    model = BASELINES[key](cfg).fit(splits, dataset)
    fit_s = time.perf_counter() - t0
    m = evaluate(splits.test, model.score_many(splits.test), ks=(5,))
    return {"metrics": {k: m[k] for k in (*METRICS, "auc")}, "best_epoch": model.best_epoch,
            "epochs_run": len(model.losses), "fit_s": round(fit_s, 1),
            "valid_history": model.valid_history, "config": cfg.model_dump()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="gru4rec,sasrec")
    ap.add_argument("--epochs", type=int, default=40, help="Epoch cap (both sides).")
    ap.add_argument("--patience", type=int, default=3, help="Early-stopping patience (RecBole stopping_step).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "recbole_crosscheck.json")
    ap.add_argument("--update", action="store_true",
                    help="Keep the other models' entries already in --out (e.g. models run by separate processes).")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    _recbole_compat()
    dataset = load_movielens100k()
    splits = build_splits(dataset, ProtocolConfig(split="leave_one_out", max_history=HISTORY,
                                                  valid_negatives=20, test_negatives=20, seed=args.seed))
    import recbole

    result = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
              "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "recbole": recbole.__version__, "torch": torch.__version__,
              "protocol": "ml-100k, leave-one-out, history 20, 1 positive : 20 uniform negatives, seed "
                          f"{args.seed}; same-second ties in file order; {len(splits.test)} test users",
              "shared_settings": SHARED, "epochs_cap": args.epochs, "patience": args.patience,
              "target": "ours within 0.01 of RecBole on HR@5, MRR@5, NDCG@5", "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)  # RecBole writes log/ and log_tensorboard/ under the working directory
        try:
            for key in args.models.split(","):
                load0 = os.getloadavg()
                ours = run_ours(key, splits, dataset, args.epochs, args.patience, args.seed)
                print(key, "ours", ours["metrics"], flush=True)
                rb = run_recbole(key, splits, args.epochs, args.patience, args.seed, Path(tmp))
                print(key, "recbole", rb["metrics"], flush=True)
                diff = {k: round(ours["metrics"][k] - rb["metrics"][k], 4) for k in METRICS}
                result["models"][key] = {"ours": ours, "recbole": rb, "ours_minus_recbole": diff,
                                         "within_1_point": all(abs(v) <= 0.01 for v in diff.values()),
                                         "loadavg_before": load0, "loadavg_after": os.getloadavg()}
                result["models"][key]["date"] = dt.datetime.now().isoformat(timespec="seconds")
                _write(args.out, result, args.update)  # after each model, so a long run keeps what it finished
        finally:
            os.chdir(cwd)
    print(f"results -> {args.out}")


def _write(out: Path, result: dict, update: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if update and out.is_file():
        result = {**result, "models": {**json.loads(out.read_text())["models"], **result["models"]}}
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
