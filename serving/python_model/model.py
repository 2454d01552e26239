"""Triton python-backend model (cpu flavor): decoupled, one response per generated token.

Copied into every exported version folder. It loads the merged weights beside it with
transformers and streams through `exforge.llm.generation`, so the Python environment Triton
runs it in needs exforge installed; `exforge serve up` adds the running interpreter's
site-packages through EXFORGE_TRITON_PYTHONPATH (the stub ignores PYTHONPATH).

Requests that dynamic batching groups into one `execute` call run concurrently on a
thread pool (`generation_threads` parameter); responses go out as tokens are made.
"""

from __future__ import annotations

import json
import os
import site
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

for _entry in filter(None, os.environ.get("EXFORGE_TRITON_PYTHONPATH", "").split(os.pathsep)):
    site.addsitedir(_entry)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from exforge.llm.generation import GenerationRequest, Generator  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _scalar(request: object, name: str, default: object) -> object:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else tensor.as_numpy().reshape(-1)[0].item()


def _strings(request: object, name: str) -> tuple[str, ...]:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return ()
    return tuple(
        v.decode() if isinstance(v, bytes) else str(v) for v in tensor.as_numpy().reshape(-1)
    )


def _output(text: str) -> object:
    array = np.array([[text.encode()]], dtype=np.object_)
    return pb_utils.InferenceResponse([pb_utils.Tensor("text_output", array)])


def _parse(request: object) -> tuple[GenerationRequest, bool]:
    job = GenerationRequest(
        text=_strings(request, "text_input")[0],
        max_tokens=int(_scalar(request, "max_tokens", 16)),
        temperature=float(_scalar(request, "temperature", 0.0)),
        top_p=float(_scalar(request, "top_p", 1.0)),
        stop_words=_strings(request, "stop_words"),
        seed=int(_scalar(request, "random_seed", 0)),
    )
    return job, bool(_scalar(request, "stream", False))


def _fail(sender: object, exc: Exception) -> None:
    error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
    sender.send(pb_utils.InferenceResponse(output_tensors=[], error=error), flags=FINAL)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        torch.set_num_threads(int(params.get("torch_threads", "1")))
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.generator = Generator.from_dir(version_dir / "model")
        self.pool = ThreadPoolExecutor(int(params.get("generation_threads", "4")))
        self.stopping = threading.Event()

    def execute(self, requests: list[object]) -> None:
        # Inputs live in shared memory only until execute returns: read them here.
        for request in requests:
            sender = request.get_response_sender()
            try:
                job, streaming = _parse(request)
            except Exception as exc:
                _fail(sender, exc)
                continue
            self.pool.submit(self._serve, job, streaming, sender)

    def _serve(self, job: GenerationRequest, streaming: bool, sender: object) -> None:
        try:
            text = []
            for step in self.generator.stream(job, self.stopping):
                if sender.is_cancelled():
                    break
                if streaming:
                    sender.send(_output(step.text))
                else:
                    text.append(step.text)
            final = None if streaming else _output("".join(text))
            sender.send(final, flags=FINAL)
        except Exception as exc:
            _fail(sender, exc)

    def finalize(self) -> None:
        self.stopping.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
