"""Setup's final check: really import every module the stack needs (``find_spec`` would pass
for a package whose import is broken, e.g. vLLM with a CUDA-linked torchvision on CPU).

Usage: ``python scripts/check_env.py torch vllm vllm:LLM …`` where ``module:name`` also checks
``from module import name``, and ``module:name()`` also calls it (e.g. a function that finds a
data file). Each module is imported in its own subprocess, so one broken import can
not mask or poison the next. Exits 1 naming every failing module and its error.
"""
from __future__ import annotations

import argparse
import subprocess
import sys

TIMEOUT_S = 600


def check(module: str, names: list[str], python: str = sys.executable) -> str | None:
    """None if ``module`` imports and has every attribute in ``names`` (``from module import name``;
    a name ending in ``()`` is also called); otherwise its error (the exception line, then where
    it was raised)."""
    code = f"import importlib; m = importlib.import_module({module!r})"
    code += "".join(f"; getattr(m, {n.removesuffix('()')!r})" + ("()" if n.endswith("()") else "") for n in names)
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"import did not finish in {TIMEOUT_S} s"
    if proc.returncode == 0:
        return None
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()] or [f"exit status {proc.returncode}"]
    frames = [ln.strip() for ln in lines if ln.lstrip().startswith('File "')]
    return lines[-1] + (f"\n    raised at {frames[-1]}" if frames else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modules", nargs="+",
                    help="module, module:name (`from module import name`) or module:name() (also call it)")
    args = ap.parse_args(argv)
    wanted: dict[str, list[str]] = {}
    for spec in args.modules:
        module, _, name = spec.partition(":")
        wanted.setdefault(module, []).extend([name] if name else [])
    failed = {m: err for m, names in wanted.items() if (err := check(m, names)) is not None}
    for module, err in failed.items():
        names = wanted[module]
        what = f"from {module} import {', '.join(names)}" if names else f"import {module}"
        print(f"setup incomplete: `{what}` fails: {err}", file=sys.stderr)
    if failed:
        return 1
    print(f"imports ok: {' '.join(args.modules)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
