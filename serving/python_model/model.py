"""Triton python-backend model (cpu flavor): one response per generated token when decoupled.

Copied into every exported version folder. It loads the merged weights beside it and
decodes with `exforge.llm.generation.Decoder`, continuously batched on one thread:
requests join the running batch as they arrive, and each token goes out as soon as it is
made, sent by a second thread so that decoding does not wait while Triton takes it. The
Python environment Triton runs it in needs exforge installed; `exforge serve up` adds
the project through EXFORGE_TRITON_PYTHONPATH (the stub ignores PYTHONPATH).

Inputs and outputs are those of TensorRT-LLM's ensemble (`serving.contract`); the perf
outputs (`arrival_time_ns`, `first_token_time_ns`, `last_token_time_ns`,
`kv_cache_reused_blocks`) come with `return_perf_metrics`, and in a stream every
response's `last_token_time_ns` is when its token was made. Model parameters:
`decode_batch` (requests decoded together), `tokens_per_block` (prefix-cache reuse
granularity), `prefix_cache_entries`, `torch_threads`. Like upstream's models, it may be
deployed decoupled (a request that asks to `stream` gets a response per token) or not
(one response per request, which Triton's HTTP `infer` requires; `stream` is refused). A
version folder's `decoding.json` may set `token_delay_s` (a deliberately slow test
version) and `options` (`DecodeOptions`: attention kernel, compiled step, static KV
cache; from the exporting process's `EXFORGE_DECODE_*` settings).
"""

from __future__ import annotations

import json
import os
import queue
import site
import threading
from pathlib import Path

for _entry in filter(None, os.environ.get("EXFORGE_TRITON_PYTHONPATH", "").split(os.pathsep)):
    site.addsitedir(_entry)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from exforge.llm.chat import text_ids, text_tokenizer  # noqa: E402
from exforge.llm.generation import (  # noqa: E402
    DecodeOptions,
    Decoder,
    Event,
    Request,
    Sampling,
    Step,
)
from exforge.llm.model import load_model  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
RUNTIME_FILE = "decoding.json"


def _values(request: object, name: str) -> list[object]:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return []
    return [v.decode() if isinstance(v, bytes) else v for v in tensor.as_numpy().reshape(-1)]


def _scalar(request: object, name: str, default: object) -> object:
    values = _values(request, name)
    return values[0].item() if values and hasattr(values[0], "item") else default


def _tensor(name: str, value: object, dtype: type) -> object:
    return pb_utils.Tensor(name, np.array([[value]], dtype=dtype))


