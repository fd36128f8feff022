"""Real text that works offline: Wikipedia and news from gensim's test data, or a user's file.

gensim ships a shortened English Wikipedia dump and the Lee news corpus in its test data, so
calibration and perplexity run on real text without a network. The Wikipedia dump is parsed with
gensim's own `extract_pages` + `filter_wiki`, cleaned of the markup those leave behind, and split
by article into fixed, disjoint calibration and evaluation parts (rule in `wiki_split`). Parsing
takes a few seconds, so the cleaned articles are cached on disk, keyed by the source file's hash.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import logging
import os
import re
import tempfile
from pathlib import Path

# "wiki" is every article in dump order: the text of the reference perplexities in ASSETS.md.
BUILTIN_CORPORA = ("wiki", "wiki-calib", "wiki-eval", "news")

_GENSIM_PIN = "gensim==4.4.0"
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_NEWS_FILE = "lee_background.cor"
# Pages shorter than this after cleaning are stubs or disambiguation lists, not running text.
MIN_ARTICLE_CHARS = 500
# Every EVAL_EVERY-th article in title order goes to evaluation (see `wiki_split`).
EVAL_EVERY = 4
# Bump when the cleaning or the cache layout changes, so old caches are ignored.
_CACHE_VERSION = 2
_CACHE_FORMAT = "tyr_jax.wiki_articles"

_log = logging.getLogger(__name__)

# Markup that survives gensim's filter_wiki. All but _RE_HSPACE run after whitespace is normalised,
# so " " is the only horizontal whitespace they need to match.
_RE_HSPACE = re.compile(r"[^\S\n]+")  # any whitespace but newline, incl. NBSP and tabs
_RE_BOLD_ITALIC = re.compile(r"'{2,}")
_RE_HEADING = re.compile(r"^ *(=+) *(.*?) *\1 *$", re.M)
_RE_LIST_MARKER = re.compile(r"^(?: *[*#:;])+", re.M)
# Gallery lines "File:Name.jpg|caption" (the "File:" is sometimes already gone): keep the caption.
_RE_GALLERY = re.compile(r"^ *(?:(?:file|image):)?[^|\n]*\.(?:jpe?g|png|gif|svg|tiff?|ogg|ogv|webm) *\|",
                         re.M | re.I)
_RE_IMAGE_OPTION = re.compile(r"(?:\||(?<!\S))alt=[^\n]*|\|thumb(?:nail)?\b")
_RE_IMAGE_SIZE_OPTION = re.compile(r"\|\d+(?:x\d+)?px")  # "caption|220px": ends the caption
_RE_IMAGE_SIZE = re.compile(r"(?<![\w|])\d+(?:x\d+)?px")
# "()" and "(; )" are left where templates such as {{IPA}} or {{lang}} were removed.
_RE_EMPTY_PARENS = re.compile(r" *\( *[,;]? *\)")
# " ," and " ." are left where <ref> footnotes were removed; "( " and " )" where templates were.
_RE_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;])(?=\s|$)")
_RE_SPACE_IN_PARENS = re.compile(r"(?<=\() +| +(?=\))")
_RE_BLANK_LINES = re.compile(r"\n{3,}")


# --------------------------------------------------------------------------------------------
# Public API


def load_text(name_or_path: str) -> str:
    """Text of a built-in corpus (`BUILTIN_CORPORA`) or of a UTF-8 file.

    Args:
      name_or_path: "wiki", "wiki-calib", "wiki-eval", "news", or a path to a UTF-8 text file (a built-in
        name wins over a file of that name in the working directory; pass "./news" for the file).

    Returns:
      The text; articles/documents of a built-in corpus are joined with "\\n\\n".
    """
    if name_or_path == "wiki":
        return "\n\n".join(text for _, text in wiki_articles())
    if name_or_path in ("wiki-calib", "wiki-eval"):
        calib, evaluation = wiki_split()
        articles = calib if name_or_path == "wiki-calib" else evaluation
        return "\n\n".join(text for _, text in articles)
    if name_or_path == "news":
        return "\n\n".join(_news_documents())
    return _read_user_file(name_or_path)


def wiki_articles() -> list[tuple[str, str]]:
    """All cleaned Wikipedia articles as (title, text), in dump order; cached on disk.

    Redirects, non-article namespaces and pages under `MIN_ARTICLE_CHARS` characters after
    cleaning are dropped. Paragraphs are separated by "\\n\\n", list items by "\\n". The cache lives
    in `$XDG_CACHE_HOME/tyr_jax` (default `~/.cache/tyr_jax`), named by the source file's sha256 and
    the cache version; a corrupt or stale file is ignored and rewritten.
    """
    source = _gensim_data_file(_WIKI_FILE)
    source_sha = _sha256_file(source)
    cache_path = _cache_dir() / f"wiki-{source_sha[:16]}-v{_CACHE_VERSION}.json"
    articles = _read_cache(cache_path, source_sha)
    if articles is None:
        articles = _parse_wiki(source)
        _write_cache(cache_path, source_sha, articles)
    return articles


def wiki_split() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Fixed split of `wiki_articles()` into (calibration, evaluation) by article.

    Rule: sort the articles by title (Python string order, i.e. by code point); the article at
    sorted index i goes to evaluation iff i % EVAL_EVERY == EVAL_EVERY - 1, else to calibration.
    Both parts keep title order. The rule uses no RNG and no library-dependent hashing, so the
    split only changes if the source file or the cleaning changes. On gensim 4.4.0's dump this
    gives 79 calibration and 26 evaluation articles, about 24% of the characters in evaluation.
    """
    calib, evaluation = [], []
    for i, article in enumerate(sorted(wiki_articles(), key=lambda a: a[0])):
        (evaluation if i % EVAL_EVERY == EVAL_EVERY - 1 else calib).append(article)
    return calib, evaluation


