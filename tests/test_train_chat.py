"""Chat encoding: mistral-common's own token ids, labels on assistant tokens only."""

from __future__ import annotations

from pathlib import Path

from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest

from exforge.llm.chat import IGNORE, counting_tokenizer, encode, load_tokenizer, to_request

REPO = Path(__file__).resolve().parent.parent
CONVERSATION = [
    {"from": "system", "value": "You write idiomatic Elixir."},
    {"from": "human", "value": "Sum a list."},
    {"from": "gpt", "value": "Enum.sum(list)"},
    {"from": "human", "value": "Now with reduce."},
    {"from": "gpt", "value": "Enum.reduce(list, 0, &+/2)"},
]


def test_ids_match_encode_chat_completion_and_only_answers_are_labelled() -> None:
    tokenizer = load_tokenizer()
    expected = tokenizer.encode_chat_completion(
        ChatCompletionRequest(
            messages=[
                SystemMessage(content="You write idiomatic Elixir."),
                UserMessage(content="Sum a list."),
                AssistantMessage(content="Enum.sum(list)"),
                UserMessage(content="Now with reduce."),
                AssistantMessage(content="Enum.reduce(list, 0, &+/2)"),
            ]
        )
    ).tokens
    encoded = encode(tokenizer, CONVERSATION)
    assert encoded.input_ids == expected
    labelled = [t for t in encoded.labels if t != IGNORE]
    eos = tokenizer.instruct_tokenizer.tokenizer.eos_id
    assert labelled.count(eos) == 2  # each answer ends with </s>, which is trained
    text = tokenizer.decode([t for t in labelled if t != eos])
    assert text == "Enum.sum(list)Enum.reduce(list, 0, &+/2)"
    assert all(
        label in (IGNORE, token)
        for label, token in zip(encoded.labels, encoded.input_ids, strict=True)
    )


def test_the_counting_tokenizer_gives_the_same_ids_and_leaves_the_tokenizer_alone() -> None:
    tokenizer = load_tokenizer()
    counting = counting_tokenizer(tokenizer)
    elixir = (REPO / "examples" / "corpus").rglob("*.ex")
    real = [
        [{"from": "human", "value": f"Write `{p.name}`."}, {"from": "gpt", "value": p.read_text()}]
        for p in sorted(elixir)
    ]
    for conversation in [CONVERSATION, *real]:
        request = to_request(conversation)
        full = tokenizer.encode_chat_completion(request)
        assert counting.encode_chat_completion(request).tokens == full.tokens
        assert full.text  # the original still decodes its encodings
