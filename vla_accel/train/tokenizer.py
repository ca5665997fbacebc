"""A small word-level stand-in for the Llama-2 tokenizer, saved with a trained checkpoint.

The published checkpoints ship Llama-2's SentencePiece files; they cannot be downloaded here and a
policy trained from scratch does not need them. `build_tokenizer(instructions)` makes a Hugging
Face fast tokenizer whose vocabulary is the words of the action prompts of the given instructions
(punctuation split off, case kept), with Llama-2's special ids: <unk> 0, <s> 1 (prepended), </s> 2.
Word ids start at 3, in sorted order, so the same instructions always give the same ids. Unknown
words map to <unk>. `save_tokenizer` writes `tokenizer.json`, `tokenizer_config.json` and
`special_tokens_map.json`, which `transformers.AutoTokenizer` (and so `load_policy`) reads with no
download. The Llama template "In: What action should the robot take to" is nine word tokens, as
with Llama-2, so SpecPrune's `query_skip: 9` means the same here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from vla_accel.tokenizer import action_prompt

SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2}
_WORDS = re.compile(r"\w+|[^\w\s]+")  # the `tokenizers` Whitespace pre-tokenizer's rule


def prompt_words(instruction: str) -> list[str]:
    return _WORDS.findall(action_prompt(instruction))


def build_tokenizer(instructions: list[str], vocab_limit: int = 29871):
    """-> tokenizers.Tokenizer over the prompt words of `instructions` (ids < vocab_limit)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = sorted({w for text in instructions for w in prompt_words(text)})
    if len(words) + len(SPECIALS) > vocab_limit:
        raise ValueError(f"{len(words)} distinct words do not fit below token id {vocab_limit}")
    vocab = dict(SPECIALS)
    vocab.update({w: i + len(SPECIALS) for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", SPECIALS["<s>"])])
    return tok


def save_tokenizer(tok, root: str | Path) -> Path:
    """Writes the files `AutoTokenizer.from_pretrained(root)` needs."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (root / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (root / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
        "model_max_length": 2048, "padding_side": "right", "clean_up_tokenization_spaces": False,
        "vla_accel_note": "word-level stand-in for the Llama-2 tokenizer (vla_accel.train.tokenizer)", **special,
    }, indent=2))
    return root
