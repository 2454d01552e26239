"""Token counts with Devstral's Tekken tokenizer (mistral-common), exactly as the
trainer encodes a conversation: the model directory's `tekken.json` when configured,
else the Tekken file mistral-common ships."""

from __future__ import annotations

from pathlib import Path

from exforge.llm import chat
from exforge.llm.chat import load_tokenizer
from schemas.sharegpt import TokenCounter

__all__ = ["TokenCounter", "token_counter"]


def token_counter(tokenizer_path: Path | None = None) -> TokenCounter:
    return chat.token_counter(load_tokenizer(str(tokenizer_path) if tokenizer_path else None))
