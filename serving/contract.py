"""The request every served model takes: TensorRT-LLM's ensemble tensors.

One client (the gateway, tritonclient scripts, the benchmark) talks to both flavors: the
cpu flavor's python-backend model declares a subset of the ensemble's inputs and outputs
with the ensemble's exact names, data types and dims (tests/data/trtllm holds the
upstream configurations they are checked against), so a request written for the
TensorRT-LLM ensemble works unchanged against either.
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
    TensorSpec("max_tokens", "TYPE_INT32"),
    TensorSpec("stop_words", "TYPE_STRING", optional=True, dims=(-1,)),
    TensorSpec("exclude_input_in_output", "TYPE_BOOL", optional=True),
    TensorSpec("end_id", "TYPE_INT32", optional=True),
    TensorSpec("top_k", "TYPE_INT32", optional=True),
    TensorSpec("top_p", "TYPE_FP32", optional=True),
    TensorSpec("temperature", "TYPE_FP32", optional=True),
    TensorSpec("seed", "TYPE_UINT64", optional=True),
    TensorSpec("return_perf_metrics", "TYPE_BOOL", optional=True),
    TensorSpec("return_num_input_tokens", "TYPE_BOOL", optional=True),
    TensorSpec("return_num_output_tokens", "TYPE_BOOL", optional=True),
    TensorSpec("stream", "TYPE_BOOL", optional=True),
)
OUTPUTS = (
    TensorSpec("text_output", "TYPE_STRING", dims=(-1,)),
    TensorSpec("kv_cache_reused_blocks", "TYPE_INT32"),
    TensorSpec("arrival_time_ns", "TYPE_INT64"),
    TensorSpec("first_token_time_ns", "TYPE_INT64"),
    TensorSpec("last_token_time_ns", "TYPE_INT64"),
    TensorSpec("num_input_tokens", "TYPE_INT32"),
    TensorSpec("num_output_tokens", "TYPE_INT32"),
)
NUMPY_TYPES = {
    "TYPE_STRING": np.object_,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP32": np.float32,
    "TYPE_BOOL": np.bool_,
    "TYPE_UINT64": np.uint64,
}
SPECS = {spec.name: spec for spec in (*INPUTS, *OUTPUTS)}


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


def array(name: str, value: object) -> np.ndarray:
    """One tensor of the contract as a numpy array of batch 1 (`stop_words`: a list)."""
    values = value if isinstance(value, list | tuple) else [value]
    if SPECS[name].triton_type == "TYPE_STRING":
        values = [str(v).encode() for v in values]
    return np.array([values], dtype=NUMPY_TYPES[SPECS[name].triton_type])


@dataclass(frozen=True)
class LlmRequest:
    """What one generation asks for, in the contract's terms."""

    text: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int = 0
    stream: bool = True

    def arrays(self) -> dict[str, np.ndarray]:
        values: dict[str, object] = {
            "text_input": self.text,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stream": self.stream,
            "return_perf_metrics": True,
            "return_num_input_tokens": True,
            "return_num_output_tokens": True,
        }
        if self.stop:
            values["stop_words"] = list(self.stop)
        return {name: array(name, value) for name, value in values.items()}
