"""Token counts with Devstral's Tekken tokenizer (mistral-common), exactly as the
trainer encodes a conversation: the model directory's `tekken.json` when configured,
else the Tekken file mistral-common ships."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from exforge.llm.chat import counting_tokenizer, load_tokenizer, to_request

TokenCounter = Callable[[Sequence[dict[str, Any]]], int]


def token_counter(tokenizer_path: Path | None = None) -> TokenCounter:
    tokenizer = counting_tokenizer(load_tokenizer(str(tokenizer_path) if tokenizer_path else None))

    def count(conversations: Sequence[dict[str, Any]]) -> int:
        return len(tokenizer.encode_chat_completion(to_request(conversations)).tokens)

    return count
