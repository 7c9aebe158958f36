"""The prompt renderer: loads the prompt files (``prompts/*.yaml``, edited without touching Python) and
renders them into chat requests.

Each ``*.yaml`` in ``prompts/`` (or in a user-supplied folder) declares its ``variables`` and holds
``system``/``user`` templates with ``{variable}`` slots; ``image: true`` adds the item's image part,
at the ``[[image]]`` marker if the template has one, else before the text. A prompt's *version* is
the hash of its file, and it is part of every cache key, so editing a prompt invalidates exactly
what it produced. Values are untrusted data: the renderer neutralises chat-template control tokens
and image placeholders inside them.
"""
from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mllm_msr.hashing import sha256_hex
from mllm_msr.models.base import ChatRequest, penalties
from mllm_msr.prompts import PROMPT_DIR  # the prompt files' folder (the package holds only them)

# Control sequences of common chat templates and the Idefics3/LLaVA image placeholders. Inside
# untrusted text they could forge turns or image slots, so they are broken up before rendering.
_CONTROL = re.compile(
    r"<\|[^|<>]{0,40}\|>"                      # ChatML / Llama-3 style <|im_start|>, <|eot_id|>
    r"|</?s>|\[/?INST\]|<<\/?SYS>>"             # Llama-2 / Mistral
    r"|<image>|<fake_token_around_image>|<global-img>|<row_\d+_col_\d+>|<end_of_utterance>"
    r"|</?data>",                               # our own data delimiters
    re.IGNORECASE,
)


IMAGE_SLOT = "[[image]]"  # where a prompt file puts the item's image; default: before the text


class PromptError(ValueError):
    """A prompt file that is malformed or used with the wrong variables."""


def neutralise(value: Any, max_chars: int = 2000) -> str:
    """Make untrusted text safe to place between <data> tags: strip control tokens, cap length."""
    text = str(value) if value is not None else ""
    text = text.replace("\x00", "")
    prev = None
    while prev != text:  # repeat: removing one token must not assemble another
        prev, text = text, _CONTROL.sub(" ", text)
    text = re.sub(r"[ \t]+", " ", text).strip()
    return text[:max_chars]


def _slots(template: str | None) -> set[str]:
    if not template:
        return set()
    try:
        return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise PromptError(str(e)) from e


@dataclass(frozen=True)
class Prompt:
    """A loaded prompt: name, version (content hash) and templates."""

    name: str
    version: str
    variables: tuple[str, ...]
    user: str
    system: str | None = None
    image: bool = False
    assistant_prefix: str | None = None
    description: str = ""
    path: Path | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def decoding(self) -> dict[str, float]:
        """The prompt file's decoding settings for ``ModelBackend.generate`` (only those it sets):
        OpenAI-style penalties on the tokens generated so far, never on the prompt, so copying the
        prompt's words stays free while a loop of the answer's own words is discouraged."""
        return penalties(self.frequency_penalty, self.presence_penalty)

    def render_text(self, **values: Any) -> tuple[str | None, str]:
        missing = set(self.variables) - values.keys()
        extra = values.keys() - set(self.variables)
        if missing or extra:
            raise PromptError(f"prompt {self.name!r}: missing variables {sorted(missing)}, "
                              f"unexpected {sorted(extra)}")
        # `items` is a pre-rendered list of neutralised item lines (render_items); others are raw data.
        safe = {k: (v if k == "items" else neutralise(v)) for k, v in values.items()}
        return (self.system.format(**safe) if self.system else None), self.user.format(**safe)

    def prefill(self, **values: Any) -> str | None:
        """The rendered ``assistant_prefix``: the answer starts with it and the model continues."""
        if not self.assistant_prefix:
            return None
        return self.assistant_prefix.format(**{k: neutralise(v) for k, v in values.items() if k != "items"})

    def request(self, image_path: str | Path | None = None, adapter: str | None = None,
                **values: Any) -> ChatRequest:
        """Render into a ChatRequest; the image part goes first or last as the file says."""
        system, user = self.render_text(**values)
        parts: list[dict[str, Any]] = [{"type": "text", "text": user}]
        if self.image:
            if image_path is None:
                raise PromptError(f"prompt {self.name!r} needs an image")
            img = {"type": "image", "path": str(image_path)}
            if IMAGE_SLOT in user:  # the file says exactly where the image goes
                before, after = user.split(IMAGE_SLOT, 1)
                parts = [p for p in ({"type": "text", "text": before.rstrip(" ")}, img,
                                     {"type": "text", "text": after.lstrip(" ")}) if p.get("text", 1)]
            else:
                parts = [img] + parts
        elif IMAGE_SLOT in user:
            raise PromptError(f"prompt {self.name!r} has an image slot but image is false")
        return ChatRequest.user(parts, system=system, adapter=adapter, prefill=self.prefill(**values))


def render_items(lines: Sequence[tuple[str, str] | str]) -> str:
    """Numbered item list for user prompts: (title, summary) pairs or summaries alone, each
    neutralised and delimited."""
    return "\n".join(f"{i}. <data>{neutralise(x, 600)}</data>" if isinstance(x, str)
                     else f"{i}. <data>{neutralise(x[0], 200)}: {neutralise(x[1], 600)}</data>"
                     for i, x in enumerate(lines, 1))


def load_prompt(name: str, directory: str | Path | None = None) -> Prompt:
    """Load ``<directory>/<name>.yaml``; errors name the file and the problem."""
    path = Path(directory or PROMPT_DIR) / f"{name}.yaml"
    if not path.is_file():
        raise PromptError(f"prompt {name!r} not found: {path}")
    raw = path.read_bytes()
    try:
        spec = yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise PromptError(f"{path}: not valid UTF-8 YAML: {e}") from e
    if not isinstance(spec, dict) or "user" not in spec or "variables" not in spec:
        raise PromptError(f"{path}: needs at least 'variables' and 'user' keys")
    declared = set(spec["variables"] or [])
    used = _slots(spec.get("system")) | _slots(spec["user"])
    if declared != used:
        raise PromptError(f"{path}: declared variables {sorted(declared)} but the templates use "
                          f"{sorted(used)} (missing: {sorted(used - declared)}, unused: "
                          f"{sorted(declared - used)})")
    if not _slots(spec.get("assistant_prefix")) <= declared - {"items"}:
        raise PromptError(f"{path}: assistant_prefix uses {sorted(_slots(spec.get('assistant_prefix')))}; it may use "
                          f"only declared variables other than 'items'")
    penalties = {}
    for k in ("frequency_penalty", "presence_penalty"):
        v = spec.get(k, 0.0)
        if isinstance(v, bool) or not isinstance(v, int | float) or not -2.0 <= v <= 2.0:
            raise PromptError(f"{path}: {k} must be a number in [-2, 2] (OpenAI's range), got {v!r}")
        penalties[k] = float(v)
    return Prompt(
        name=name, version=sha256_hex(raw, 12), **penalties,
        variables=tuple(spec["variables"] or []), user=spec["user"].rstrip("\n"),
        system=spec.get("system"), image=bool(spec.get("image", False)),
        assistant_prefix=spec.get("assistant_prefix"), description=spec.get("description", ""),
        path=path,
    )


def list_prompts(directory: str | Path | None = None) -> list[str]:
    return sorted(p.stem for p in Path(directory or PROMPT_DIR).glob("*.yaml"))
