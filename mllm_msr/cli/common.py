"""What every `msr` command shares: the console, the ``--config`` / ``--set`` options, the run
lock, small printers, and how loud the libraries underneath may be."""
from __future__ import annotations

import fcntl
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from mllm_msr.config import MSRConfig

console = Console()

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (layered over the defaults).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a setting: key.sub=value (repeatable).")

# Loggers of the libraries under us: their INFO/WARNING chatter and their tqdm bars (GGUF
# conversion, weight loading, shard writing) are hidden unless `msr --verbose`.
NOISY_LOGGERS = ("transformers", "huggingface_hub", "vllm", "accelerate", "peft", "chromadb", "httpx",
                 "sentence_transformers", "urllib3", "torch")
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
             "VLLM_LOGGING_LEVEL": "ERROR",
             "TORCH_CPP_LOG_LEVEL": "ERROR"}  # torch's C++ warnings (vLLM's CPU worker: NUMA binding)


def library_output(verbose: bool) -> None:
    """Quiet (default): libraries log errors only and draw no progress bars; the user sees our own
    progress bars and results. ``verbose``: the libraries' own defaults. Environment variables are
    set before the libraries are imported (so vLLM server subprocesses inherit them) and the
    already-imported libraries are switched directly."""
    logging.basicConfig(level=os.environ.get("MSR_LOG", "WARNING"))
    for key, value in QUIET_ENV.items():
        if verbose:
            if os.environ.get(key) == value:
                del os.environ[key]
        else:
            os.environ.setdefault(key, value)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.ERROR)
    if not verbose:  # libraries' deprecation notices at import (e.g. vLLM's on torch.distributed)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_warning() if verbose else hf_logging.set_verbosity_error()
        hf_logging.enable_progress_bar() if verbose else hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub import constants
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        if not verbose:
            disable_progress_bars()
        elif not constants.HF_HUB_DISABLE_PROGRESS_BARS:  # read at import: the environment then wins
            enable_progress_bars()


def load_cfg(config: Path | None, sets: list[str] | None) -> MSRConfig:
    """The layered config of a command's ``--config`` and ``--set`` options."""
    from mllm_msr.config import load_config

    return load_config(config, sets or [])


@contextmanager
def run_lock(*folders: Path) -> Iterator[None]:
    """One run per run folder and per local Chroma store: a second concurrent run on either is
    refused with a clear message instead of two processes writing the same store."""
    handles = []
    try:
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            fh = open(folder / ".msr-lock", "w")
            handles.append(fh)
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                console.print(f"[red]another msr run is using {folder}; wait for it or choose another "
                              f"run_dir / store.path[/]")
                raise typer.Exit(2) from None
        yield
    finally:
        for fh in handles:
            fh.close()


def user_sequences(ds, user: str) -> dict:
    """The dataset's sequences, or exit 2 with a clear message when ``user`` is not in it."""
    seqs = ds.sequences()
    if user not in seqs:
        console.print(f"[red]unknown user {user!r} in {ds.name} (e.g. {', '.join(list(seqs)[:5])})[/]")
        raise typer.Exit(2)
    return seqs


def print_table(title: str, rows: dict, header: tuple[str, str] = ("metric", "value")) -> None:
    """A two-column table of ``rows`` (floats with 4 decimals)."""
    t = Table(title=title)
    t.add_column(header[0])
    t.add_column(header[1], justify="right")
    for k, v in rows.items():
        t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(t)
