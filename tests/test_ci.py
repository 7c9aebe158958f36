"""CI cannot go green by skipping: setup's final check really imports, and CI mode fails skips."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECK_ENV = ROOT / "scripts" / "check_env.py"


def _check_env(*specs: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"PYTHONPATH": str(pythonpath)} if pythonpath else {})}
    return subprocess.run([sys.executable, str(CHECK_ENV), *specs], capture_output=True, text=True,
                          env=env, timeout=120)


def test_check_env_fails_on_a_module_whose_import_is_broken(tmp_path, monkeypatch):
    (tmp_path / "broken_stack_mod.py").write_text("raise RuntimeError('CUDA-linked torchvision on CPU')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert importlib.util.find_spec("broken_stack_mod") is not None  # what the old check looked at
    r = _check_env("json", "broken_stack_mod", "no_such_module_xyz", pythonpath=tmp_path)
    assert r.returncode == 1
    assert "`import broken_stack_mod` fails: RuntimeError: CUDA-linked torchvision on CPU" in r.stderr
    assert "`import no_such_module_xyz` fails: ModuleNotFoundError" in r.stderr
    assert "json" not in r.stderr  # the good module is not blamed


def test_check_env_checks_from_imports_and_calls(tmp_path):
    (tmp_path / "data_pkg.py").write_text("def find():\n    raise FileNotFoundError('weights.gguf missing')\n")
    r = _check_env("json:dumps", "json:no_such_name", "data_pkg:find()", pythonpath=tmp_path)
    assert r.returncode == 1
    assert "`from json import dumps, no_such_name` fails: AttributeError: module 'json' has no attribute " \
           "'no_such_name'" in r.stderr
    assert "`from data_pkg import find()` fails: FileNotFoundError: weights.gguf missing" in r.stderr
    ok = _check_env("json", "json:dumps", "os.path:join")
    assert ok.returncode == 0, ok.stderr


def test_setup_final_check_imports_vllm_through_check_env():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "find_spec(" not in setup  # the old check, which passes for a broken import
    check = setup[setup.index("python scripts/check_env.py"):].split("\necho")[0].split()
    assert {"vllm", "vllm:LLM", "torch", "transformers", "mllm_msr.agents"} <= set(check)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "CI=1" in ci and "MSR_CI=1" in ci


SKIPPING_TESTS = """
    import pytest
    missing = pytest.importorskip("no_such_component_xyz") if {module_level} else None

    @pytest.mark.skipif(True, reason="chromium not installed")
    def test_skipif():
        pass

    def test_runtime_skip():
        pytest.skip("no vLLM server binary")

    def test_passes():
        pass
"""


def _run_pytest(tmp_path: Path, ci: dict[str, str], module_level: bool) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["ci_strict"]\n')
    (tmp_path / "test_sk.py").write_text(textwrap.dedent(SKIPPING_TESTS.format(module_level=module_level)))
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "MSR_CI")}
    env.update(ci, PYTHONPATH=str(ROOT / "tests"))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


def test_ci_mode_turns_every_skip_into_a_failure(tmp_path):
    local = _run_pytest(tmp_path, {}, module_level=False)
    assert local.returncode == 0 and "1 passed, 2 skipped" in local.stdout, local.stdout
    for var in ("CI", "MSR_CI"):
        ci = _run_pytest(tmp_path, {var: "1"}, module_level=False)
        # a skipif fires in the setup phase, so pytest counts it as an error; either way not green
        assert ci.returncode == 1 and "1 failed, 1 passed, 1 error" in ci.stdout, ci.stdout
        assert "chromium not installed" in ci.stdout and "no vLLM server binary" in ci.stdout
    off = _run_pytest(tmp_path, {"CI": "false"}, module_level=False)
    assert off.returncode == 0, off.stdout


def test_ci_mode_fails_a_module_level_importorskip(tmp_path):
    local = _run_pytest(tmp_path, {}, module_level=True)
    assert "1 skipped" in local.stdout and "failed" not in local.stdout, local.stdout
    ci = _run_pytest(tmp_path, {"MSR_CI": "1"}, module_level=True)
    assert ci.returncode == 2 and "1 error during collection" in ci.stdout and "no_such_component_xyz" in ci.stdout
