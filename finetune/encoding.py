"""Tokenising SFT examples exactly as inference renders them (:class:`SFTEncoder`) and batching
them (:class:`SFTCollator`).

The prompt is ``Recommender.request`` rendered by ``TransformersBackend.render`` (the very chat
template, processor and image expansion used at inference), followed by the answer word and the
end-of-turn token. Labels are ``-100`` everywhere except the answer token and the end token: the
loss covers the answer only (the authors' code also trained on the prompt; we do not). Rows are
right-padded, so the answer is predicted from the last prompt token exactly as ``score_yes_no``
reads it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mllm_msr.finetune.examples import SFTExample


class SFTEncoder:
    """Turns examples into model inputs exactly as inference renders them, with answer-only labels.

    ``backend``: a :class:`~mllm_msr.models.hf_backend.TransformersBackend` (its ``render``,
    processor and resolved yes/no token ids); ``recommender``: a Recommender whose ``request``
    builds the prompt (default: the packaged prompts, ``use_images`` as given)."""

    def __init__(self, backend, recommender=None, *, use_images: bool = True, max_length: int = 1024,
                 history: str = "summary"):
        from mllm_msr.agents.recommender import Recommender, RecommenderConfig

        self.backend = backend
        self.recommender = recommender or Recommender(
            backend, RecommenderConfig(use_images=use_images, adapter=None, history=history))
        self.max_length = max_length
        self.tokenizer = backend.tokenizer
        eot = self.tokenizer.eos_token
        if eot is None:
            raise ValueError("the tokenizer has no end-of-turn (eos) token")
        self.end_token = eot
        self.end_token_id = self.tokenizer.convert_tokens_to_ids(eot)
        self.answer_ids = {"yes": backend.yes_token_id, "no": backend.no_token_id}
        self._checked = False

    def request(self, ex: SFTExample):
        return self.recommender.request(ex.user_summary, ex.item, None)

    def _check_template(self, req, prompt: str, answer: str) -> None:
        """The chat template itself must render an assistant turn as prompt + answer + end token."""
        from mllm_msr.models.base import ChatRequest

        full, _ = self.backend.render(ChatRequest(req.messages + ({"role": "assistant", "content": answer},)),
                                     continue_final=False)
        if not full.startswith(prompt + answer + self.end_token):
            raise ValueError("chat template does not render an assistant answer as "
                             f"<generation prompt>{answer}{self.end_token}: {full[len(prompt) - 40:]!r}")
        self._checked = True

    def encode(self, ex: SFTExample) -> dict[str, Any]:
        """input_ids, labels (answer + end token only), pixel_values / pixel_attention_mask."""
        req = self.request(ex)
        prompt, images = self.backend.render(req)
        completion = ex.label + self.end_token
        if not self._checked:
            self._check_template(req, prompt, ex.label)
        tok = self.tokenizer
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        f_ids = tok(prompt + completion, add_special_tokens=False)["input_ids"]
        if f_ids[:len(p_ids)] != p_ids:
            raise ValueError("the answer merges with the prompt's last token; cannot mask the prompt")
        n_c = len(f_ids) - len(p_ids)
        if f_ids[len(p_ids)] != self.answer_ids[ex.label] or f_ids[-1] != self.end_token_id:
            raise ValueError(f"answer {ex.label!r} tokenises to {f_ids[len(p_ids):]}, expected "
                             f"[{self.answer_ids[ex.label]}, ..., {self.end_token_id}] (scoring reads "
                             "the first answer token)")
        if images:
            enc = self.backend.processor(text=[prompt + completion], images=[images], return_tensors="pt")
        else:
            enc = tok([prompt + completion], return_tensors="pt", add_special_tokens=False)
        ids = enc["input_ids"][0]
        if ids.shape[0] > self.max_length:
            raise ValueError(f"example for user {ex.user_id!r} item {ex.item.item_id!r} has "
                             f"{ids.shape[0]} tokens > max_length={self.max_length}")
        if ids[-n_c:].tolist() != f_ids[-n_c:]:
            raise ValueError("processor and tokenizer disagree on the answer tokens")
        labels = ids.clone()
        labels[:-n_c] = -100
        row: dict[str, Any] = {"input_ids": ids, "labels": labels}
        if "pixel_values" in enc:
            row["pixel_values"] = enc["pixel_values"][0]
            if "pixel_attention_mask" in enc:
                row["pixel_attention_mask"] = enc["pixel_attention_mask"][0]
        return row

    def encode_all(self, examples: Sequence[SFTExample]) -> list[dict[str, Any]]:
        return [self.encode(ex) for ex in examples]


class SFTCollator:
    """Right padding (pad id / label -100); images padded to the batch's max count with zeros
    (Idefics3 drops all-zero images, so text-only rows can share a batch with image rows)."""

    def __init__(self, pad_token_id: int):
        self.pad = int(pad_token_id)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        n = max(r["input_ids"].shape[0] for r in rows)
        B = len(rows)
        ids = torch.full((B, n), self.pad, dtype=torch.long)
        labels = torch.full((B, n), -100, dtype=torch.long)
        att = torch.zeros((B, n), dtype=torch.long)
        for i, r in enumerate(rows):
            L = r["input_ids"].shape[0]
            ids[i, :L] = r["input_ids"]
            labels[i, :L] = r["labels"]
            att[i, :L] = 1
        out = {"input_ids": ids, "attention_mask": att, "labels": labels}
        with_img = [r for r in rows if r.get("pixel_values") is not None]
        if with_img:
            ref = with_img[0]["pixel_values"]
            k = max(r["pixel_values"].shape[0] for r in with_img)
            pv = torch.zeros((B, k, *ref.shape[1:]), dtype=ref.dtype)
            has_mask = "pixel_attention_mask" in with_img[0]
            if has_mask:
                pm_ref = with_img[0]["pixel_attention_mask"]
                pm = torch.zeros((B, k, *pm_ref.shape[1:]), dtype=pm_ref.dtype)
            for i, r in enumerate(rows):
                if r.get("pixel_values") is None:
                    continue
                m = r["pixel_values"].shape[0]
                pv[i, :m] = r["pixel_values"]
                if has_mask:
                    pm[i, :m] = r["pixel_attention_mask"]
            out["pixel_values"] = pv
            if has_mask:
                out["pixel_attention_mask"] = pm
        return out


class _ListDataset:
    """Encoded rows; ``seen`` (when given) records every index drawn, in order (the data audit)."""

    def __init__(self, rows: list[dict[str, Any]], seen: list[int] | None = None):
        self.rows = rows
        self.seen = seen

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.seen is not None:
            self.seen.append(int(i))
        return self.rows[i]

