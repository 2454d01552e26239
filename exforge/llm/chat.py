"""Chat encoding with mistral-common's Tekken tokenizer and instruct format.

The token ids are exactly what `MistralTokenizer.encode_chat_completion` produces (the
format Devstral was trained with); only assistant tokens (and their end of sequence)
carry a label, so the model learns to answer, not to predict prompts.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Any

import mistral_common
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy, TokenizerVersion
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from schemas.sharegpt import TokenCounter

IGNORE = -100
SHIPPED_TEKKEN = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
ROLES = {"system": SystemMessage, "human": UserMessage, "gpt": AssistantMessage}


@dataclass(frozen=True)
class Encoded:
    """One conversation: token ids and per-token labels (IGNORE outside answers)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


@cache
def load_tokenizer(path: str | None = None, generation: bool = False) -> MistralTokenizer:
    """A model directory's own `tekken.json` when given, else the one mistral-common ships.

    Training validates conversations as fine-tuning data (ending in an answer);
    `generation=True` validates prompts (ending in a user turn) instead.
    """
    file = Path(path) if path else SHIPPED_TEKKEN
    if file.is_dir():
        file = file / "tekken.json"
    mode = ValidationMode.test if generation else ValidationMode.finetuning
    return MistralTokenizer.from_file(str(file), mode=mode)


def counting_tokenizer(tokenizer: MistralTokenizer) -> MistralTokenizer:
    """A copy of `tokenizer` whose encodings hold the same token ids but no decoded text.

    mistral-common decodes every encoding back to text (its `Tokenized.text`), which
    costs as much as encoding; counting tokens needs the ids only. Tekken also shifts
    every id by `num_special_tokens`, a property it computes again for each token (half
    of the encoding's time); the copy's Tekkenizer holds that number instead. The copy
    shares the vocabulary; `tokenizer` itself is unchanged. (`copy.copy` of the
    MistralTokenizer itself would load its file again: its pickling recipe, which copy
    follows, is `from_file`.)"""
    instruct = copy.copy(tokenizer.instruct_tokenizer)
    instruct.decode = lambda tokens, special_token_policy=None: ""  # type: ignore[method-assign]
    tekken = copy.copy(instruct.tokenizer)
    fixed = {"num_special_tokens": tekken.num_special_tokens}
    tekken.__class__ = type(type(tekken).__name__, (type(tekken),), fixed)
    instruct.tokenizer = tekken
    counting = object.__new__(type(tokenizer))
    counting.__dict__.update(vars(tokenizer), instruct_tokenizer=instruct)
    return counting


# The Tekken instruct formats `token_counter` counts from the turns' texts, each mapped
# to where it puts the system prompt: its own turn, [SYSTEM_PROMPT] text [/SYSTEM_PROMPT]
# after BOS (True: `InstructTokenizerV7.encode_system_message`), or in front of the last
# user message's text, "\n\n" between (False: `InstructTokenizerV1.encode_user_content`,
# which v3 inherits). v15 adds model settings to the format: not counted here.
_SYSTEM_TURN = {
    TokenizerVersion.v3: False,
    TokenizerVersion.v7: True,
    TokenizerVersion.v11: True,
    TokenizerVersion.v13: True,
}
# The pre-tokenizer pattern of every Tekken file mistral-common ships. Tiktoken encodes
# each of its matches on its own, so a text's count is the sum of its pieces' counts when
# it is cut where a match always ends: after a newline whose next line starts, after any
# spaces or tabs, with neither whitespace nor "/". No match runs on past such a newline:
# `\s*[\r\n]+` stops at the last newline of its whitespace run (there is no other), the
# punctuation alternative takes only [\r\n/] after its newlines, the others take no
# newline, and the pattern looks at nothing before where a match starts. `token_counter`
# cuts only after a blank line ("\n\n") and keeps each paragraph's count: one file's
# candidates share most of its paragraphs, and cutting every line costs more in Python
# than its extra reuse saves.
TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PARAGRAPH_END = re.compile(r"\n\n(?=[ \t]*[^\s/])")
_PARAGRAPHS_KEPT = 1024  # far more than one file's candidates share


