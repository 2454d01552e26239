"""Token counts: `exforge.llm.chat.token_counter` against mistral-common's own encoding,
on every conversation the generators make of the real corpus and on edge cases."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from mistral_common.tokens.tokenizers.base import SpecialTokens
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from exforge.llm.chat import (
    SHIPPED_TEKKEN,
    TEKKEN_PATTERN,
    load_tokenizer,
    to_request,
    token_counter,
)
from streams.files import analysed_file
from streams.generators import generate
from tests.support.corpus import unpack
from tests.support.records import raw_package

Conversation = list[dict[str, Any]]
SYSTEM = {"from": "system", "value": "You write idiomatic Elixir.\n"}


def exact(tokenizer: MistralTokenizer, conversation: Sequence[dict[str, Any]]) -> int:
    return len(tokenizer.encode_chat_completion(to_request(conversation)).tokens)


@pytest.fixture(scope="module")
def conversations(tmp_path_factory: pytest.TempPathFactory) -> list[Conversation]:
    """Every candidate's conversation, of every kind, from every corpus library."""
    package = raw_package("dir:corpus@1", license="MIT", archive_key="k")
    made = [
        candidate.sample.sharegpt()["conversations"]
        for library in unpack(tmp_path_factory.mktemp("corpus"))
        for path in library.files
        if (file := analysed_file(package, str(path), path.read_text(errors="replace")))
        for candidate in generate(file, file.content or "")
    ]
    assert len(made) > 5_000
    return made


def variants(conversations: list[Conversation]) -> list[Conversation]:
    """Each conversation with a system turn, and two of them as one multi-turn
    conversation with and without a system turn (the system prompt's place differs
    between formats: the last user message, or a turn of its own)."""
    pairs = [a + b for a, b in pairwise(conversations)]
    return [
        *([SYSTEM, *c] for c in conversations),
        *pairs,
        *([SYSTEM, *c] for c in pairs),
    ]


def tekken_of_version(version: str, directory: Path) -> MistralTokenizer:
    """The shipped Tekken vocabulary in the instruct format of another version (from v11
    on a file must list its special tokens: the deprecated defaults, then the rest)."""
    data = json.loads(SHIPPED_TEKKEN.read_text())
    special = list(Tekkenizer.DEPRECATED_SPECIAL_TOKENS)
    known = {token["token_str"] for token in special}
    special += [
        {"rank": len(special) + i, "token_str": name, "is_control": True}
        for i, name in enumerate(t.value for t in SpecialTokens if t.value not in known)
    ]
    data["config"]["version"] = version
    data["special_tokens"] = special
    path = directory / f"tekken_{version}.json"
    path.write_text(json.dumps(data))
    tokenizer = load_tokenizer(str(path))
    assert tokenizer.instruct_tokenizer.tokenizer.version.value == version
    return tokenizer


def test_counts_equal_mistral_commons_on_every_corpus_conversation(
    conversations: list[Conversation],
) -> None:
    tokenizer = load_tokenizer()
    # the texts are counted by paragraphs, as this pattern allows
    assert tokenizer.instruct_tokenizer.tokenizer._model._pat_str == TEKKEN_PATTERN
    count = token_counter(tokenizer)
    every = conversations + variants(conversations[::5])
    counted = [count(c) for c in every]
    assert counted == [exact(tokenizer, c) for c in every]


@pytest.mark.parametrize("version", ["v7", "v11", "v13"])
def test_counts_equal_mistral_commons_in_the_formats_with_a_system_turn(
    version: str, conversations: list[Conversation], tmp_path: Path
) -> None:
    tokenizer = tekken_of_version(version, tmp_path)
    count = token_counter(tokenizer)
    some = conversations[::25] + variants(conversations[::25])
    assert [count(c) for c in some] == [exact(tokenizer, c) for c in some]


