"""Token streams and the windows cut from them: seeded calibration batches, sequential eval windows.

Calibration follows the GPTQ/Wanda recipe: `num_sequences` windows of `seq_len` tokens at random
offsets of one long token stream. Here the offsets come from an explicit JAX key, so a batch is a
pure function of (tokens, sizes, key).
"""

from __future__ import annotations

import jax
import numpy as np
import tokenizers
from jaxtyping import Int

_INT32_MAX = np.iinfo(np.int32).max


def tokenize(tokenizer: tokenizers.Tokenizer, text: str) -> Int[np.ndarray, " N"]:
    """Token ids of `text` without special tokens (no BOS/EOS), as one int32 stream.

    The whole text is encoded in one call. Encoding paragraphs separately (`encode_batch`) is
    faster but not exact in general: Llama-3/Qwen2 pre-tokenizer regexes glue punctuation to the
    newlines after it (".\\n\\n" is one pre-token), and SentencePiece-style normalizers prepend "▁"
    to every call, so chunk boundaries would change the ids (tests/test_data.py shows the regex case).
    A 3 MB text takes a few seconds.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return np.asarray(ids, dtype=np.int32)


def sample_windows(tokens: Int[np.ndarray, " N"], num_sequences: int, seq_len: int, *,
                   key: jax.Array) -> Int[np.ndarray, "B T"]:
    """Random windows of a token stream, with offsets drawn from `key`.

    start_b ~ Uniform{0, ..., N - T - 1} independently (windows may overlap), window_b =
    tokens[start_b : start_b + T], as in GPTQ's calibration loader (the last token is never in a
    window, leaving a next-token target for every position). Same key -> same batch.

    Args:
      tokens: 1-D integer token stream of length N >= seq_len + 1.
      num_sequences: B, number of windows (> 0).
      seq_len: T, tokens per window (> 0).
      key: JAX PRNG key.

    Returns:
      int32 array [B, T].
    """
    tokens = _checked_stream(tokens, num_sequences, seq_len)
    starts_b = np.asarray(jax.random.randint(key, (num_sequences,), 0, len(tokens) - seq_len, dtype=np.int32))
    return tokens[starts_b[:, None] + np.arange(seq_len)]


def sample_window_batches(tokens: Int[np.ndarray, " N"], num_sequences: int, seq_len: int, *,
                          keys: jax.Array) -> Int[np.ndarray, "S B T"]:
    """`sample_windows` for every key of `keys` [S] at once (one device call, one transfer to the host):
    batch s equals `sample_windows(tokens, num_sequences, seq_len, key=keys[s])`."""
    tokens = _checked_stream(tokens, num_sequences, seq_len)
    draw = lambda k: jax.random.randint(k, (num_sequences,), 0, len(tokens) - seq_len, dtype=np.int32)  # noqa: E731
    starts_sb = np.asarray(jax.vmap(draw)(keys))
    return tokens[starts_sb[..., None] + np.arange(seq_len)]


def _checked_stream(tokens, num_sequences: int, seq_len: int) -> Int[np.ndarray, " N"]:
    tokens = _as_token_stream(tokens)
    if num_sequences <= 0:
        raise ValueError(f"num_sequences must be positive, got {num_sequences}")
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    n = tokens.shape[0]
    if n < seq_len + 1:
        raise ValueError(
            f"The text has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}; use a longer text or a "
            "shorter seq_len."
        )
    if n - seq_len > _INT32_MAX:
        raise ValueError(f"{n} tokens are too many for int32 offsets; pass a slice of the stream.")
    return tokens


def token_windows(tokens: Int[np.ndarray, " N"], seq_len: int,
                  max_tokens: int | None = None) -> Int[np.ndarray, "W T"]:
    """Consecutive non-overlapping windows of the first `max_tokens` tokens.

    W = min(N, max_tokens) // T; a shorter last window is dropped.

    Args:
      tokens: 1-D integer token stream of length N.
      seq_len: T, tokens per window (> 0).
      max_tokens: keep only this many leading tokens (> 0); None keeps all.

    Returns:
      int32 array [W, T].
    """
    tokens = _as_token_stream(tokens)
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if max_tokens is not None:
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive or None, got {max_tokens}")
        tokens = tokens[:max_tokens]
    n_windows = tokens.shape[0] // seq_len
    if n_windows == 0:
        kept = "" if max_tokens is None else f" (after max_tokens={max_tokens})"
        raise ValueError(
            f"No window of seq_len={seq_len} fits: the text has {tokens.shape[0]} tokens{kept}."
        )
    return tokens[: n_windows * seq_len].reshape(n_windows, seq_len)


def _as_token_stream(tokens) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D stream, got shape {tokens.shape}")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"tokens must be integers, got dtype {tokens.dtype}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > _INT32_MAX):
        raise ValueError("token ids must lie in [0, 2**31 - 1]")
    return tokens.astype(np.int32, copy=False)
