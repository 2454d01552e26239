"""The one decoding loop (`exforge.llm.generation`) on the tiny model of Devstral's
architecture: continuous batching changes nothing a request gets, greedy decoding matches
transformers' own `generate`, stop strings never leak, the prefix cache reuses whole
blocks, and sampling draws from the distribution it claims."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exforge.core.settings import load_settings
from exforge.llm.chat import text_tokenizer
from exforge.llm.generation import (
    INVERSION_BLOCK,
    DecodeOptions,
    Decoder,
    Request,
    Sampling,
    Step,
    TextStream,
    choose,
    complete,
    invert,
)
from exforge.llm.model import load_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    model = load_model("tiny", "none", tmp_path_factory.mktemp("models"), dtype=torch.float32)
    torch.manual_seed(7)  # random init is near-uniform: spread the logits so texts differ
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer() -> object:
    return text_tokenizer()


def prompts(tokenizer: object) -> list[list[int]]:
    texts = [f"defmodule Bench{i} do\n  def run(x), do: x + {i}" for i in range(5)]
    texts[2] += "\n  # a longer prompt, so the batch needs left padding\n  def more, do: :ok"
    return [tokenizer.encode(text, bos=True, eos=False) for text in texts]  # type: ignore[attr-defined]


def test_greedy_decoding_matches_transformers_generate(model: object, tokenizer: object) -> None:
    for ids in prompts(tokenizer)[:3]:
        expected = model.generate(  # type: ignore[attr-defined]
            torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None
        )[0, len(ids) :].tolist()
        done = complete(Decoder(model, tokenizer), [(ids, Sampling(max_tokens=10))])[0]
        assert done.text == tokenizer.decode(expected)  # type: ignore[attr-defined]
        assert (done.tokens, done.finish) == (10, "length")


def test_a_batch_changes_nothing_a_request_gets(model: object, tokenizer: object) -> None:
    samplings = [
        Sampling(max_tokens=12),
        Sampling(max_tokens=12, temperature=0.9, seed=1),
        Sampling(max_tokens=7, temperature=0.7, top_p=0.9, seed=2),
        Sampling(max_tokens=12, temperature=1.2, top_k=40, seed=3),
        Sampling(max_tokens=12, temperature=0.9, seed=1),
    ]
    work = list(zip(prompts(tokenizer), samplings, strict=True))
    alone = [complete(Decoder(model, tokenizer, max_batch=1), [item])[0] for item in work]
    together = complete(Decoder(model, tokenizer, max_batch=8), work)
    assert together == alone
    assert alone[1].text != alone[4].text  # other prompt, same seed: other text
    again = complete(Decoder(model, tokenizer), [work[1]])[0]
    assert again == alone[1]  # same seed, same text


def test_requests_join_the_running_batch(model: object, tokenizer: object) -> None:
    decoder = Decoder(model, tokenizer, max_batch=4)
    first, second = prompts(tokenizer)[:2]
    events: dict[str, list[Step]] = {"a": [], "b": []}
    decoder.submit(Request(first, Sampling(max_tokens=20), events["a"].append))
    for _ in range(5):
        decoder.step()
    decoder.submit(Request(second, Sampling(max_tokens=6), events["b"].append))
    decoder.step()
    assert len(decoder.rows) == 2  # b decodes beside a, which is still running
    assert len(events["a"]) == 6 and events["a"][-1].finish is None  # one token a step
    decoder.run()
    joined = ["".join(step.text for step in events[k]) for k in ("a", "b")]
    alone = [
        complete(Decoder(model, tokenizer), [(ids, Sampling(max_tokens=n))])[0].text
        for ids, n in ((first, 20), (second, 6))
    ]
    assert joined == alone
    assert events["b"][-1].finish == "length" and events["a"][-1].tokens == 20


def test_cancelled_requests_leave_the_batch(model: object, tokenizer: object) -> None:
    decoder = Decoder(model, tokenizer)
    steps: list[Step] = []
    cancel = {"now": False}
    decoder.submit(
        Request(prompts(tokenizer)[0], Sampling(max_tokens=50), steps.append, lambda: cancel["now"])
    )
    decoder.step()
    decoder.step()
    cancel["now"] = True
    decoder.run()
    assert steps[-1].finish == "cancelled" and steps[-1].tokens == 2  # one token a step
    assert not decoder.rows


def test_prefix_cache_reuses_whole_blocks(model: object, tokenizer: object) -> None:
    system = "You are an Elixir expert. Answer with idiomatic, tested code only. " * 3
    shared = tokenizer.encode(system, bos=True, eos=False)  # type: ignore[attr-defined]
    questions = [shared + tokenizer.encode(q, bos=False, eos=False) for q in ("Stack?", "Queue?")]  # type: ignore[attr-defined]
    cached = Decoder(model, tokenizer, block_tokens=16)
    seen: list[Request] = []
    for ids in questions:
        request = Request(ids, Sampling(max_tokens=6), lambda _: None)
        seen.append(request)
        cached.submit(request)
        cached.run()
    assert seen[0].cached_tokens == 0
    assert seen[1].cached_tokens == len(shared) // 16 * 16 > 0
    assert (cached.prefix.lookups, cached.prefix.hits) == (2, 1)
    uncached = Decoder(model, tokenizer, prefix_entries=0)
    work = [(ids, Sampling(max_tokens=6)) for ids in questions]
    with_cache = complete(Decoder(model, tokenizer, block_tokens=16), work)
    assert with_cache == complete(uncached, work)


def test_stop_strings_are_held_back_and_never_released() -> None:
    pieces = {1: "x = 1", 2: "\n", 3: "\n", 4: "y", 5: "\xe2\x82"}
    stream = TextStream(lambda ids: "".join(pieces[i] for i in ids), ["\n\nend", "\n\n"])
    assert stream.push(1) == "x = 1"
    assert stream.push(2) == ""  # may begin a stop string: held
    assert stream.push(3) == "" and stream.stopped
    other = TextStream(lambda ids: "".join(pieces[i] for i in ids), ["\n\n"])
    assert [other.push(t) for t in (1, 2, 4)] == ["x = 1", "", "\ny"]


def test_incomplete_characters_wait_for_their_last_byte(tokenizer: object) -> None:
    ids = tokenizer.encode("é🎉", bos=False, eos=False)  # type: ignore[attr-defined]
    stream = TextStream(tokenizer.decode, [])  # type: ignore[attr-defined]
    released = [stream.push(token) for token in ids]
    assert "".join(released) + stream.flush() == "é🎉"
    assert all("\ufffd" not in piece for piece in released)


def test_stop_ids_and_eos_end_a_request(model: object, tokenizer: object) -> None:
    ids = prompts(tokenizer)[0]
    free = complete(Decoder(model, tokenizer), [(ids, Sampling(max_tokens=8))])[0]
    third = tokenizer.encode(free.text, bos=False, eos=False)[2]  # type: ignore[attr-defined]
    stopped = complete(
        Decoder(model, tokenizer), [(ids, Sampling(max_tokens=8, stop_ids=(third,)))]
    )[0]
    assert stopped.finish == "stop" and stopped.tokens == 2
    assert free.text.startswith(stopped.text) and len(stopped.text) < len(free.text)


def test_sampling_draws_from_the_tempered_nucleus() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))

    def shares(sampling: Sampling) -> torch.Tensor:
        draws = [choose(logits, sampling, torch.Generator().manual_seed(s)) for s in range(8000)]
        return torch.bincount(torch.tensor(draws), minlength=4) / len(draws)

    plain = shares(Sampling(temperature=1.0))
    assert torch.allclose(plain, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.02)
    nucleus = shares(Sampling(temperature=1.0, top_p=0.75))
    assert nucleus[2:].sum() == 0 and abs(float(nucleus[0]) - 0.625) < 0.02
    top2 = shares(Sampling(temperature=1.0, top_k=2))
    assert top2[2:].sum() == 0 and abs(float(top2[0]) - 0.625) < 0.02
    assert choose(logits, Sampling(temperature=0.0), torch.Generator()) == 0


def test_two_level_inversion_picks_the_token_one_cumulative_sum_picks() -> None:
    generator = torch.Generator().manual_seed(0)
    for vocab in (7, INVERSION_BLOCK, 5 * INVERSION_BLOCK + 17):
        weights = torch.softmax(torch.randn(16, vocab, generator=generator) * 2, dim=-1)
        weights[:, ::3] = 0  # tokens top-k or top-p removed
        draws = torch.cat([torch.rand(14, generator=generator), torch.tensor([0.0, 1 - 2**-24])])
        cumulative = torch.cumsum(weights.double(), dim=-1)
        targets = draws.double()[:, None] * cumulative[:, -1:]
        expected = torch.searchsorted(cumulative, targets, right=True)[:, 0]
        chosen = invert(weights, draws)
        assert chosen.tolist() == expected.tolist()
        assert bool((weights[torch.arange(16), chosen] > 0).all())


def test_non_finite_logits_fail_the_request() -> None:
    with pytest.raises(FloatingPointError):
        choose(torch.tensor([0.1, float("nan")]), Sampling(), torch.Generator())


def test_a_receiver_that_fails_leaves_the_batch_and_the_others_go_on(
    model: object, tokenizer: object
) -> None:
    decoder = Decoder(model, tokenizer)
    first, second = prompts(tokenizer)[:2]
    steps: list[Step] = []

    def gone(_event: object) -> None:
        raise ConnectionError("the client went away")

    decoder.submit(Request(first, Sampling(max_tokens=5), gone))
    decoder.submit(Request(second, Sampling(max_tokens=5), steps.append))
    decoder.run()
    assert steps[-1].finish == "length" and steps[-1].tokens == 5
    assert not decoder.rows


@pytest.mark.parametrize(
    "options",
    [
        DecodeOptions(static_cache=True, cache_block=4),  # buffers refilled as they fill up
        DecodeOptions(attention="math"),
        DecodeOptions(compile=True, static_cache=True),
    ],
    ids=["static-cache", "math-attention", "compiled"],
)
def test_decode_options_change_no_text(
    model: object, tokenizer: object, options: DecodeOptions
) -> None:
    """Requests joining and leaving mid-run (the static buffers rebuilt each time) decode
    exactly what the default loop decodes."""
    samplings = [Sampling(max_tokens=n, temperature=0.8, seed=n) for n in (9, 4, 12, 6, 3)]
    work = list(zip(prompts(tokenizer), samplings, strict=True))
    expected = complete(Decoder(model, tokenizer, max_batch=3), work)
    assert complete(Decoder(model, tokenizer, max_batch=3, options=options), work) == expected


def test_decode_settings_choose_the_options(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, decode_attention="math", decode_static_cache=True)
    chosen = DecodeOptions.from_settings(settings)
    assert chosen == DecodeOptions(attention="math", static_cache=True)
    assert DecodeOptions(**chosen.as_dict()) == chosen  # what an exported version reads back