# --------------------------------------------------------------------------------------------
# Sources


def _gensim_data_file(name: str) -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The built-in corpora come from gensim's test data, but gensim is not installed. "
            f"Install it with `pip install {_GENSIM_PIN}`, or pass a path to a UTF-8 text file."
        )
    path = Path(spec.submodule_search_locations[0]) / "test" / "test_data" / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed gensim (a build without its test data?). "
            f"Reinstall it with `pip install --force-reinstall {_GENSIM_PIN}`."
        )
    return path


def _news_documents() -> list[str]:
    """Lee news corpus: one document per line (300 documents, ~60k words)."""
    path = _gensim_data_file(_NEWS_FILE)
    lines = path.read_text(encoding="utf-8").splitlines()
    return [_RE_HSPACE.sub(" ", line).strip() for line in lines if line.strip()]


def _read_user_file(name_or_path: str) -> str:
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"{name_or_path!r} is not a built-in corpus ({', '.join(BUILTIN_CORPORA)}) and {what}; "
            "pass one of the built-in names or a path to a UTF-8 text file."
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 4]!r}). "
            f"Convert it first, e.g. `iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8.txt`."
        ) from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise ValueError(f"{path} contains no text.")
    return text


# --------------------------------------------------------------------------------------------
# Wikipedia parsing and cleaning


def _parse_wiki(source: Path) -> list[tuple[str, str]]:
    """Parse the bz2 dump with gensim and clean every article (a few seconds)."""
    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    except ImportError as e:
        raise ImportError(f"Could not import gensim ({e}); install it with `pip install {_GENSIM_PIN}`.") from e

    articles = []
    seen = set()
    with bz2.open(source, "rb") as f:
        # Namespace "0" holds articles; others (talk, user, "Wikipedia:") yield empty text.
        for title, raw, _ in extract_pages(f, filter_namespaces=("0",)):
            if not raw or raw.lstrip().lower().startswith("#redirect") or title in seen:
                continue
            text = clean_wiki_text(filter_wiki(raw))
            if len(text) >= MIN_ARTICLE_CHARS:
                seen.add(title)
                articles.append((title, text))
    if not articles:
        raise RuntimeError(f"No articles found in {source}; is the file a MediaWiki XML dump?")
    return articles


def clean_wiki_text(text: str) -> str:
    """Remove the markup `gensim.corpora.wikicorpus.filter_wiki` leaves and normalise whitespace.

    Bold/italic quotes, heading `=` signs, list markers, image options (`|alt=`, `|thumb`, sizes)
    and gallery file names go; headings become their own paragraph. Runs of horizontal whitespace
    (NBSP, tabs) become one space; blank lines separate paragraphs ("\\n\\n").
    """
    text = _RE_HSPACE.sub(" ", text)
    text = _RE_BOLD_ITALIC.sub("", text)
    text = _RE_GALLERY.sub("", text)
    text = _RE_IMAGE_OPTION.sub("", text)
    text = _RE_IMAGE_SIZE_OPTION.sub("\n", text)
    text = _RE_IMAGE_SIZE.sub("", text)
    text = _RE_HEADING.sub(lambda m: f"\n\n{m.group(2)}\n\n", text)
    text = _RE_LIST_MARKER.sub("", text)
    text = _RE_EMPTY_PARENS.sub("", text)
    text = _RE_SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _RE_SPACE_IN_PARENS.sub("", text)
    text = re.sub(" {2,}", " ", text)
    lines = [line.strip() for line in text.split("\n")]
    return _RE_BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


# --------------------------------------------------------------------------------------------
# Disk cache


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tyr_jax"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_cache(path: Path, source_sha: str) -> list[tuple[str, str]] | None:
    """Articles from the cache file, or None if it is absent, stale or corrupt.

    Layout: one JSON header line (format, version, source hash, payload length and sha256),
    then the UTF-8 JSON payload [[title, text], ...].
    """
    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        header_bytes, payload = data.split(b"\n", 1)
        header = json.loads(header_bytes)
        valid = (
            header.get("format") == _CACHE_FORMAT
            and header.get("version") == _CACHE_VERSION
            and header.get("source_sha256") == source_sha
            and header.get("payload_bytes") == len(payload)
            and header.get("payload_sha256") == hashlib.sha256(payload).hexdigest()
        )
        if valid:
            return [(title, text) for title, text in json.loads(payload)]
    except (ValueError, TypeError, AttributeError):
        pass
    _log.warning("Ignoring corrupt or stale corpus cache %s; rebuilding it.", path)
    return None


def _write_cache(path: Path, source_sha: str, articles: list[tuple[str, str]]) -> None:
    """Write atomically (temp file + os.replace): a killed process never leaves a partial cache."""
    payload = json.dumps([list(a) for a in articles], ensure_ascii=False).encode("utf-8")
    header = {
        "format": _CACHE_FORMAT,
        "version": _CACHE_VERSION,
        "source_sha256": source_sha,
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                         delete=False) as f:
            tmp = f.name
            f.write(json.dumps(header).encode("utf-8") + b"\n" + payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        # A read-only cache location only costs the parse next time; the text itself is fine.
        _log.warning("Could not write corpus cache %s (%s); continuing without it.", path, e)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
