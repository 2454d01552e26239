"""The gateway as OpenAI's official Python client sees it (sync, async, streaming), in
front of a real Triton: stream shapes, request fields, error bodies and statuses, the
models list and cached prompt tokens; and the model contract: the prompt ids Triton
decodes for a chat are the trainer's ids, and one seed gives one text through the
evaluator and through Triton."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import torch

from exforge.llm.chat import IGNORE, encode, load_tokenizer, text_tokenizer
from exforge.llm.generation import Decoder, Sampling, complete
from exforge.llm.model import load_model
from exforge.llm.registry import get_version
from serving import rollout
from serving.app import ChatBody
from serving.contract import LlmRequest
from serving.keys import create_key
from tests.support.serving import MODEL, SLOW, RunningGateway, Served, run_gateway, stable_version
from tests.test_serving_e2e import grpc_stream
from workers.evaluator.generate import InProcessGenerator, Request
from workers.evaluator.generate import Sampling as EvalSampling

SYSTEM = "You are an Elixir expert."
CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Write a GenServer that counts."}],
    [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "defmodule Stack do\n  # push/pop?\nend"},
        {"role": "assistant", "content": "defmodule Stack do\n  def push(s, x), do: [x | s]\nend"},
        {"role": "user", "content": [{"type": "text", "text": "Now pop, with ünïcödé 🎉."}]},
    ],
    [
        {"role": "developer", "content": "Answer briefly.\n\n"},
        {"role": "user", "content": "  leading spaces and a [bracket]\t"},
    ],
]
SHAREGPT = {"system": "system", "developer": "system", "user": "human", "assistant": "gpt"}

# The first test to use the shared servers waits for two tritonservers to load five
# model versions (minutes on a busy 2-core machine).
pytestmark = pytest.mark.timeout(900)


def trainer_prompt_ids(messages: list[dict[str, Any]]) -> list[int]:
    """The ids the trainer encodes for this conversation, up to its assistant answer."""
    turns = [
        {
            "from": SHAREGPT[m["role"]],
            "value": m["content"] if isinstance(m["content"], str) else m["content"][0]["text"],
        }
        for m in messages
    ]
    encoded = encode(load_tokenizer(), [*turns, {"from": "gpt", "value": "done"}])
    answer_starts = len(encoded.labels)  # the final answer: the labelled run at the end
    while encoded.labels[answer_starts - 1] != IGNORE:
        answer_starts -= 1
    return encoded.input_ids[:answer_starts]


@pytest.fixture(scope="module")
def gateway(served: Served) -> Iterator[RunningGateway]:
    rollout.promote(served.engine, MODEL, 1)
    with run_gateway(served.settings, served.engine, [served.a.grpc_url]) as gw:
        gw.refresh()
        yield gw


@pytest.fixture(scope="module")
def client(gateway: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=gateway.key, max_retries=0)


def test_chat_prompt_ids_equal_the_trainers(served: Served) -> None:
    from exforge.llm.chat import text_ids

    tokenizer = text_tokenizer()
    for messages in CONVERSATIONS:
        text = ChatBody(model=MODEL, messages=messages).text()  # what the gateway sends
        assert text_ids(tokenizer, text) == trainer_prompt_ids(messages)  # what Triton decodes


def test_chat_through_triton_answers_the_trainers_prompt(
    served: Served, client: openai.OpenAI
) -> None:
    model_dir = served.settings.root / "triton" / "cpu" / MODEL / "1" / "model"
    model = load_model(str(model_dir), "none", dtype=torch.float32)
    decoder = Decoder(model, text_tokenizer())
    for messages in CONVERSATIONS:
        ids = trainer_prompt_ids(messages)
        expected = complete(decoder, [(ids, Sampling(max_tokens=8))])[0].text
        answer = client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_completion_tokens=8,
            temperature=0,  # type: ignore[arg-type]
        )
        assert answer.choices[0].message.content == expected
        assert answer.usage is not None and answer.usage.prompt_tokens == len(ids)


def test_same_seed_same_text_through_the_evaluator_and_triton(served: Served) -> None:
    row = get_version(served.engine, MODEL, 1)
    assert row is not None
    evaluator = InProcessGenerator.for_version(served.settings, served.store, row)
    prompt = "defmodule Counter do\n  use GenServer\n"
    sampling = EvalSampling(temperature=0.8, max_tokens=12, top_p=0.95)
    for seed in (11, 12):
        local = evaluator.complete([Request(prompt, (), seed)], sampling)[0]
        request = LlmRequest(prompt, 12, 0.8, 0.95, seed=seed)
        remote = "".join(
            str(r["text_output"]) for _, r in grpc_stream(served.a.grpc_url, 1, request)
        )
        assert local == remote
    assert evaluator.complete([Request(prompt, (), 11)], sampling) != evaluator.complete(
        [Request(prompt, (), 12)], sampling
    )


def test_streamed_chat_role_content_finish_and_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=CONVERSATIONS[1],  # type: ignore[arg-type]
        max_completion_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks[1:] if c.choices and c.choices[0].delta.content is not None]
    assert len(content) == 6
    last_choice = [c for c in chunks if c.choices][-1]
    assert last_choice.choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == len(trainer_prompt_ids(CONVERSATIONS[1]))
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(
        client.chat.completions.create(
            model=MODEL,
            messages=CONVERSATIONS[0],
            max_tokens=3,
            stream=True,  # type: ignore[arg-type]
        )
    )
    assert plain[-1].choices[0].finish_reason == "length" and plain[-1].usage is None


def test_async_client_request_fields(gateway: RunningGateway) -> None:
    async def run() -> dict[str, Any]:
        client = openai.AsyncOpenAI(
            base_url=f"{gateway.url}/v1", api_key=gateway.key, max_retries=0
        )
        user = [{"role": "user", "content": "Write Elixir."}]
        ask = client.chat.completions.create
        results = await asyncio.gather(
            ask(model=MODEL, messages=user, max_tokens=10, temperature=0.9, seed=5, user="u1"),
            ask(model=MODEL, messages=user, max_tokens=10, temperature=0.9, seed=5),
            ask(model=MODEL, messages=user, max_tokens=10, temperature=0.9, seed=6),
            ask(
                model=MODEL,
                messages=[{"role": "user", "content": [{"type": "text", "text": "Write Elixir."}]}],
                max_tokens=10,
                temperature=0.9,
                seed=5,
                extra_body={"unknown_field": {"ignored": True}},
            ),
            ask(
                model=MODEL,
                messages=[{"role": "system", "content": "S."}, *user],
                max_tokens=4,
                temperature=0,
            ),
            ask(
                model=MODEL,
                messages=[{"role": "developer", "content": "S."}, *user],
                max_tokens=4,
                temperature=0,
            ),
        )
        free = await client.completions.create(
            model=MODEL, prompt="defmodule A do", max_tokens=12, temperature=0
        )
        cut = free.choices[0].text[3:6]
        stopped = await client.completions.create(
            model=MODEL, prompt="defmodule A do", max_tokens=12, temperature=0, stop=cut
        )
        listed = await client.completions.create(
            model=MODEL, prompt="defmodule A do", max_tokens=12, temperature=0, stop=["\u2603", cut]
        )
        with pytest.raises(openai.BadRequestError) as too_many:
            await ask(model=MODEL, messages=user, n=2)
        await client.close()
        return {
            "texts": [r.choices[0].message.content for r in results],
            "free": free.choices[0].text,
            "cut": cut,
            "stopped": stopped.choices[0],
            "listed": listed.choices[0].text,
            "n_error": too_many.value.body,
        }

    out = asyncio.run(run())
    texts = out["texts"]
    assert texts[0] == texts[1] == texts[3]  # same seed; string or parts; unknown field ignored
    assert texts[2] != texts[0]  # another seed
    assert texts[4] == texts[5]  # developer is the system role
    assert out["stopped"].text == out["free"][: out["free"].index(out["cut"])]
    assert out["stopped"].finish_reason == "stop" and out["listed"] == out["stopped"].text
    assert out["n_error"]["param"] == "n"


def test_errors_have_openai_bodies_and_statuses(
    served: Served, gateway: RunningGateway, client: openai.OpenAI
) -> None:
    def body_of(error: pytest.ExceptionInfo[openai.APIStatusError]) -> dict[str, Any]:
        assert isinstance(error.value.body, dict)
        assert set(error.value.body) == {"message", "type", "param", "code"}
        return error.value.body

    with pytest.raises(openai.BadRequestError) as empty:
        client.chat.completions.create(model=MODEL, messages=[])
    assert body_of(empty)["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as bad_role:
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])  # type: ignore[list-item]
    assert body_of(bad_role)["param"] == "messages[0].role"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="no-such-model", messages=CONVERSATIONS[0])  # type: ignore[arg-type]
    assert body_of(unknown)["code"] == "model_not_found"
    wrong = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="exf_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as unauthorised:
        wrong.models.list()
    assert body_of(unauthorised)["code"] == "invalid_api_key"
    _, reader = create_key(served.engine, "reader", ["models"])
    reading = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=reader, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as forbidden:
        reading.completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert body_of(forbidden)["type"] == "permission_error"
    _, slow = create_key(served.engine, "slow", ["generate"], rate_per_s=0.01, burst=1)
    limited = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=slow, max_retries=0)
    limited.completions.create(model=MODEL, prompt="x", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as too_fast:
        limited.completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert int(too_fast.value.response.headers["retry-after"]) >= 1
    assert body_of(too_fast)["code"] == "rate_limit_exceeded"


def test_mid_stream_errors_arrive_as_sse_error_events(served: Served) -> None:
    settings = served.settings.model_copy(update={"gateway_deadline_s": 1.0})
    with (
        run_gateway(settings, served.engine, [served.a.grpc_url]) as gw,
        stable_version(served, gw, SLOW),
    ):
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0)
        received = []
        with pytest.raises(openai.APIError) as failed:
            for chunk in client.chat.completions.create(
                model=MODEL,
                messages=CONVERSATIONS[0],
                max_tokens=60,
                stream=True,  # type: ignore[arg-type]
            ):
                received.append(chunk)
        with pytest.raises(openai.APIStatusError) as whole:
            client.chat.completions.create(model=MODEL, messages=CONVERSATIONS[0], max_tokens=60)  # type: ignore[arg-type]
    assert received and received[0].choices[0].delta.role == "assistant"
    assert "deadline" in failed.value.message
    assert whole.value.status_code == 504


def test_models_list_and_cached_prompt_tokens(
    gateway: RunningGateway, client: openai.OpenAI
) -> None:
    gateway.refresh()  # version 1 serves again, after the tests that promoted another
    models = client.models.list().data
    entry = next(m for m in models if m.id == MODEL)
    assert entry.object == "model" and entry.owned_by == "exforge" and entry.created > 0
    system = f"Session {uuid.uuid4().hex}. " + "Answer in idiomatic Elixir with tests. " * 12
    usage = [
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": q}],
            max_tokens=2,
            temperature=0,
        ).usage
        for q in ("Stack?", "Queue?")
    ]
    assert usage[0] is not None and usage[1] is not None
    first = usage[0].prompt_tokens_details
    second = usage[1].prompt_tokens_details
    assert first is not None and first.cached_tokens == 0
    assert second is not None and second.cached_tokens > 0 and second.cached_tokens % 32 == 0
    assert second.cached_tokens <= usage[1].prompt_tokens - 1
