"""Run mypy over the installed package layout: `mllm_msr` with the design card's root folders
(agents/, graphs/, prompts/, finetune/) mapped in as `[tool.setuptools] package-dir` says.

mypy finds modules by directory layout only, so it cannot follow package-dir (nor the editable
install's import hook). This builds a tree of symlinks under build/mypy-tree that has the installed
layout, runs mypy there with pyproject.toml's [tool.mypy] settings, and prints the errors with the
repository's real paths. Usage: `.venv/bin/python scripts/typecheck.py [extra mypy args]`.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "mypy-tree"


def build_tree() -> dict[str, str]:
    """Symlink the package-dir mapping into TREE; return {path in the tree: path in the repo}."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping: dict[str, str] = conf["tool"]["setuptools"]["package-dir"]
    links: dict[str, Path] = {}
    shutil.rmtree(TREE / "mllm_msr", ignore_errors=True)  # drop links to files removed since
    for package, folder in sorted(mapping.items()):  # parents before children
        dest = TREE.joinpath(*package.split("."))
        src = ROOT / folder
        if package == folder:  # the top package: a real folder of links, so children can be added
            dest.mkdir(parents=True, exist_ok=True)
            for entry in src.iterdir():
                if entry.name not in {p.rsplit(".", 1)[-1] for p in mapping} and entry.name != "__pycache__":
                    links[str(dest / entry.name)] = entry
        else:
            links[str(dest)] = src
    for link, target in links.items():
        path = Path(link)
        path.symlink_to(target)
    return {f"{p}/": f"{f}/" for p, f in ((k.replace(".", "/"), v) for k, v in mapping.items()) if p != f}


def main() -> int:
    renames = build_tree()
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), *sys.argv[1:]]
    res = subprocess.run(cmd, cwd=TREE, capture_output=True, text=True)
    out = res.stdout + res.stderr
    for tree_path, repo_path in renames.items():
        out = out.replace(tree_path, repo_path)
    sys.stdout.write(out)
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
