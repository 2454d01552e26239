"""The one decoding loop: continuous batching over a transformers causal LM.

Serving (the Triton python backend), evaluation and self-synthesised rehearsal all
generate through `Decoder`. Requests join the running batch as they arrive: each is
prefilled alone (reusing the cached KV of a shared prompt prefix, in whole blocks, as
TensorRT-LLM's KV-cache reuse does), then decoded one token per step together with every
other running request; a finished request leaves the batch at once.

A step runs the model's decoder body over the running rows (one new position each) and
over each newly admitted prompt, then the output layer once over all their last hidden
states: a new request's first token comes out of the same product as the running rows'
next tokens. The output layer is most of a small model's step (the tiny model's is
131,072 x 64, read whole for one row or for many), so one product per step is what makes
batching pay.

Sampling is per request and does not depend on the batch: temperature, top-k and top-p
shape the row's distribution, and one number from the request's own seeded generator
picks the token, so the same seed gives the same text alone or among others.
Each token produces one `Step` with the text it released: text is held back while it
may still be the start of a stop string, or an incomplete UTF-8 character, and the stop
string itself is never released.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import Cache, DynamicCache, StaticCache

from exforge.core.settings import Attention, Settings

REPLACEMENT = "\ufffd"
MAX_PENDING_TOKENS = 8  # tokens of an unfinished character before it is released anyway
NUCLEUS_PROBE = 1024  # top-p looks at the most likely 1024 tokens first
INVERSION_BLOCK = 512  # tokens per block of the two-level inverse of the distribution
Finish = Literal["stop", "length", "cancelled"]
KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [batch, heads, len, dim]


@dataclass(frozen=True)
class Sampling:
    """How one request decodes (the fields of TensorRT-LLM's ensemble request)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Step:
    """One generated token (or the end): the text it released and when it was made.

    `tokens` counts the tokens generated so far; the end of sequence token ends a
    request without counting, and `finish` is set on a request's last step only."""

    text: str
    tokens: int
    produced_ns: int
    finish: Finish | None = None


Event = Step | Exception


@dataclass
class Request:
    """A prompt (token ids) and its sampling; steps go to `emit`, in order, from the
    decoding thread. `cancelled` is asked before every step."""

    ids: list[int]
    sampling: Sampling
    emit: Callable[[Event], None]
    cancelled: Callable[[], bool] = lambda: False
    arrived_ns: int = field(default_factory=time.time_ns)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    first_token_ns: int | None = None


class TextStream:
    """Incremental detokenisation with stop strings: `push` a token, get the text that
    can no longer be part of a stop string; `stopped` once one appeared."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str]) -> None:
        self.decode = decode
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.released = 0
        self.pending: list[int] = []
        self.stopped = False

    def push(self, token: int) -> str:
        self.pending.append(token)
        piece = self.decode(self.pending)
        if piece.endswith(REPLACEMENT) and len(self.pending) < MAX_PENDING_TOKENS:
            return ""
        self.pending = []
        self.text += piece
        return self._release()

    def flush(self) -> str:
        """Everything still held back (the request ends without a stop string)."""
        if self.pending:
            self.text += self.decode(self.pending)
            self.pending = []
        out = self.text[self.released :]
        self.released = len(self.text)
        return out

    def _release(self) -> str:
        found = [i for i in (self.text.find(s, self.released) for s in self.stops) if i >= 0]
        if found:
            end = min(found)
            self.stopped = True
        else:
            end = len(self.text) - self._held()
        out = self.text[self.released : max(end, self.released)]
        self.released = max(end, self.released)
        return out

    def _held(self) -> int:
        """Length of the longest suffix of the text that begins some stop string."""
        for size in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-size:]
            if any(stop.startswith(tail) for stop in self.stops):
                return size
        return 0


@dataclass
class Row:
    """A request inside the running batch."""

    request: Request
    stream: TextStream
    generator: torch.Generator
    position: int  # position id of the next token fed
    next_token: int
    tokens: int = 0


class PrefixCache:
    """KV of recent prompts, reused in whole blocks of `block` tokens by prompts that
    start with the same tokens (a shared system prompt is prefilled once)."""

    def __init__(self, entries: int, block: int) -> None:
        self.entries = entries
        self.block = block
        self.data: OrderedDict[tuple[int, ...], KV] = OrderedDict()
        self.lookups = 0
        self.hits = 0

    def find(self, ids: Sequence[int]) -> tuple[int, KV | None]:
        """The longest cached prefix of `ids`, in whole blocks, leaving at least one
        token to prefill (its logits start the answer)."""
        self.lookups += 1
        best, best_kv = 0, None
        for known, kv in self.data.items():
            shared = _common_prefix(known, ids, len(ids) - 1)
            shared -= shared % self.block
            if shared > best:
                best, best_kv = shared, kv
        if best_kv is None:
            return 0, None
        self.hits += 1
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in best_kv]

    def remember(self, ids: Sequence[int], kv: KV) -> None:
        if self.entries <= 0 or len(ids) < self.block:
            return
        key = tuple(ids)
        self.data[key] = kv
        self.data.move_to_end(key)
        while len(self.data) > self.entries:
            self.data.popitem(last=False)


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if n >= limit or x != y:
            break
        n += 1
    return n


_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


@dataclass(frozen=True)
class DecodeOptions:
    """How the model runs inside the loop (settings `EXFORGE_DECODE_*`).

    - `attention`: the scaled-dot-product attention kernel: `auto` lets PyTorch choose
      among those the device has; `flash`, `efficient` (memory-efficient), `cudnn` or
      `math` insist on one (a device without it fails the request);
    - `compile`: the decoding step's forward through `torch.compile` (dynamic shapes;
      its kernels fuse the step's elementwise work);
    - `static_cache`: keys and values in buffers allocated `cache_block` columns at a
      time and written in place, instead of a tensor concatenated every step: the
      step's shapes stay fixed until the batch changes or the block fills."""

    attention: Attention = "auto"
    compile: bool = False
    static_cache: bool = False
    cache_block: int = 256

    @classmethod
    def from_settings(cls, settings: Settings) -> DecodeOptions:
        """Each option from its setting `decode_<option>` (`cache_block` has none)."""
        named = ("attention", "compile", "static_cache")
        return cls(**{name: getattr(settings, f"decode_{name}") for name in named})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def attention_context(self) -> AbstractContextManager[Any]:
        if self.attention == "auto":
            return nullcontext()
        return sdpa_kernel([_BACKENDS[self.attention]])


class Decoder:
    """A model and its tokenizer, decoding every submitted request in one batch.

    `submit` may be called from any thread; `step` and `run` (or the `serve` loop of a
    background thread) do the work. `token_delay_s` slows every step down (a slow test
    model, to watch streaming and deadlines); `options` choose the attention kernel,
    compilation and the KV layout (`DecodeOptions`)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_batch: int = 8,
        prefix_entries: int = 8,
        block_tokens: int = 32,
        token_delay_s: float = 0.0,
        options: DecodeOptions | None = None,
    ) -> None:
        self.model = model
        self.options = options or DecodeOptions()
        self.body = model.get_decoder()
        self.head = model.get_output_embeddings()
        compiled = self.options.compile
        self.step_body = torch.compile(self.body, dynamic=True) if compiled else self.body
        self.static: StaticCache | None = None  # the KV buffers while the batch is unchanged
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.prefix = PrefixCache(prefix_entries, block_tokens)
        self.token_delay_s = token_delay_s
        self.device = next(model.parameters()).device
        self.waiting: deque[Request] = deque()
        self.rows: list[Row] = []
        self.kv: KV = []
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.wakeup = threading.Condition()

    # ------------------------------------------------------------------ intake

    def submit(self, request: Request) -> None:
        with self.wakeup:
            self.waiting.append(request)
            self.wakeup.notify()

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    def run(self) -> None:
        """Decode until every submitted request has finished."""
        while self.busy:
            self.step()

    def serve(self, stopping: threading.Event) -> None:
        """Decode whatever arrives until `stopping` is set (a server's thread). A step
        that fails fails the requests it was decoding; the loop goes on."""
        while not stopping.is_set():
            with self.wakeup:
                if not self.busy:
                    self.wakeup.wait(0.1)
                    continue
            try:
                self.step()
            except Exception as exc:
                self._fail_all(exc)

    # ------------------------------------------------------------------ decoding

    @torch.inference_mode()
    def step(self) -> None:
        """Decode one token for every running request, admit waiting requests (prefill)
        while there is room, then sample every row from one output-layer product."""
        self._drop_cancelled()
        hidden: list[torch.Tensor] = []
        if self.rows:
            if self.token_delay_s:
                time.sleep(self.token_delay_s)
            try:
                hidden.append(self._forward_batch())
            except Exception as exc:
                self._fail_all(exc)
        while len(self.rows) < self.max_batch:
            with self.wakeup:
                if not self.waiting:
                    break
                request = self.waiting.popleft()
            prefilled = self._admit(request)
            if prefilled is not None:
                hidden.append(prefilled[None])
        if not hidden:
            return
        try:
            logits = self.head(torch.cat(hidden)).float()
        except Exception as exc:
            self._fail_all(exc)
            return
        self._advance(list(range(len(self.rows))), logits)

    def _admit(self, request: Request) -> torch.Tensor | None:
        """Prefill a request and put it into the batch: the last hidden state of its
        prompt (None: it failed, and was told)."""
        try:
            hidden, kv = self._prefill(request)
            row = Row(
                request,
                TextStream(self._decode, request.sampling.stop),
                torch.Generator().manual_seed(request.sampling.seed),
                len(request.ids),
                next_token=-1,
            )
            self._join(row, kv)
        except Exception as exc:
            _deliver(request, exc)
            return None
        return hidden

    def _prefill(self, request: Request) -> tuple[torch.Tensor, KV]:
        if request.sampling.max_tokens <= 0 or not request.ids:
            raise ValueError("a request needs prompt tokens and max_tokens > 0")
        ids = request.ids
        cached, prefix = self.prefix.find(ids)
        request.cached_tokens = cached
        cache = DynamicCache(prefix) if prefix else DynamicCache()
        with self.options.attention_context():
            out = self.body(
                input_ids=torch.tensor([ids[cached:]], device=self.device),
                position_ids=torch.arange(cached, len(ids), device=self.device)[None],
                past_key_values=cache,
                use_cache=True,
            )
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        self.prefix.remember(ids, kv)
        return out.last_hidden_state[0, -1], kv

    def _join(self, row: Row, kv: KV) -> None:
        """Put a prefilled request into the batch, left-padding to a common length."""
        length = kv[0][0].shape[2]
        if not self.rows:
            self.kv = kv
            self.mask = torch.ones((1, length), dtype=torch.long, device=self.device)
        else:
            width = max(length, self.mask.shape[1])
            old, new = width - self.mask.shape[1], width - length
            self.kv = [
                (
                    torch.cat([_pad_kv(k, old), _pad_kv(nk, new)]),
                    torch.cat([_pad_kv(v, old), _pad_kv(nv, new)]),
                )
                for (k, v), (nk, nv) in zip(self.kv, kv, strict=True)
            ]
            fresh = torch.ones((1, length), dtype=torch.long, device=self.device)
            self.mask = torch.cat([F.pad(self.mask, (old, 0)), F.pad(fresh, (new, 0))])
        self.rows.append(row)
        self.static = None

    def _forward_batch(self) -> torch.Tensor:
        tokens = torch.tensor([[row.next_token] for row in self.rows], device=self.device)
        positions = torch.tensor([[row.position] for row in self.rows], device=self.device)
        mask = F.pad(self.mask, (0, 1), value=1)
        cache, attended = self._cache(mask)
        with self.options.attention_context():
            out = self.step_body(
                input_ids=tokens,
                attention_mask=attended,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
        width = mask.shape[1]
        self.kv = [(layer.keys[:, :, :width], layer.values[:, :, :width]) for layer in cache.layers]
        self.mask = mask
        for row in self.rows:
            row.position += 1
        return out.last_hidden_state[:, -1]

    def _cache(self, mask: torch.Tensor) -> tuple[Cache, torch.Tensor]:
        """The cache this step writes into and the attention mask over its columns."""
        if not self.options.static_cache:
            return DynamicCache(self.kv), mask
        width, block = mask.shape[1], self.options.cache_block
        if self.static is None or width > self.static.get_max_length():
            self.static = StaticCache(
                config=self.model.config, max_cache_len=-(-width // block) * block
            )
            for layer, (keys, values) in zip(self.static.layers, self.kv, strict=True):
                layer.update(keys, values)
        return self.static, F.pad(mask, (0, self.static.get_max_length() - width))

    def _advance(self, indices: list[int], logits: torch.Tensor) -> None:
        """Sample the next token of the given rows, emit their steps, retire finished."""
        rows = [self.rows[i] for i in indices]
        try:
            tokens = choose_rows(
                logits, [r.request.sampling for r in rows], [r.generator for r in rows]
            )
        except FloatingPointError:  # find the rows at fault; the others go on
            tokens = [
                self._choose_alone(row, row_logits)
                for row, row_logits in zip(rows, logits, strict=True)
            ]
        finished = []
        for index, row, token in zip(indices, rows, tokens, strict=True):
            event = token if isinstance(token, Exception) else self._next(row, token)
            delivered = _deliver(row.request, event)
            if not delivered or isinstance(event, Exception) or event.finish is not None:
                finished.append(index)
        if finished:
            self._retire(finished)

    @staticmethod
    def _choose_alone(row: Row, logits: torch.Tensor) -> int | Exception:
        try:
            return choose(logits, row.request.sampling, row.generator)
        except FloatingPointError as exc:
            return exc

    def _next(self, row: Row, token: int) -> Step:
        sampling = row.request.sampling
        now = time.time_ns()
        if row.request.first_token_ns is None:
            row.request.first_token_ns = now
        if token == self.tokenizer.eos_id or token in sampling.stop_ids:
            return Step(row.stream.flush(), row.tokens, now, "stop")
        row.tokens += 1
        row.next_token = token
        text = row.stream.push(token)
        if row.stream.stopped:
            return Step(text, row.tokens, now, "stop")
        if row.tokens >= sampling.max_tokens:
            return Step(text + row.stream.flush(), row.tokens, now, "length")
        return Step(text, row.tokens, now)

    def _drop_cancelled(self) -> None:
        gone = [i for i, row in enumerate(self.rows) if row.request.cancelled()]
        for index in gone:
            row = self.rows[index]
            _deliver(row.request, Step("", row.tokens, time.time_ns(), "cancelled"))
        if gone:
            self._retire(gone)

    def _retire(self, indices: list[int]) -> None:
        keep = [i for i in range(len(self.rows)) if i not in set(indices)]
        self.rows = [self.rows[i] for i in keep]
        self.static = None
        if not self.rows:
            self.kv, self.mask = [], self.mask[:0, :0]
            return
        index = torch.tensor(keep, device=self.device)
        self.mask = self.mask[index]
        start = int(self.mask.argmax(dim=1).min())  # columns every row pads
        self.mask = self.mask[:, start:]
        self.kv = [(k[index, :, start:], v[index, :, start:]) for k, v in self.kv]

    def _fail_all(self, exc: Exception) -> None:
        for row in self.rows:
            _deliver(row.request, exc)
        self._retire(list(range(len(self.rows))))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def _deliver(request: Request, event: Event) -> bool:
    """Hand an event to its request; False when the receiver failed (a client gone), so
    the request leaves the batch instead of stopping the loop."""
    try:
        request.emit(event)
    except Exception:
        return False
    return True


def _pad_kv(tensor: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(tensor, (0, 0, width, 0)) if width else tensor


def choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The next token of one request (`choose_rows` for one row)."""
    return choose_rows(logits[None], [sampling], [generator])[0]


def choose_rows(
    logits: torch.Tensor, samplings: Sequence[Sampling], generators: Sequence[torch.Generator]
) -> list[int]:
    """The next token of each row: greedy at temperature 0, else one uniform number from
    the row's own generator, inverted through the cumulative distribution of its
    tempered, top-k and top-p limited probabilities taken in vocabulary order. In that
    order two runs whose logits differ in the last bits (other thread counts, other
    batches) move the cumulative sums by far less than one token's probability, so the
    same seed draws the same tokens in every process; sorting by probability would not
    (near-equal probabilities swap places)."""
    sampled = [i for i, s in enumerate(samplings) if s.temperature > 0]
    greedy = [i for i, s in enumerate(samplings) if s.temperature <= 0]
    tokens = [0] * len(samplings)
    if greedy:
        best, chosen = torch.max(logits[greedy], dim=-1)  # NaN and +inf show in the maximum
        _finite(best)
        for index, token in zip(greedy, chosen.tolist(), strict=True):
            tokens[index] = token
    if not sampled:
        return tokens
    device = logits.device
    rows = logits if len(sampled) == len(samplings) else logits[sampled]
    heat = torch.tensor([samplings[i].temperature for i in sampled], device=device)
    probs = torch.softmax(rows.float() / heat[:, None], dim=-1)  # NaN, +inf: NaN rows
    for row, index in enumerate(sampled):
        allowed = _allowed(probs[row], samplings[index])
        if allowed is not None:
            probs[row] = torch.zeros_like(probs[row]).index_copy_(0, allowed, probs[row][allowed])
    draws = torch.tensor([float(torch.rand((), generator=generators[i])) for i in sampled])
    for index, token in zip(sampled, invert(probs, draws.to(device)).tolist(), strict=True):
        tokens[index] = token
    return tokens


def invert(weights: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """For each row, the first token (in vocabulary order) whose cumulative weight
    exceeds `draw` x the row's total: the inverse of its cumulative distribution, never a
    token of weight zero. Two short scans instead of one across the vocabulary (the
    sequential part of sampling): the cumulative sums of blocks of `INVERSION_BLOCK`
    tokens pick the block, then the sums inside that block pick the token."""
    rows, vocab = weights.shape
    blocks = -(-vocab // INVERSION_BLOCK)
    if blocks * INVERSION_BLOCK != vocab:
        weights = F.pad(weights, (0, blocks * INVERSION_BLOCK - vocab))
    tiled = weights.view(rows, blocks, INVERSION_BLOCK)
    outer = torch.cumsum(tiled.sum(dim=-1), dim=-1)
    _finite(outer[:, -1])
    targets = draws[:, None] * outer[:, -1:]
    block = _first_above(outer, targets)
    before = outer.gather(1, (block - 1).clamp(min=0)) * (block > 0)
    inner = torch.cumsum(tiled[torch.arange(rows, device=weights.device), block[:, 0]], dim=-1)
    within = _first_above(inner, targets - before)
    return (block * INVERSION_BLOCK + within)[:, 0]


def _first_above(cumulative: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative sum exceeds the target, at most the
    last index that adds weight (rounding may put a target at or past the total)."""
    found = torch.searchsorted(cumulative, targets, right=True)
    last = (cumulative < cumulative[:, -1:]).sum(dim=-1, keepdim=True)
    return torch.minimum(found, last)


def _finite(values: torch.Tensor) -> None:
    if not bool(torch.isfinite(values).all()):
        raise FloatingPointError("the model produced non-finite logits")


def _allowed(probs: torch.Tensor, sampling: Sampling) -> torch.Tensor | None:
    """The token ids top-k and top-p keep (None: all). Top-p looks at the most likely
    `NUCLEUS_PROBE` tokens first and sorts everything only when their mass falls short."""
    vocab = probs.numel()
    k = sampling.top_k if 0 < sampling.top_k < vocab else vocab
    if k == vocab and sampling.top_p >= 1.0:
        return None
    if sampling.top_p >= 1.0:
        return torch.topk(probs, k).indices
    values, order = torch.topk(probs, min(k, NUCLEUS_PROBE))
    if float(values.sum()) < sampling.top_p and len(order) < k:
        values, order = torch.topk(probs, k)
    if k < vocab:
        values = values / values.sum()  # top-k renormalises before the nucleus is taken
    inside = torch.cumsum(values, dim=-1) - values < sampling.top_p
    return order[inside]


# ---------------------------------------------------------------------- batch helpers


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int
    finish: Finish


def complete(decoder: Decoder, prompts: Sequence[tuple[list[int], Sampling]]) -> list[Completion]:
    """Generate every prompt to its end in one continuously batched run (evaluation,
    rehearsal); the decoder must not be serving another thread."""
    texts: list[list[str]] = [[] for _ in prompts]
    ends: list[Completion | Exception | None] = [None] * len(prompts)

    def sink(index: int) -> Callable[[Event], None]:
        def emit(event: Event) -> None:
            if isinstance(event, Exception):
                ends[index] = event
                return
            texts[index].append(event.text)
            if event.finish is not None:
                ends[index] = Completion("".join(texts[index]), event.tokens, event.finish)

        return emit

    for index, (ids, sampling) in enumerate(prompts):
        decoder.submit(Request(list(ids), sampling, sink(index)))
    decoder.run()
    for end in ends:
        if isinstance(end, Exception):
            raise end
    return [end for end in ends if isinstance(end, Completion)]