def token_counter(tokenizer: MistralTokenizer) -> TokenCounter:
    """`len(tokenizer.encode_chat_completion(to_request(conversations)).tokens)`, cheaply.

    Building, validating and normalising mistral-common's request costs more than
    encoding its text. A conversation of plain turns, as a fine-tuning tokenizer takes
    it (an optional system turn, then human/gpt turns alternating, ending in gpt, none
    empty), in a format of `_SYSTEM_TURN`, is counted from its texts alone, each encoded
    as the instruct tokenizer encodes it, plus the format's control tokens: BOS, then
    [INST] text [/INST] per user message and text </s> per answer (trailing spaces
    stripped: `InstructTokenizerV2._encode_normal_content_assistant_message`), with the
    system prompt where the format puts it. Any other conversation or tokenizer goes
    through mistral-common itself (and raises what it raises)."""
    counting = counting_tokenizer(tokenizer)

    def exact(conversations: Sequence[dict[str, Any]]) -> int:
        return len(counting.encode_chat_completion(to_request(conversations)).tokens)

    tekken = tokenizer.instruct_tokenizer.tokenizer
    if tokenizer.mode is not ValidationMode.finetuning or not isinstance(tekken, Tekkenizer):
        return exact
    system_turn = _SYSTEM_TURN.get(tekken.version)
    if system_turn is None:
        return exact
    model = tekken._model  # what `Tekkenizer.encode` calls, before shifting the ids
    # Tekken's tiktoken model holds no special tokens (Tekken adds its own), so its
    # `encode` gives what `encode_ordinary` gives, after a scan for special tokens at
    # every character that took 40 % of the encoding's time.
    encode = model.encode if model.special_tokens_set else model.encode_ordinary
    encoded_length = (
        _paragraph_counter(encode)
        if model._pat_str == TEKKEN_PATTERN
        else lambda text: len(encode(text))
    )

    def count(conversations: Sequence[dict[str, Any]]) -> int:
        turns = _plain_turns(conversations)
        if turns is None:
            return exact(conversations)
        system, users, answers = turns
        tokens = 1 + 3 * len(answers)  # BOS; [INST], [/INST] and </s> per exchange
        if system is not None and system_turn:
            tokens += 2 + encoded_length(system)
        elif system is not None:
            users[-1] = f"{system}\n\n{users[-1]}"
        tokens += sum(map(encoded_length, users))
        return tokens + sum(encoded_length(text.rstrip(" ")) for text in answers)

    return count


def _paragraph_counter(encode: Callable[[str], list[int]]) -> Callable[[str], int]:
    """The number of tokens `encode` (a tiktoken encoding's) makes of a text, as the sum
    over its paragraphs (see `TEKKEN_PATTERN`), each counted once while it is among the
    last ones seen."""

    @lru_cache(maxsize=_PARAGRAPHS_KEPT)
    def counted(paragraph: str) -> int:
        return len(encode(paragraph))

    def encoded_length(text: str) -> int:
        cuts = [0, *(m.end() for m in _PARAGRAPH_END.finditer(text)), len(text)]
        return sum(counted(text[start:end]) for start, end in pairwise(cuts))

    return encoded_length


def _plain_turns(
    conversations: Sequence[dict[str, Any]],
) -> tuple[str | None, list[str], list[str]] | None:
    """The system prompt (or None), user messages and answers of a conversation of
    non-empty texts: an optional system turn, then human/gpt alternating, ending in gpt;
    None for any other."""
    try:
        roles = [turn["from"] for turn in conversations]
        values = [turn["value"] for turn in conversations]
    except (KeyError, TypeError):
        return None
    start = 1 if roles[:1] == ["system"] else 0
    users, answers = values[start::2], values[start + 1 :: 2]
    if (
        not answers
        or len(users) != len(answers)
        or any(role != "human" for role in roles[start::2])
        or any(role != "gpt" for role in roles[start + 1 :: 2])
        or not all(isinstance(value, str) and value for value in values)
    ):
        return None
    return (values[0] if start else None), users, answers