class Dispatcher:
    """Hands each request's steps to its `Responder` on a thread of its own, in the order
    they were made."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[tuple[Responder, Event] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def put(self, responder: Responder, event: Event) -> None:
        self.queue.put((responder, event))

    def close(self) -> None:
        """Send what is queued, then stop."""
        self.queue.put(None)
        self.thread.join()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            responder, event = item
            responder.send(event)


class Responder:
    """Turns a request's decoding steps into Triton responses on its sender. `emit` (the
    decoding thread) queues a step; the dispatcher's thread `send`s it, then asks Triton
    whether the client cancelled (both wait on tritonserver: the decoding thread asks
    neither)."""

    def __init__(self, request: object, block: int, dispatcher: Dispatcher) -> None:
        self.sender = request.get_response_sender()
        self.dispatcher = dispatcher
        self.gone = False  # a send failed: the client left
        self.cancel_asked = False  # the client cancelled: the request still ends with a response
        self.streaming = bool(_scalar(request, "stream", False))
        self.perf = bool(_scalar(request, "return_perf_metrics", False))
        self.input_count = bool(_scalar(request, "return_num_input_tokens", False))
        self.output_count = bool(_scalar(request, "return_num_output_tokens", False))
        self.echo = not bool(_scalar(request, "exclude_input_in_output", True))
        self.block = block
        self.text: list[str] = []
        self.prompt = ""
        self.job: Request | None = None

    def emit(self, event: Event) -> None:
        self.dispatcher.put(self, event)

    def cancelled(self) -> bool:
        """The client cancelled or left: the decoder drops the request."""
        return self.gone or self.cancel_asked

    def send(self, event: Event) -> None:
        """Send a step (or the error that ended the request) unless the client is gone."""
        if self.gone:
            return
        try:
            self._send(event)
            if isinstance(event, Step) and event.finish is None:
                self.cancel_asked = self.sender.is_cancelled()
        except Exception:
            self.gone = True

    def _send(self, event: Event) -> None:
        if isinstance(event, Exception):
            error = pb_utils.TritonError(f"{type(event).__name__}: {event}")
            self.sender.send(pb_utils.InferenceResponse([], error), flags=FINAL)
        elif self.streaming:
            self.sender.send(self._response(event, event.text), flags=_flags(event))
        else:
            self.text.append(event.text)
            if event.finish is not None:
                self.sender.send(self._response(event, "".join(self.text)), flags=FINAL)

    def _response(self, step: Step, text: str) -> object:
        job = self.job
        assert job is not None
        if self.echo:
            text, self.echo = self.prompt + text, False
        outputs = [pb_utils.Tensor("text_output", np.array([[text.encode()]], dtype=np.object_))]
        if self.input_count:
            outputs.append(_tensor("num_input_tokens", len(job.ids), np.int32))
        if self.output_count:
            outputs.append(_tensor("num_output_tokens", step.tokens, np.int32))
        if self.perf:
            outputs += [
                _tensor("kv_cache_reused_blocks", job.cached_tokens // self.block, np.int32),
                _tensor("arrival_time_ns", job.arrived_ns, np.int64),
                _tensor("first_token_time_ns", job.first_token_ns or 0, np.int64),
                _tensor("last_token_time_ns", step.produced_ns, np.int64),
            ]
        return pb_utils.InferenceResponse(outputs)


def _flags(step: Step) -> int:
    return FINAL if step.finish is not None else 0


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        torch.set_num_threads(int(params.get("torch_threads", "1")))
        version_dir = Path(args["model_repository"]) / args["model_version"]
        runtime_file = version_dir / RUNTIME_FILE
        runtime = json.loads(runtime_file.read_text()) if runtime_file.is_file() else {}
        model_dir = version_dir / "model"
        model = load_model(str(model_dir), "none", dtype=torch.float32, device=torch.device("cpu"))
        self.tokenizer = text_tokenizer(model_dir)
        self.block = int(params.get("tokens_per_block", "32"))
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.decoder = Decoder(
            model.eval(),
            self.tokenizer,
            max_batch=int(params.get("decode_batch", "8")),
            prefix_entries=int(params.get("prefix_cache_entries", "8")),
            block_tokens=self.block,
            token_delay_s=float(runtime.get("token_delay_s", 0.0)),
            options=DecodeOptions(**runtime.get("options", {})),
        )
        self.dispatcher = Dispatcher()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.decoder.serve, args=(self.stopping,))
        self.thread.start()

    def execute(self, requests: list[object]) -> None:
        # Inputs live in shared memory only until execute returns: read them here.
        for request in requests:
            responder = Responder(request, self.block, self.dispatcher)
            try:
                job = self._job(request, responder)
            except Exception as exc:  # a malformed request fails alone
                responder.emit(exc)
                continue
            responder.job = job
            self.decoder.submit(job)

    def _job(self, request: object, responder: Responder) -> Request:
        if responder.streaming and not self.decoupled:
            raise ValueError("streaming needs the model deployed decoupled")
        text = responder.prompt = str(_values(request, "text_input")[0])
        end_id = _scalar(request, "end_id", None)
        sampling = Sampling(
            max_tokens=int(_scalar(request, "max_tokens", 16)),
            temperature=float(_scalar(request, "temperature", 0.0)),
            top_p=float(_scalar(request, "top_p", 1.0)),
            top_k=int(_scalar(request, "top_k", 0)),
            seed=int(_scalar(request, "seed", 0)),
            stop=tuple(str(w) for w in _values(request, "stop_words")),
            stop_ids=() if end_id is None else (int(end_id),),
        )
        ids = text_ids(self.tokenizer, text)
        return Request(ids, sampling, responder.emit, responder.cancelled)

    def finalize(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.dispatcher.close()
