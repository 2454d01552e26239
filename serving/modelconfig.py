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


def params(values: dict[str, object]) -> dict[str, dict[str, str]]:
    def text(value: object) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)

    return {key: {"string_value": text(value)} for key, value in values.items()}


def version_policy(versions: list[int]) -> Config:
    return {"specific": {"versions": sorted(versions)}}


def cpu_config(
    name: str, versions: list[int], decode_batch: int = MAX_BATCH, decoupled: bool = True
) -> Config:
    """The python-backend model: contract I/O, continuous batching of up to `decode_batch`
    requests (1: one request at a time); `decoupled` (upstream's `decoupled_mode`): a
    response per token for requests that ask to `stream`, else exactly one response per
    request, the transaction policy Triton's HTTP `infer` requires."""
    return {
        "name": name,
        "backend": "python",
        "max_batch_size": MAX_BATCH,
        **io_config(),
        "model_transaction_policy": {"decoupled": decoupled},
        "dynamic_batching": {"max_queue_delay_microseconds": QUEUE_DELAY_US},
        "instance_group": [{"kind": "KIND_CPU", "count": 1}],
        "version_policy": version_policy(versions),
        "parameters": params(
            {
                "decode_batch": decode_batch,
                "tokens_per_block": TOKENS_PER_BLOCK,
                "prefix_cache_entries": 8,
                "torch_threads": 1,
            }
        ),
    }
