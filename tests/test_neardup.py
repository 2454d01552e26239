"""Near-duplicate detection: banding parameters, signatures, and order-free decisions."""

from __future__ import annotations

import itertools
import random
import re
import string

import numpy as np
from datasketch.lsh import _optimal_param

from exforge.elixir.hashing import ngram_hashes, text_ngram_hashes, tokens
from exforge.elixir.neardup import (
    NUM_PERM,
    THRESHOLD,
    Bucket,
    Held,
    band_keys,
    decide,
    lsh_errors,
    optimal_bands,
    shingles,
    signature,
    text_band_keys,
)
from exforge.elixir.synthetic import module, recommented, renamed, reordered
from tests.support.neardup import batch_decisions


def test_bands_minimise_false_positives_plus_negatives_at_the_threshold() -> None:
    bands, rows = optimal_bands(THRESHOLD, NUM_PERM)
    assert (bands, rows) == _optimal_param(THRESHOLD, NUM_PERM, 0.5, 0.5) == (25, 10)
    assert bands * rows <= NUM_PERM
    best = sum(lsh_errors(THRESHOLD, bands, rows))
    for b, r in ((16, 16), (32, 8), (64, 4), (26, 9), (24, 10), (25, 9)):
        assert sum(lsh_errors(THRESHOLD, b, r)) > best, (b, r)


def test_lsh_error_integrals() -> None:
    # one band of one row collides with probability s: FP area is t²/2, FN (1-t)²/2
    false_positive, false_negative = lsh_errors(0.7, 1, 1)
    assert abs(false_positive - 0.7**2 / 2) < 1e-9
    assert abs(false_negative - 0.3**2 / 2) < 1e-9


def test_shingles_and_band_keys() -> None:
    assert len(shingles(tokens("a b c d e f"))) == 2
    assert len(shingles(tokens("x |> y"))) == 1
    assert len(shingles(tokens(" \n "))) == 0
    assert list(shingles(tokens("a b c d e f"))) == list(shingles(tokens("a  b\nc (d) e, f")))
    assert band_keys(tokens("%{} -> []")) == []
    text = module(random.Random(1), "A").source()
    keys = band_keys(tokens(text))
    assert len(keys) == 25 and len(set(keys)) == 25
    assert [k.split(":")[0] for k in keys] == [str(i) for i in range(25)]
    assert band_keys(tokens(text)) == keys  # deterministic across calls (and processes: fixed seed)


def test_hashes_from_text_are_those_of_its_tokens() -> None:
    rng = random.Random(4)
    alphabet = string.ascii_letters + string.digits + "_ \n\t.,:()#|>-=\"'"
    texts = ["", " ", "a", "Ab_9", "é", "aé Bé x", "ÉCOLE école", "a" * 64, "B" * 65]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 400))) for _ in range(300)]
    texts += [
        module(rng, "A").source(),
        "x" * 70 + " " + module(rng, "B").source() + " " + "Y" * 999,
    ]
    for text in texts:
        words = tokens(text)
        assert words == tuple(re.findall(r"\w+", text))
        for n, fold_case, unique in ((5, False, False), (8, True, True), (1, True, False)):
            expected = ngram_hashes(words, n, fold_case, unique)
            assert np.array_equal(text_ngram_hashes(text, n, fold_case, unique), expected)
        assert text_band_keys(text) == band_keys(words)


def test_signatures_estimate_jaccard_similarity() -> None:
    rng = random.Random(9)
    errors = []
    for index in range(30):
        base = module(rng, f"J{index}")
        other = renamed(rng, recommented(rng, reordered(rng, base)))
        a, b = shingles(tokens(base.source())), shingles(tokens(other.source()))
        true = len(np.intersect1d(a, b)) / len(np.union1d(a, b))
        sig_a, sig_b = signature(tokens(base.source())), signature(tokens(other.source()))
        assert sig_a is not None and sig_b is not None and sig_a.shape == (NUM_PERM,)
        errors.append(float((sig_a == sig_b).mean()) - true)
    assert abs(sum(errors) / len(errors)) < 0.02  # unbiased
    assert max(abs(e) for e in errors) < 0.12  # 256 permutations: sd about 0.03


def test_variants_collide_and_distinct_modules_do_not() -> None:
    rng = random.Random(3)
    bases = [module(rng, f"M{i}") for i in range(20)]
    keys = [set(band_keys(tokens(m.source()))) for m in bases]
    assert not any(a & b for a, b in itertools.combinations(keys, 2))
    hits = 0
    for base, base_keys in zip(bases, keys, strict=True):
        for variant in (renamed(rng, base), reordered(rng, base), recommented(rng, base)):
            hits += bool(base_keys & set(band_keys(tokens(variant.source()))))
    assert hits >= 57  # of 60


def test_bucket_tells_each_file_of_a_smaller_one() -> None:
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    bucket, sends = Bucket().register(b)
    assert (bucket, sends) == (Bucket(b), [])
    bucket, sends = bucket.register(c)
    assert sends == [(c, "earlier", b)]
    bucket, sends = bucket.register(a)
    assert (bucket, sends) == (Bucket(a), [(b, "earlier", a)])
    assert bucket.register(a) == (bucket, [])  # a redelivery changes nothing
    assert bucket.register(c) == (bucket, [(c, "earlier", a)])


def test_decide() -> None:
    assert decide(Held()) is None
    assert decide(Held().hear("earlier", "b" * 64).hear("earlier", "a" * 64)) == "a" * 64
    held = Held().hear("earlier", "a" * 64).hear("settled", "f" * 64)
    assert decide(held) == "f" * 64  # an earlier batch wins over this one


def test_batch_decisions_do_not_depend_on_order() -> None:
    rng = random.Random(5)
    files: dict[str, list[str]] = {}
    for index in range(12):
        base = module(rng, f"F{index}")
        for variant in (base, renamed(rng, base), reordered(rng, base)):
            text = variant.source()
            files[f"{index:02d}{len(files):062d}"] = band_keys(tokens(text))
    expected = batch_decisions(files)
    assert sum(v is None for v in expected.values()) >= 12
    for seed in range(5):
        order = list(files.items())
        random.Random(seed).shuffle(order)
        assert batch_decisions(dict(order)) == expected
