"""Prompt files (``*.yaml``) a prompt engineer edits without touching Python.

Each file declares its ``variables`` and holds ``system``/``user`` templates with ``{variable}``
slots (see any file here). The renderer that loads them is :mod:`mllm_msr.prompting`;
``msr prompts list | show NAME | diff A B`` browses them.
"""
from pathlib import Path

PROMPT_DIR = Path(__file__).resolve().parent