def text_tokenizer(model_dir: Path | None = None) -> Any:  # mistral-common's Tekkenizer
    """The plain-text tokenizer (encode/decode of raw text) of a model directory: its own
    `tekken.json` when it has one, else the one mistral-common ships."""
    own = model_dir / "tekken.json" if model_dir else None
    path = str(own) if own and own.is_file() else None
    return load_tokenizer(path, generation=True).instruct_tokenizer.tokenizer


def to_request(conversations: Sequence[dict[str, Any]]) -> ChatCompletionRequest:
    """ShareGPT turns (`{"from", "value"}`) as a mistral-common chat request."""
    return ChatCompletionRequest(
        messages=[ROLES[turn["from"]](content=turn["value"]) for turn in conversations]
    )


def encode(tokenizer: MistralTokenizer, conversations: Sequence[dict[str, Any]]) -> Encoded:
    """Encode a conversation; label exactly the tokens of each assistant message.

    Assistant messages are encoded alone with the same instruct tokenizer and located, in
    order, in the full encoding, so the labels follow the format's own rules (the system
    prompt moves to the last user turn in this format, which breaks prefix-based masks).
    """
    request = to_request(conversations)
    tokens = tokenizer.encode_chat_completion(request).tokens
    instruct = tokenizer.instruct_tokenizer
    messages = request.messages
    last_user = max(i for i, m in enumerate(messages) if isinstance(m, UserMessage))
    labels = [IGNORE] * len(tokens)
    cursor = 0
    for index, message in enumerate(messages):
        if not isinstance(message, AssistantMessage):
            continue
        span = instruct.encode_assistant_message(message, index < last_user)
        start = _find(tokens, span, cursor)
        labels[start : start + len(span)] = span
        cursor = start + len(span)
    return Encoded(tokens, labels)


def _find(haystack: list[int], needle: list[int], start: int) -> int:
    for position in range(start, len(haystack) - len(needle) + 1):
        if haystack[position : position + len(needle)] == needle:
            return position
    raise ValueError("assistant message not found in the encoded conversation")


def prompt_ids(conversations: Sequence[dict[str, Any]], path: str | None = None) -> list[int]:
    """Token ids of a conversation ending in a user turn, ready for generation."""
    return (
        load_tokenizer(path, generation=True)
        .encode_chat_completion(to_request(conversations))
        .tokens
    )


# ------------------------------------------------------------- prompts as Triton text
# Triton's LLM request carries the prompt as text (`text_input`), as TensorRT-LLM's
# ensemble does, whose preprocessing tokenises it with the model's Hugging Face tokenizer
# (control tokens written in the text become control tokens, BOS is added). The same
# rule here makes any prompt's ids, a chat's included, travel exactly: `prompt_text` writes
# them and `text_ids` reads them back.


def prompt_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """Prompt ids as `text_input`: control tokens as their strings, without the BOS."""
    body = list(ids[1:] if ids and ids[0] == tokenizer.bos_id else ids)
    return tokenizer.decode(body, special_token_policy=SpecialTokenPolicy.KEEP)


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """`text_input` as prompt ids: BOS, then each control-token string as its id and the
    text between them encoded as plain text."""
    pattern, ids_of = _control_tokens(tokenizer)
    ids = [tokenizer.bos_id]
    start = 0
    for match in pattern.finditer(text):
        ids += tokenizer.encode(text[start : match.start()], bos=False, eos=False)
        ids.append(ids_of[match.group()])
        start = match.end()
    return ids + tokenizer.encode(text[start:], bos=False, eos=False)


_CONTROL: dict[int, tuple[re.Pattern[str], dict[str, int]]] = {}


def _control_tokens(tokenizer: Any) -> tuple[re.Pattern[str], dict[str, int]]:
    """A pattern matching every control-token string, and their ids (once per tokenizer)."""
    if id(tokenizer) not in _CONTROL:
        ids_of = {tokenizer.id_to_piece(i): i for i in range(tokenizer.num_special_tokens)}
        names = sorted(ids_of, key=len, reverse=True)
        _CONTROL[id(tokenizer)] = (re.compile("|".join(map(re.escape, names))), ids_of)
    return _CONTROL[id(tokenizer)]
