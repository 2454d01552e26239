"""The gateway's input limits (body bytes, JSON nesting, chat messages, prompt tokens: each
a 400 naming its setting) on the real app, and the output redaction of generated text,
including a secret split across tokens and a private-key block."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from exforge.core.db import engine_for
from exforge.core.settings import load_settings
from serving.app import create_app
from serving.gateway import End, Gateway, Start, Token, redacted_events
from serving.guard import OutputRedactor, json_depth
from serving.keys import create_key

AWS_KEY = "AKIAIOSFODNN7EXAMPLF"


def test_json_depth_counts_brackets_outside_strings() -> None:
    assert json_depth(b'{"a": [1, {"b": "[[[{{{"}]}') == 3
    assert json_depth(b'"\\"[" ') == 0
    assert json_depth(b"[" * 500 + b"]" * 500) == 500


def test_redaction_catches_secrets_split_across_tokens() -> None:
    redactor = OutputRedactor()
    deltas = [
        'config :app,\n  aws_key: "AKIA',
        "IOSFODNN7",
        'EXAMPLF",\n  mail: "ops@',
        'acme-corp.io",\n  password: "Zq8v',
        "Lm2pXr7TnK4w",
        '9c",\n',
    ]
    out = [redactor.feed(d) for d in deltas]
    out.append(redactor.finish())
    assert out[:2] == ["config :app,\n  aws_key: ", ""], "up to the last whitespace, at once"
    assert out[2] == '"<KEY>",\n  mail: '
    assert out[3] == '"<EMAIL>",\n', "a line naming a password is held until it ends"
    assert out[4] == "" and out[5] == '  password: "<KEY>",\n'
    assert redactor.counts == {"key": 2, "email": 1}


def test_clean_text_passes_unchanged_and_a_key_block_is_held_to_its_end() -> None:
    redactor = OutputRedactor()
    code = "defmodule Stack do\n  def push(s, x), do: [x | s]\nend\n"
    assert "".join([redactor.feed(code[:7]), redactor.feed(code[7:]), redactor.finish()]) == code
    block = [
        'pem = """\n-----BEGIN RSA PRIVATE KEY-----\n',
        "MIIEowIBAAKCAQEA7yn3bRHQ5FHMQ\n",
        '-----END RSA PRIVATE KEY-----\n"""\n',
    ]
    held = [redactor.feed(part) for part in block]
    assert held[1] == "", "nothing of an unfinished key block goes out"
    assert "MIIEowIBAAKCAQEA" not in "".join(held) and "<KEY>" in "".join(held)


def test_redacted_events_flush_before_the_end() -> None:
    async def events() -> AsyncIterator[Start | Token | End]:
        yield Start(1)
        for text in ('token = "', AWS_KEY, '"'):
            yield Token(text)
        yield End(1, 3, 3, 0, "stop", False)

    async def run() -> list[Start | Token | End]:
        return [event async for event in redacted_events(events())]

    start, token, end = asyncio.run(run())
    assert isinstance(start, Start) and isinstance(end, End)
    assert token == Token('token = "<KEY>"')


@pytest.fixture
def client(tmp_path: Path) -> tuple[httpx.AsyncClient, str]:
    settings = load_settings(
        data_dir=tmp_path,
        gateway_max_body_bytes=4096,
        gateway_max_json_depth=8,
        gateway_max_messages=4,
        gateway_max_prompt_tokens=16,
    )
    engine = engine_for(f"sqlite:///{tmp_path / 'exforge.db'}")
    gateway = Gateway(settings, engine, urls=["127.0.0.1:1"])  # never reached: refused first
    _, secret = create_key(engine, "tests", ["generate"])
    transport = httpx.ASGITransport(app=create_app(gateway))
    return httpx.AsyncClient(transport=transport, base_url="http://gateway"), secret


def post(client: tuple[httpx.AsyncClient, str], path: str, body: bytes) -> httpx.Response:
    http, secret = client

    async def send() -> httpx.Response:
        async with http:
            return await http.post(
                path,
                content=body,
                headers={"authorization": f"Bearer {secret}", "content-type": "application/json"},
            )

    return asyncio.run(send())


@pytest.mark.parametrize(
    ("path", "body", "setting"),
    [
        (
            "/v1/completions",
            json.dumps({"model": "m", "prompt": "x" * 5000}).encode(),
            "MAX_BODY_BYTES",
        ),
        (
            "/v1/completions",
            b'{"model": "m", "prompt": "x", "user": ' + b"[" * 20 + b"]" * 20 + b"}",
            "MAX_JSON_DEPTH",
        ),
        (
            "/v1/chat/completions",
            json.dumps(
                {"model": "m", "messages": [{"role": "user", "content": "hi"}] * 5}
            ).encode(),
            "MAX_MESSAGES",
        ),
        (
            "/v1/completions",
            json.dumps({"model": "m", "prompt": "defmodule Stack do " * 20}).encode(),
            "MAX_PROMPT_TOKENS",
        ),
    ],
)
def test_requests_over_a_limit_get_a_400_naming_it(
    client: tuple[httpx.AsyncClient, str], path: str, body: bytes, setting: str
) -> None:
    response = post(client, path, body)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert f"EXFORGE_GATEWAY_{setting}" in message and "the limit is" in message


def test_a_request_within_the_limits_gets_past_them(client: tuple[httpx.AsyncClient, str]) -> None:
    response = post(
        client, "/v1/completions", json.dumps({"model": "m", "prompt": "defmodule"}).encode()
    )
    assert response.status_code != 400, response.text  # it goes on to routing (no such model)
