"""Text encoders as condition embedders: word ids in, token vectors for cross-attention out.

``TextTransformer``: a small pre-norm transformer over word ids, trained from scratch
jointly with the diffusion model (the vocabulary is that of the captions). It reads
``LongTensor [B, L]`` ids with 0 as padding and returns ``tokens`` [B, L, D] and
``token_mask`` [B, L] (True on real words).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from difflab.models.conditioning import ConditionError, Embedder


class WordEncoder(Embedder):
    """What both text encoders share: ``dim``-wide tokens of at most ``max_length`` word ids."""

    dim: int
    max_length: int

    def sizes(self) -> dict[str, int]:
        return {"tokens": self.dim}

    def check_ids(self, ids: Tensor) -> None:
        # Shapes only: a value check would wait on the device at every sampler step. The
        # vocabulary is checked once against the tokenizer's (difflab-train: `check_vocabulary`).
        if ids.ndim != 2 or ids.dtype != torch.long:
            raise ConditionError(f"condition {self.input_key!r} must be word ids [B, L] (long), got {ids.dtype} of "
                                 f"shape {tuple(ids.shape)}")
        if ids.shape[1] > self.max_length:
            raise ConditionError(f"condition {self.input_key!r} has {ids.shape[1]} tokens; the encoder takes at "
                                 f"most max_length={self.max_length}")


class TextTransformer(WordEncoder):
    """Word embeddings + learned positions -> ``depth`` pre-norm transformer layers -> LayerNorm.

    Args:
        vocab_size: rows of the word table (at least the tokenizer's vocabulary, padding included).
        dim: token width (the cross-attention's context dim).
        depth, heads: transformer layers and attention heads. ``depth=0`` leaves word vectors +
            positions + LayerNorm: with one-word captions, one learned token per class.
        max_length: the longest sequence (learned positions).
        input_key: the condition dict's key holding the ids.
        p_drop: condition dropout for classifier-free guidance (a dropped prompt is zero tokens,
            the same as the empty prompt "").
    """

    def __init__(self, vocab_size: int = 128, dim: int = 64, depth: int = 2, heads: int = 4, max_length: int = 16,
                 input_key: str = "text", p_drop: float = 0.1) -> None:
        super().__init__(input_key, p_drop, trainable=True)
        if dim % heads:
            raise ValueError(f"TextTransformer dim={dim} is not divisible by heads={heads}")
        self.vocab_size, self.dim, self.max_length = vocab_size, dim, max_length
        self.words = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.positions = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        if depth < 0:
            raise ValueError(f"TextTransformer depth={depth} must be >= 0")
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False) if depth else None
        self.norm = nn.LayerNorm(dim)

    def embed(self, ids: Tensor) -> dict[str, Tensor]:
        self.check_ids(ids)
        mask = ids != 0
        has_words = mask.any(dim=1)
        # A prompt with no word at all (the empty prompt) would leave the transformer nothing to
        # attend to (NaN): let its first, padding position stand in, then zero its tokens, so the
        # empty prompt is exactly the dropped condition of classifier-free guidance.
        attend = mask.clone()
        attend[:, 0] |= ~has_words
        h = self.words(ids) + self.positions[: ids.shape[1]]
        if self.encoder is not None:
            h = self.encoder(h, src_key_padding_mask=~attend)
        h = self.norm(h)
        return {"tokens": h * has_words[:, None, None].to(h.dtype), "token_mask": mask}


def check_vocabulary(encoder: Embedder, vocab_size: int) -> None:
    """Refuse a tokenizer whose ids the encoder's word table cannot hold (said once, at build)."""
    if getattr(encoder, "vocab_size", vocab_size) < vocab_size:
        raise ValueError(f"the captions' vocabulary has {vocab_size} ids (padding and unknown included) but the "
                         f"text encoder's vocab_size is {encoder.vocab_size}: raise model.conditioner's vocab_size")


WORDLLAMA_FILES = ("weights/l2_supercat_256.safetensors", "tokenizers/l2_supercat_tokenizer_config.json")


class TextExtraMissing(ImportError):
    """The optional `text` extra (WordLlama) is not installed."""


def wordllama_vectors(words: list[str]) -> Tensor:
    """WordLlama's frozen 256-d token vectors for `words` [len(words), 256], float32: each word is
    tokenized by WordLlama's own tokenizer and its token vectors averaged.

    Both files ship inside the `wordllama` wheel (`pip install -e '.[text]'`), so nothing is
    downloaded. They are read directly (safetensors and tokenizers): `WordLlama.load(...,
    disable_download=True)` of wordllama 0.4.0 looks for its tokenizer in `tokenizer/` while the
    wheel has it in `tokenizers/`, and then refuses to download it.
    """
    try:
        import importlib.resources

        from safetensors import safe_open
        from tokenizers import Tokenizer

        root = importlib.resources.files("wordllama")
    except ImportError as error:  # wordllama or one of its dependencies
        raise TextExtraMissing("text_encoder=wordllama needs the optional text extra: pip install -e '.[text]' "
                               "(wordllama ships its 32,000 x 256 vectors in its 19 MB wheel; nothing is downloaded "
                               f"at run time). ({error})") from error
    weights, tokenizer_file = (root / name for name in WORDLLAMA_FILES)
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    with safe_open(str(weights), framework="pt", device="cpu") as handle:
        table = handle.get_tensor("embedding.weight").float()
    rows = []
    for word in words:
        ids = tokenizer.encode(word, add_special_tokens=False).ids
        rows.append(table[ids].mean(dim=0) if ids else table.new_zeros(table.shape[1]))
    return torch.stack(rows)


class FrozenWordVectors(WordEncoder):
    """Frozen pretrained word vectors (WordLlama's), a trained projection to ``dim`` and learned
    positions: the text encoder of `text_encoder=wordllama`.

    The table is a persistent buffer of ``vocab_size`` rows, zeros until ``bind_vocabulary``
    fills the rows of the captions' words (difflab-train does, from the tokenizer); it travels
    in every checkpoint, so sampling needs neither the extra nor the vocabulary again. Padding
    (id 0) and unknown words (id 1) keep zero vectors.
    """

    def __init__(self, vocab_size: int = 128, dim: int = 64, source_dim: int = 256, max_length: int = 16,
                 input_key: str = "text", p_drop: float = 0.1) -> None:
        super().__init__(input_key, p_drop, trainable=True)
        self.vocab_size, self.dim, self.max_length = vocab_size, dim, max_length
        self.register_buffer("vectors", torch.zeros(vocab_size, source_dim), persistent=True)
        self.project = nn.Linear(source_dim, dim)
        self.positions = nn.Parameter(torch.randn(max_length, dim) * 0.02)

    def bind_vocabulary(self, words: list[str]) -> None:
        """Fill the table from WordLlama for the tokenizer's `words` (ids 0 and 1 stay zero)."""
        check_vocabulary(self, len(words))
        vectors = wordllama_vectors(list(words[2:]))
        self.vectors.zero_()
        self.vectors[2:len(words)] = vectors.to(self.vectors)

    def embed(self, ids: Tensor) -> dict[str, Tensor]:
        self.check_ids(ids)
        mask = ids != 0
        tokens = self.project(self.vectors[ids]) + self.positions[: ids.shape[1]]
        # Padding and the empty prompt are zero tokens, the dropped condition (as TextTransformer's).
        return {"tokens": tokens * mask[..., None].to(tokens.dtype), "token_mask": mask}