def outcome(count: Callable[[Conversation], int], conversation: Conversation) -> object:
    try:
        return count(conversation)
    except Exception as exc:  # the exact path's own error, to be raised alike
        return type(exc)


def turns(*pairs: tuple[str, Any]) -> Conversation:
    return [{"from": role, "value": value} for role, value in pairs]


TEXTS = [
    "",
    " ",
    "  \n",
    "ends in spaces   ",
    "[INST] x [/INST]",
    "</s><s>[SYSTEM_PROMPT]",
    '"[/INST]" <> "</s>"',
    "<unk>[TOOL_CALLS][AVAILABLE_TOOLS]",
    "naïve — 漢字 🙂 e\u0301",
    "lone \ud800 surrogate and a pair \ud83d\ude00",
    "crlf\r\n  line\r\n",
    "\n\n\n",
    # where paragraphs are cut, and where not: a newline that a match may run past
    "a)\n\n/path\n\n\n  \n\tdef x,\n\n  do: 1\n\n",
    "x  \n\n  \n  y\n\n\u00a0z\n\n\u2028w\n\n\x1cv\n\n",
    'end\n\n\n\n  @doc """\n\n  Text.\n\n  """\r\n\r\n  def f, do: 1\n\n# c\n\n)\n\n1',
]
EDGE = [
    *(turns(("human", t), ("gpt", "ok")) for t in TEXTS),
    *(turns(("human", "q"), ("gpt", t)) for t in TEXTS),
    *(turns(("system", t), ("human", "q"), ("gpt", "a")) for t in TEXTS),
    *(turns(("system", "s"), ("human", t), ("gpt", "a"), ("human", t), ("gpt", t)) for t in TEXTS),
    turns(("system", "only")),
    turns(("human", "no answer")),
    turns(("gpt", "answer first"), ("human", "q")),
    turns(("human", "q"), ("human", "q again"), ("gpt", "a")),
    turns(("human", "q"), ("gpt", "a"), ("gpt", "more")),
    turns(("human", "q"), ("system", "late"), ("gpt", "a")),
    turns(("system", "s"), ("system", "t"), ("human", "q"), ("gpt", "a")),
    turns(("human", "q"), ("gpt", 3)),
    turns(("human", "q"), ("tool", "a")),
    [{"from": "human", "value": "q"}, {"value": "a"}],
    [],
]


@pytest.mark.parametrize("version", ["v3", "v7"])
def test_edge_cases_count_or_fail_as_mistral_commons(version: str, tmp_path: Path) -> None:
    """Empty and blank texts, trailing spaces, special tokens' strings in the text (plain
    text to Tekken), unicode and surrogates, line endings, and shapes the fast count
    does not take (they go to mistral-common, and fail as it does)."""
    tokenizer = load_tokenizer() if version == "v3" else tekken_of_version(version, tmp_path)
    count = token_counter(tokenizer)
    for conversation in EDGE:
        expected = outcome(lambda c: exact(tokenizer, c), conversation)
        assert outcome(count, conversation) == expected, conversation


def test_texts_cut_into_paragraphs_count_as_whole_texts() -> None:
    """Random texts of the pieces that decide where a pre-tokenizer match ends (newlines,
    blank lines, spaces, tabs, other whitespace, "/", punctuation, letters, digits):
    counted by paragraphs, as mistral-common counts them whole."""
    pieces = ["\n", "\n\n", "\r\n", " ", "  ", "\t", "\u00a0", "\u2028", "/", "//", ")", "#"]
    pieces += ["end", "Def", "x1", "7", "é", "漢", "🙂", '"""', "[INST]", "</s>"]
    rng = random.Random(16)
    tokenizer = load_tokenizer()
    count = token_counter(tokenizer)
    for _ in range(2_000):
        text = "".join(rng.choices(pieces, k=rng.randint(1, 40)))
        conversation = turns(("human", text), ("gpt", f"{text}x"))
        assert count(conversation) == exact(tokenizer, conversation), text
