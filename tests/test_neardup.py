"""Near-duplicate detection: banding parameters, signatures, and order-free decisions,
each checked against an expectation computed without the code under test: exact
Jaccard similarity, signatures computed by hand from their definition, datasketch's LSH
and the kept/dropped rule stated directly, and other Python processes."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import string
import subprocess
import sys
import zlib

import numpy as np
from conftest import REPO
from datasketch.lsh import _optimal_param

from exforge.elixir.hashing import ngram_hashes, text_ngram_hashes, tokens
from exforge.elixir.neardup import (
    NUM_PERM,
    THRESHOLD,
    Bucket,
    Held,
    band_keys,
    bucket_partition,
    decide,
    lsh_errors,
    multipliers,
    optimal_bands,
    shingles,
    signature,
    text_band_keys,
)
from exforge.elixir.synthetic import module, recommented, renamed, reordered
from tests.support.neardup import batch_decisions, lsh_candidates, reference_outcomes


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
    assert band_keys(tokens(text)) == keys


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
    assert (bucket, sends) == (Bucket(a, (b,)), [(b, "displaced", a), (a, "later", b)])
    assert bucket.register(c) == (bucket, [(c, "earlier", a)])


def test_a_redelivered_registration_says_again_what_it_said() -> None:
    """A registration delivered again (its first outputs may be lost) leaves the bucket
    as it is and tells each file concerned what it told it the first time, even once a
    smaller file displaced the one registering."""
    a, b, c, d = ("0" * 64, "a" * 64, "b" * 64, "c" * 64)
    bucket, _ = Bucket().register(c)
    assert bucket.register(c) == (bucket, [])
    bucket, said = bucket.register(b)
    assert bucket.register(b) == (bucket, said) and said == [(c, "displaced", b), (b, "later", c)]
    bucket, _ = bucket.register(a)
    assert bucket == Bucket(a, (b, c))
    assert bucket.register(b) == (bucket, said)
    assert bucket.register(c) == (bucket, [])
    assert bucket.register(d) == (bucket, [(d, "earlier", a)])
    assert Bucket.loads(bucket.dumps()) == bucket and Bucket.loads("") == Bucket()


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


def shingle_hash_by_hand(crcs: list[int]) -> int:
    """A shingle's 32-bit hash from its tokens' CRC-32s, by the definition in
    `exforge.elixir.hashing`: a polynomial over them, modulo 2**64, finished with
    MurmurHash3's 64-bit mixer, its low 32 bits."""
    mask = 2**64 - 1
    value = 0
    for crc in crcs:
        value = (value * 0x9E3779B97F4A7C15 + crc) & mask
    value ^= value >> 33
    value = (value * 0xFF51AFD7ED558CCD) & mask
    value ^= value >> 33
    value = (value * 0xC4CEB9FE1A85EC53) & mask
    value ^= value >> 33
    return value & 0xFFFFFFFF


def test_signatures_are_what_their_definition_gives_by_hand() -> None:
    """Each signature value is the minimum over the text's 5-token shingles of
    `a * shingle mod 2**32`, computed here with Python integers and zlib, token by
    token (files longer than one block of the vectorised minimum included)."""
    rng = random.Random(11)
    texts = ["a b c", "x" * 80 + " y z", "défaut = école |> Élan.run()"]
    texts += [module(rng, f"H{i}").source() for i in range(3)]
    texts.append(" ".join(module(rng, f"L{i}").source() for i in range(12)))  # > 512 shingles
    a = [int(x) for x in multipliers(NUM_PERM)[0]]
    for text in texts:
        crcs = [zlib.crc32(word.encode()) for word in re.findall(r"\w+", text)]
        size = min(5, len(crcs))
        grams = {shingle_hash_by_hand(crcs[i : i + size]) for i in range(len(crcs) - size + 1)}
        expected = [min(g * a_k % 2**32 for g in grams) for a_k in a]
        computed = signature(tokens(text))
        assert computed is not None and computed.tolist() == expected, text[:40]
        assert sorted(grams) == shingles(tokens(text)).tolist()


def families(seed: int, count: int) -> dict[str, str]:
    """sha256 → text: `count` modules, each with three near-duplicate variants."""
    rng = random.Random(seed)
    texts = []
    for index in range(count):
        base = module(rng, f"N{index}")
        texts += [base, renamed(rng, base), reordered(rng, base), recommented(rng, base)]
    return {hashlib.sha256(t.source().encode()).hexdigest(): t.source() for t in texts}


def test_lsh_candidates_are_those_of_datasketch() -> None:
    """Two files share a band key exactly when datasketch's MinHashLSH (its own choice
    of bands and rows for the threshold, its own bucket hashing) puts their signatures
    in a common bucket."""
    texts = families(8, 15)
    signatures = {sha: signature(tokens(text)) for sha, text in texts.items()}
    expected = lsh_candidates(signatures)
    keys = {sha: set(text_band_keys(text)) for sha, text in texts.items()}
    computed = {
        sha: {other for other in texts if other != sha and keys[sha] & keys[other]} for sha in texts
    }
    assert computed == expected
    assert sum(map(len, expected.values())) >= 2 * 15 * 4  # variants are candidates


def test_decisions_keep_exactly_the_files_without_a_smaller_candidate() -> None:
    """The bucket rules, whatever the order files register in: a file is kept iff no
    file of a smaller sha256 is its LSH candidate (datasketch), else it joins one of
    those."""
    texts = families(6, 12)
    texts |= {hashlib.sha256(t.encode()).hexdigest(): t for t in ("", "a b", "c d e f g h")}
    allowed = reference_outcomes(
        lsh_candidates(
            {sha: s for sha, t in texts.items() if (s := signature(tokens(t))) is not None}
        )
    )
    bands = {sha: text_band_keys(text) for sha, text in texts.items()}
    kept = {sha for sha in texts if not allowed.get(sha)}
    assert 12 <= len(kept) < len(texts)
    for seed in range(4):
        order = list(bands.items())
        random.Random(seed).shuffle(order)
        decisions = batch_decisions(dict(order))
        assert {sha for sha, cluster in decisions.items() if cluster is None} == kept
        for sha, cluster in decisions.items():
            assert cluster is None or cluster in allowed[sha]


PROBE = """
import json, sys
from exforge.elixir.neardup import bucket_partition, text_band_keys
texts = json.load(sys.stdin)
keys = [text_band_keys(t) for t in texts]
print(json.dumps([keys, [[bucket_partition(k, 7) for k in ks] for ks in keys]]))
"""


def test_band_keys_and_their_partitions_are_the_same_in_other_processes() -> None:
    """Workers share buckets across processes: each band key and its owning partition
    must not depend on the process (Python salts `hash` per process with
    PYTHONHASHSEED)."""
    texts = [*families(2, 3).values(), "défaut école", ""]
    here = [
        [text_band_keys(t) for t in texts],
        [[bucket_partition(k, 7) for k in text_band_keys(t)] for t in texts],
    ]
    assert sum(map(len, here[0])) == 25 * (len(texts) - 1)
    for seed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        out = subprocess.run(
            [sys.executable, "-c", PROBE],
            input=json.dumps(texts),
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert json.loads(out) == here, f"PYTHONHASHSEED={seed}"
