"""Captions from class labels, and a word tokenizer over their vocabulary: text-to-image
training data that needs no download.

Each image's caption is one of the *training* templates filled with its class (a word, a
numeral for digits), drawn anew every time the image is seen; *held-out* templates are
used only to evaluate whether the model understood the words rather than the sentences.
The vocabulary is every word of every template and class name, so held-out prompts are
made of known words in new orders and combinations.

``style="class_word"`` captions every image with its class word alone ("seven"), in both splits:
with a one-layer-free encoder (``text_encoder=class_tokens``) the condition is then one learned
token per class, the check that attending to a class token conditions as well as adding a class
vector to the time embedding.
"""

from __future__ import annotations

import logging
import re
from typing import Optional, Sequence

import torch

log = logging.getLogger("difflab.data")

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TRAIN_TEMPLATES = ("a handwritten {word}", "the digit {numeral}", "a {word}", "the number {word}",
                         "a picture of a {word}", "digit {numeral}", "an image of the digit {word}", "{word}")
DIGIT_HELD_OUT_TEMPLATES = ("a drawing of the number {numeral}", "handwritten digit {word}",
                            "the handwritten number {numeral}", "a picture of the digit {numeral}")
OBJECT_TRAIN_TEMPLATES = ("a {word}", "a photo of a {word}", "a picture of a {word}", "an image of a {word}",
                          "the {word}", "{word}")
OBJECT_HELD_OUT_TEMPLATES = ("a photo of the {word}", "an image of the {word}")
CLASS_WORD_TEMPLATES = ("{word}",)
CAPTION_STYLES = ("templates", "class_word")
PAD, UNKNOWN = "<pad>", "<unk>"


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


class Captions:
    """Captions for the classes of a dataset: digits get words and numerals, other datasets
    (Fashion-MNIST, CIFAR-10, folders) their class names."""

    def __init__(self, class_names: Sequence[str], digits: Optional[bool] = None, style: str = "templates") -> None:
        if style not in CAPTION_STYLES:
            raise ValueError(f"unknown caption style {style!r}; allowed: {', '.join(CAPTION_STYLES)}")
        names = [str(n).lower().replace("_", " ") for n in class_names]
        numerals = len(names) <= len(DIGIT_WORDS) and names == [str(i) for i in range(len(names))]
        self.digits = digits if digits is not None else numerals or names == list(DIGIT_WORDS[: len(names)])
        if self.digits and len(names) > len(DIGIT_WORDS):
            raise ValueError(f"{len(names)} digit classes: captions have words for 0-9 only")
        self.class_words = list(DIGIT_WORDS[: len(names)]) if self.digits else names
        self.train_templates = DIGIT_TRAIN_TEMPLATES if self.digits else OBJECT_TRAIN_TEMPLATES
        self.held_out_templates = DIGIT_HELD_OUT_TEMPLATES if self.digits else OBJECT_HELD_OUT_TEMPLATES
        if style == "class_word":
            self.train_templates = self.held_out_templates = CLASS_WORD_TEMPLATES
        self.style = style

    @property
    def num_classes(self) -> int:
        return len(self.class_words)

    def caption(self, label: int, template: str) -> str:
        return template.format(word=self.class_words[label], numeral=label)

    def templates(self, split: str) -> Sequence[str]:
        if split not in ("train", "held_out"):
            raise ValueError(f"unknown caption split {split!r}: use train or held_out")
        return self.train_templates if split == "train" else self.held_out_templates

    def sample(self, labels: torch.Tensor, split: str = "train",
               generator: Optional[torch.Generator] = None) -> list[str]:
        """One caption per label, each from a template drawn uniformly from `split`."""
        templates = self.templates(split)
        picks = torch.randint(len(templates), (len(labels),), generator=generator).tolist()
        return [self.caption(int(label), templates[pick]) for label, pick in zip(labels.tolist(), picks)]

    def vocabulary(self) -> list[str]:
        """Every word the captions can contain (both splits), sorted."""
        words = set()
        for template in (*self.train_templates, *self.held_out_templates):
            for label in range(self.num_classes):
                words.update(_words(self.caption(label, template)))
        return sorted(words)


class WordTokenizer:
    """Words to ids over a fixed vocabulary: 0 is padding, 1 an unknown word, then the words.
    Batches are padded to their longest caption (at least one token: an empty prompt is
    one padding token, whose mask is False)."""

    def __init__(self, vocabulary: Sequence[str], max_length: int = 16) -> None:
        if max_length < 1:
            raise ValueError(f"max_length={max_length} must be >= 1")
        self.words = [PAD, UNKNOWN, *vocabulary]
        self.ids = {word: i for i, word in enumerate(self.words)}
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def unknown_words(self, texts: Sequence[str]) -> list[str]:
        return sorted({w for text in texts for w in _words(text) if w not in self.ids})

    def __call__(self, texts: Sequence[str], warn: bool = False) -> torch.Tensor:
        """LongTensor [B, L] of ids, L = the longest caption (capped at max_length)."""
        if warn and (unknown := self.unknown_words(texts)):
            log.warning("words outside the caption vocabulary: %s; each becomes the unknown token %s, which the "
                        "text encoder never saw in training", ", ".join(unknown), UNKNOWN)
        rows = [[self.ids.get(w, 1) for w in _words(text)][: self.max_length] for text in texts]
        length = max(1, max((len(r) for r in rows), default=1))
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids
