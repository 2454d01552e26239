"""The request contract every served model follows: TensorRT-LLM's ensemble/BLS tensors.

One client (the gateway, tritonclient scripts, the benchmark) talks to both flavors:
the python-backend model here and the TensorRT-LLM `tensorrt_llm_bls` model on GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    name: str
    triton_type: str  # model config data type (TYPE_…)
    optional: bool = False
    dims: tuple[int, ...] = (1,)

    @property
    def wire_type(self) -> str:
        """The datatype tritonclient puts on the wire (STRING travels as BYTES)."""
        return "BYTES" if self.triton_type == "TYPE_STRING" else self.triton_type[5:]


INPUTS = (
    TensorSpec("text_input", "TYPE_STRING"),
    TensorSpec("max_tokens", "TYPE_UINT32"),
    TensorSpec("temperature", "TYPE_FP32", optional=True),
    TensorSpec("top_p", "TYPE_FP32", optional=True),
    TensorSpec("stop_words", "TYPE_STRING", optional=True, dims=(-1,)),
    TensorSpec("stream", "TYPE_BOOL", optional=True),
    TensorSpec("random_seed", "TYPE_UINT64", optional=True),
)
OUTPUTS = (TensorSpec("text_output", "TYPE_STRING"),)
NUMPY_TYPES = {
    "TYPE_STRING": np.object_,
    "TYPE_UINT32": np.uint32,
    "TYPE_FP32": np.float32,
    "TYPE_BOOL": np.bool_,
    "TYPE_UINT64": np.uint64,
}


def io_config() -> dict[str, list[dict[str, object]]]:
    """The `input`/`output` sections of a model config (dims exclude the batch axis)."""

    def tensor(spec: TensorSpec) -> dict[str, object]:
        entry: dict[str, object] = {
            "name": spec.name,
            "data_type": spec.triton_type,
            "dims": list(spec.dims),
        }
        if spec.optional:
            entry["optional"] = True
        return entry

    return {"input": [tensor(s) for s in INPUTS], "output": [tensor(s) for s in OUTPUTS]}


def request_arrays(
    text: str,
    max_tokens: int,
    temperature: float,
    top_p: float,
    stop_words: list[str],
    stream: bool,
    seed: int,
) -> dict[str, np.ndarray]:
    """Numpy values of every input, shaped [batch=1, 1] (stop words: [1, n])."""
    values = {
        "text_input": np.array([[text.encode()]], dtype=np.object_),
        "max_tokens": np.array([[max_tokens]], dtype=np.uint32),
        "temperature": np.array([[temperature]], dtype=np.float32),
        "top_p": np.array([[top_p]], dtype=np.float32),
        "stream": np.array([[stream]], dtype=np.bool_),
        "random_seed": np.array([[seed]], dtype=np.uint64),
    }
    if stop_words:
        values["stop_words"] = np.array([[w.encode() for w in stop_words]], dtype=np.object_)
    return values
