"""Word tokens and their n-gram hashes, vectorised (numpy) and the same in every process.

Tokens are `\\w+` runs. A token hashes to its CRC-32; an n-gram to a polynomial over its
token hashes, finished with MurmurHash3's 64-bit mixer, so n-grams of a whole file are
hashed in a few array operations instead of one Python call each. (Python's `hash` is
salted per process, so it cannot name a bucket that several workers share.)

The CRC-32s of an ASCII text's tokens are computed from its bytes all at once, without
listing the tokens: CRC-32 is linear, so a token's CRC is the XOR of one table entry per
byte (by byte value and by how many bytes follow it in the token) and one per length.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from functools import cache, lru_cache

import numpy as np

__all__ = ["WORD_BYTES", "ngram_hashes", "text_ngram_hashes", "token_crcs", "tokens"]

_TOKEN = re.compile(r"\w+")
WORD_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_"  # `\w`, ASCII
_NON_WORD_BYTES = bytes(sorted(set(range(256)) - set(WORD_BYTES)))
_IS_WORD = bytes(b in WORD_BYTES for b in range(256))  # translate table: 1 for word bytes
# In ASCII text `\w` is [A-Za-z0-9_]: blanking every other character and splitting on
# blanks gives the regex's runs, several times faster.
_BLANK_NON_WORD = {c: " " for c in _NON_WORD_BYTES if c < 128}
_TABLE_LENGTH = 64  # tokens up to this many bytes use the tables; longer ones, zlib
_BASE = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xFF51AFD7ED558CCD)
_MIX2 = np.uint64(0xC4CEB9FE1A85EC53)
_SHIFT = np.uint64(33)
_HALF = np.uint64(32)
_LOW_HALF = np.uint64(0xFFFFFFFF)


@lru_cache(maxsize=8)
def tokens(text: str) -> tuple[str, ...]:
    """The word tokens of a text (the last few texts are remembered)."""
    if text.isascii():
        return tuple(text.translate(_BLANK_NON_WORD).split())
    return tuple(_TOKEN.findall(text))


def ngram_hashes(
    words: Sequence[str], n: int, fold_case: bool = False, unique: bool = True
) -> np.ndarray:
    """64-bit hashes of the n-grams of `words` (one n-gram of all of them when there are
    fewer than n; none for no words), distinct and sorted unless `unique` is False;
    `fold_case`: as if lowercased."""
    return _ngrams(_word_crcs(words, fold_case), n, unique)


def text_ngram_hashes(
    text: str, n: int, fold_case: bool = False, unique: bool = True
) -> np.ndarray:
    """`ngram_hashes(tokens(text), n, fold_case, unique)`, faster."""
    return _ngrams(token_crcs(text, fold_case), n, unique)


def token_crcs(text: str, fold_case: bool = False) -> np.ndarray:
    """CRC-32 of every token of `text` (lowercased with `fold_case`), as uint64."""
    crcs, folded = _token_crcs(text)
    return folded if fold_case else crcs


@lru_cache(maxsize=8)
def _token_crcs(text: str) -> tuple[np.ndarray, np.ndarray]:
    """`token_crcs` both ways; the last few texts are remembered (the analysis, near-dup
    bands and contamination check of a file share them)."""
    if text.isascii():
        return _ascii_token_crcs(text.encode())
    words = tokens(text)
    return _word_crcs(words, fold_case=False), _word_crcs(words, fold_case=True)


def _word_crcs(words: Sequence[str], fold_case: bool) -> np.ndarray:
    """CRC-32 of every word (lowercased with `fold_case`) as uint64, one zlib call per
    distinct word."""
    distinct = dict.fromkeys(words)
    table = {word: zlib.crc32((word.lower() if fold_case else word).encode()) for word in distinct}
    return np.array([table[word] for word in words], dtype=np.uint64)


def _ascii_token_crcs(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """`_token_crcs` of ASCII bytes, with array operations over all token bytes at once."""
    is_word = np.frombuffer(data.translate(_IS_WORD), dtype=np.bool_)
    edges = np.flatnonzero(np.diff(is_word, prepend=False, append=False))
    starts, ends = edges[::2], edges[1::2]
    if not len(starts):
        return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.uint64)
    lengths = ends - starts
    # The tokens' bytes run together, each with the number of bytes after it in its token.
    ends_run = np.cumsum(lengths)
    run = np.frombuffer(data.translate(None, _NON_WORD_BYTES), dtype=np.uint8)
    after = np.repeat(ends_run - 1, lengths) - np.arange(len(run))
    np.minimum(after, _TABLE_LENGTH - 1, out=after)  # tokens that long are redone below
    byte_terms, length_terms = _crc_tables()
    both = np.bitwise_xor.reduceat(byte_terms[(after << 8) | run], ends_run - lengths)
    both ^= length_terms[np.minimum(lengths, _TABLE_LENGTH)]
    crcs, folded = both & _LOW_HALF, both >> _HALF
    for index in np.flatnonzero(lengths > _TABLE_LENGTH).tolist():
        token = data[starts[index] : ends[index]]
        crcs[index] = zlib.crc32(token)
        folded[index] = zlib.crc32(token.lower())
    return crcs, folded


@cache
def _crc_tables() -> tuple[np.ndarray, np.ndarray]:
    """(byte terms, length terms) of CRC-32 for tokens of up to `_TABLE_LENGTH` bytes:
    `crc32(token) == xor(byte_terms[after << 8 | byte]) ^ length_terms[len(token)]`, where
    `after` counts the token's bytes after `byte`, in the low 32 bits; in the high 32 bits
    the same for the lowercased token (XOR keeps the halves apart). Taken from zlib: the
    term of a byte is what it changes in the CRC of zeros, the term of a length the CRC of
    zeros."""
    zeros = [zlib.crc32(bytes(length)) for length in range(_TABLE_LENGTH + 1)]

    def term(byte: int, after: int) -> int:
        return zlib.crc32(bytes([byte]) + bytes(after)) ^ zeros[after + 1]

    lower = bytes(range(256)).lower()
    byte_terms = [
        term(lower[byte], after) << 32 | term(byte, after)
        for after in range(_TABLE_LENGTH)
        for byte in range(256)
    ]
    length_terms = [crc << 32 | crc for crc in zeros]
    return np.array(byte_terms, dtype=np.uint64), np.array(length_terms, dtype=np.uint64)


def _ngrams(crcs: np.ndarray, n: int, unique: bool) -> np.ndarray:
    """`ngram_hashes` of tokens given by their CRC-32s."""
    if not len(crcs):
        return np.empty(0, dtype=np.uint64)
    size = min(n, len(crcs))
    count = len(crcs) - size + 1
    hashes = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for offset in range(size):
            hashes *= _BASE
            hashes += crcs[offset : offset + count]
        hashes ^= hashes >> _SHIFT
        hashes *= _MIX1
        hashes ^= hashes >> _SHIFT
        hashes *= _MIX2
        hashes ^= hashes >> _SHIFT
    return np.unique(hashes) if unique else hashes
