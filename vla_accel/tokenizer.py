"""Prompt building and a lazily loaded tokenizer.

The checkpoint's Llama-2 tokenizer is loaded on first text use (a checkpoint directory without
tokenizer files still loads). A random-weights demo policy has no tokenizer files at all: it uses
`ByteTokenizer`, a stand-in that maps UTF-8 bytes to ids 3..258 -- fine for random weights, useless
for a trained model (and labelled as such).
"""

from __future__ import annotations

from pathlib import Path


def action_prompt(instruction: str) -> str:
    return f"In: What action should the robot take to {instruction.lower()}?\nOut:"


class ByteTokenizer:
    """Stand-in tokenizer for random-weight policies: BOS (1) then one id per UTF-8 byte."""

    name = "byte-stand-in"

    def encode(self, text: str) -> list[int]:
        return [1] + [3 + b for b in text.encode("utf-8")]


class LazyTokenizer:
    """Loads `transformers.AutoTokenizer` from `path` the first time it is needed."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._tok = None

    @property
    def name(self) -> str:
        return f"hf:{self.path}"

    def _load(self):
        if self._tok is None:
            from ._compat import hide_unloadable_torchvision

            hide_unloadable_torchvision()
            from transformers import AutoTokenizer

            try:
                self._tok = AutoTokenizer.from_pretrained(self.path)
            except Exception as e:  # noqa: BLE001 - re-raised with what to do
                raise RuntimeError(
                    f"could not load the tokenizer from '{self.path}' ({type(e).__name__}: {e}). The checkpoint "
                    f"directory needs the Llama-2 tokenizer files (tokenizer.model or tokenizer.json + "
                    f"tokenizer_config.json), or call predict_from_inputs() with token ids you made yourself."
                ) from e
        return self._tok

    def encode(self, text: str) -> list[int]:
        return list(self._load()(text, add_special_tokens=True)["input_ids"])


def tokenize_prompt(tokenizer, instruction: str) -> list[int]:
    """Token ids of the action prompt as the tokenizer gives them (BOS first)."""
    return list(tokenizer.encode(action_prompt(instruction)))


def with_empty_token(ids: list[int], empty_id: int = 29871) -> list[int]:
    """Appends the empty "▁" token (29871) unless the prompt already ends with it."""
    ids = [int(i) for i in ids]
    return ids if ids and ids[-1] == empty_id else ids + [empty_id]
