"""Text and tokens: offline corpora (Wikipedia, news, user files) and calibration/eval windows."""

from tyr_jax.data.corpora import BUILTIN_CORPORA, load_text, wiki_articles, wiki_split
from tyr_jax.data.sampler import sample_windows, token_windows, tokenize

__all__ = [
    "BUILTIN_CORPORA",
    "load_text",
    "sample_windows",
    "token_windows",
    "tokenize",
    "wiki_articles",
    "wiki_split",
]
