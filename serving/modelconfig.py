"""Triton model configurations as dicts, rendered to `config.pbtxt` with Triton's own schema.

Rendering through `model_config_pb2` means a misspelt field fails here, at export time,
not when Triton loads the model.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from serving.contract import io_config

Config = dict[str, Any]
MAX_BATCH = 8
QUEUE_DELAY_US = 2000
TOKENS_PER_BLOCK = 32  # KV-cache block: the unit of prefix reuse (TensorRT-LLM's default)


def render(config: Config) -> str:
    message = json_format.ParseDict(config, model_config_pb2.ModelConfig())
    return text_format.MessageToString(message)


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _params(values: dict[str, object]) -> dict[str, dict[str, str]]:
    def text(value: object) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)

    return {key: {"string_value": text(value)} for key, value in values.items()}


def version_policy(versions: list[int]) -> Config:
    return {"specific": {"versions": sorted(versions)}}


def cpu_config(name: str, versions: list[int], decode_batch: int = MAX_BATCH) -> Config:
    """The python-backend model: decoupled streaming, contract I/O, continuous batching of
    up to `decode_batch` requests (1: one request at a time)."""
    return {
        "name": name,
        "backend": "python",
        "max_batch_size": MAX_BATCH,
        **io_config(),
        "model_transaction_policy": {"decoupled": True},
        "dynamic_batching": {"max_queue_delay_microseconds": QUEUE_DELAY_US},
        "instance_group": [{"kind": "KIND_CPU", "count": 1}],
        "version_policy": version_policy(versions),
        "parameters": _params(
            {
                "decode_batch": decode_batch,
                "tokens_per_block": TOKENS_PER_BLOCK,
                "prefix_cache_entries": 8,
                "torch_threads": 1,
            }
        ),
    }


# ---------------------------------------------------------------- TensorRT-LLM flavor
# Tensor names and parameters of tensorrtllm_backend's all_models/inflight_batcher_llm;
# their model.py files come from the `…-trtllm-python-py3` image (build_engine.sh).

TRTLLM_INPUTS = [
    ("input_ids", "TYPE_INT32", [-1], False),
    ("input_lengths", "TYPE_INT32", [1], False),
    ("request_output_len", "TYPE_INT32", [1], False),
    ("end_id", "TYPE_INT32", [1], True),
    ("pad_id", "TYPE_INT32", [1], True),
    ("stop_words_list", "TYPE_INT32", [2, -1], True),
    ("bad_words_list", "TYPE_INT32", [2, -1], True),
    ("runtime_top_p", "TYPE_FP32", [1], True),
    ("temperature", "TYPE_FP32", [1], True),
    ("random_seed", "TYPE_UINT64", [1], True),
    ("streaming", "TYPE_BOOL", [1], True),
]
PREPROCESSING_INPUTS = [
    ("QUERY", "TYPE_STRING", [1], False),
    ("REQUEST_OUTPUT_LEN", "TYPE_INT32", [1], False),
    ("BAD_WORDS_DICT", "TYPE_STRING", [-1], True),
    ("STOP_WORDS_DICT", "TYPE_STRING", [-1], True),
    ("END_ID", "TYPE_INT32", [1], True),
    ("PAD_ID", "TYPE_INT32", [1], True),
]
PREPROCESSING_OUTPUTS = [
    ("INPUT_ID", "TYPE_INT32", [-1]),
    ("REQUEST_INPUT_LEN", "TYPE_INT32", [1]),
    ("BAD_WORDS_IDS", "TYPE_INT32", [2, -1]),
    ("STOP_WORDS_IDS", "TYPE_INT32", [2, -1]),
    ("REQUEST_OUTPUT_LEN", "TYPE_INT32", [-1]),
    ("OUT_END_ID", "TYPE_INT32", [1]),
    ("OUT_PAD_ID", "TYPE_INT32", [1]),
]


def _inputs(rows: list[tuple[str, str, list[int], bool]]) -> list[Config]:
    out = []
    for name, dtype, dims, optional in rows:
        entry: Config = {"name": name, "data_type": dtype, "dims": dims}
        if optional:
            entry["optional"] = True
        if name == "input_ids":
            entry["allow_ragged_batch"] = True
        out.append(entry)
    return out


def _outputs(rows: list[tuple[str, str, list[int]]]) -> list[Config]:
    return [{"name": name, "data_type": dtype, "dims": dims} for name, dtype, dims in rows]


def trtllm_configs(name: str, engine_dir: str, tokenizer_dir: str) -> dict[str, Config]:
    """The four models of the in-flight batching ensemble; `name` is the BLS entry point."""
    cpu_instance = [{"kind": "KIND_CPU", "count": 4}]
    return {
        "preprocessing": {
            "name": "preprocessing",
            "backend": "python",
            "max_batch_size": MAX_BATCH,
            "input": _inputs(PREPROCESSING_INPUTS),
            "output": _outputs(PREPROCESSING_OUTPUTS),
            "instance_group": cpu_instance,
            "parameters": _params({"tokenizer_dir": tokenizer_dir, "add_special_tokens": True}),
        },
        "tensorrt_llm": {
            "name": "tensorrt_llm",
            "backend": "tensorrtllm",
            "max_batch_size": MAX_BATCH,
            "model_transaction_policy": {"decoupled": True},
            "dynamic_batching": {
                "preferred_batch_size": [MAX_BATCH],
                "max_queue_delay_microseconds": QUEUE_DELAY_US,
            },
            "input": _inputs(TRTLLM_INPUTS),
            "output": _outputs(
                [("output_ids", "TYPE_INT32", [-1, -1]), ("sequence_length", "TYPE_INT32", [-1])]
            ),
            "instance_group": [{"kind": "KIND_CPU", "count": 1}],  # the backend owns the GPUs
            "parameters": _params(
                {
                    "gpt_model_type": "inflight_fused_batching",  # batching_strategy
                    "gpt_model_path": engine_dir,
                    "max_beam_width": 1,
                    "batch_scheduler_policy": "guaranteed_no_evict",
                    "kv_cache_free_gpu_mem_fraction": 0.9,
                    "enable_kv_cache_reuse": True,
                    "exclude_input_in_output": True,
                    "enable_chunked_context": True,
                }
            ),
        },
        "postprocessing": {
            "name": "postprocessing",
            "backend": "python",
            "max_batch_size": MAX_BATCH,
            "input": _inputs(
                [
                    ("TOKENS_BATCH", "TYPE_INT32", [-1, -1], False),
                    ("SEQUENCE_LENGTH", "TYPE_INT32", [-1], False),
                ]
            ),
            "output": _outputs([("OUTPUT", "TYPE_STRING", [-1])]),
            "instance_group": cpu_instance,
            "parameters": _params({"tokenizer_dir": tokenizer_dir, "skip_special_tokens": True}),
        },
        name: {
            "name": name,
            "backend": "python",
            "max_batch_size": MAX_BATCH,
            **io_config(),
            "model_transaction_policy": {"decoupled": True},
            "instance_group": cpu_instance,
            "parameters": _params(
                {"tensorrt_llm_model_name": "tensorrt_llm", "accumulate_tokens": False}
            ),
        },
    }
