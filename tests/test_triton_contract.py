"""The Triton contract against upstream TensorRT-LLM: the trtllm flavor's rendered configs
carry exactly the tensors of `inflight_batcher_llm` (tests/data/trtllm, with the upstream
commits), the cpu flavor declares a subset of the ensemble's with the same types and
dims, and a client sending the upstream types over gRPC and HTTP is served by it (HTTP
`infer` by the model deployed without decoupling, upstream's `decoupled_mode` false)."""

from __future__ import annotations

import json
import queue
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import model_config_pb2 as pb
from tritonclient.utils import InferenceServerException

from exforge.core.settings import load_settings
from exforge.core.stack import free_port
from serving import triton
from serving.modelconfig import cpu_config, parse, render
from serving.trtllm_config import trtllm_configs
from tests.support.serving import MODEL, Served, repository

UPSTREAM = json.loads(
    (Path(__file__).parent / "data" / "trtllm" / "inflight_batcher_llm.json").read_text()
)
SCRIPT = Path(__file__).resolve().parent.parent / "serving" / "trtllm" / "build_engine.sh"
PLACEHOLDER_TYPES = {"TYPE_FP32", "TYPE_FP16", "TYPE_BF16"}  # what ${..._datatype} may be

# The first test to use the shared servers waits for two tritonservers to load five
# model versions (minutes on a busy 2-core machine).
pytestmark = pytest.mark.timeout(900)


def upstream(model: str, kind: str) -> list[tuple[str, str, list[int], bool]]:
    """Upstream's tensors, in order, once each (the ensemble lists one output twice)."""
    rows: dict[str, tuple[str, str, list[int], bool]] = {}
    for row in UPSTREAM["models"][model][kind]:
        name, dtype, dims, *optional = row.split()
        rows.setdefault(name, (name, dtype, json.loads(dims), bool(optional)))
    return list(rows.values())


def declared(tensors: object) -> list[tuple[str, str, list[int], bool]]:
    return [
        (t.name, pb.DataType.Name(t.data_type), list(t.dims), bool(getattr(t, "optional", False)))
        for t in tensors  # type: ignore[attr-defined]
    ]


def same(
    ours: list[tuple[str, str, list[int], bool]], theirs: list[tuple[str, str, list[int], bool]]
) -> None:
    assert [t[0] for t in ours] == [t[0] for t in theirs]
    for mine, up in zip(ours, theirs, strict=True):
        if up[1].startswith("${"):
            assert mine[1] in PLACEHOLDER_TYPES, mine
            mine = (mine[0], up[1], mine[2], mine[3])
        assert mine == up


def rendered() -> dict[str, pb.ModelConfig]:
    configs = trtllm_configs(MODEL, 3, "/models/engine", "/models/checkpoint")
    return {folder: parse(render(config)) for folder, config in configs.items()}


def test_trtllm_configs_carry_upstreams_tensors_exactly() -> None:
    configs = rendered()
    names = {"ensemble": MODEL, **{m: m for m in UPSTREAM["models"] if m != "ensemble"}}
    assert set(configs) == set(names.values())
    for model, folder in names.items():
        same(declared(configs[folder].input), upstream(model, "input"))
        same(
            [(n, t, d, False) for n, t, d, _ in declared(configs[folder].output)],
            upstream(model, "output"),
        )
    assert list(configs[MODEL].version_policy.specific.versions) == [3]
    engine = configs["tensorrt_llm"]
    params = {k: v.string_value for k, v in engine.parameters.items()}
    assert engine.backend == "tensorrtllm" and engine.model_transaction_policy.decoupled
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert params["enable_kv_cache_reuse"] == "true"


def test_ensemble_steps_connect_declared_tensors() -> None:
    configs = rendered()
    entry = configs[MODEL]
    produced = {i.name for i in entry.input}
    for step in entry.ensemble_scheduling.step:
        model = configs[step.model_name]
        assert set(step.input_map) <= {i.name for i in model.input}, step.model_name
        assert set(step.output_map) <= {o.name for o in model.output}, step.model_name
        assert set(step.input_map.values()) <= produced, step.model_name  # made earlier
        produced |= set(step.output_map.values())
        required = {i.name for i in model.input if not i.optional}
        assert required <= set(step.input_map), step.model_name
    assert {o.name for o in entry.output} <= produced
    used = {v for step in entry.ensemble_scheduling.step for v in step.input_map.values()}
    assert {i.name for i in entry.input} <= used  # every ensemble input reaches a model


def test_cpu_flavor_declares_a_subset_of_the_ensemble() -> None:
    config = parse(render(cpu_config(MODEL, [1])))
    ensemble = {t[0]: t for t in upstream("ensemble", "input")}
    outputs = {t[0]: t for t in upstream("ensemble", "output")}
    for tensor in declared(config.input):
        assert tensor == ensemble[tensor[0]]
    for name, dtype, dims, _ in declared(config.output):
        assert (name, dtype, dims) == outputs[name][:3]
    required = {name for name, *_, optional in ensemble.values() if not optional}
    assert required == {t[0] for t in declared(config.input) if not t[3]}


def test_build_script_targets_the_checkpoint_workflow() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    dry = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    convert = next(line for line in dry if "convert_checkpoint.py" in line)
    assert "examples/models/core/llama/" in convert and "--model_dir checkpoint" in convert
    build = next(line for line in dry if line.startswith("trtllm-build"))
    for flag in ("--paged_kv_cache enable", "--remove_input_padding enable"):
        assert flag in build
    blocks = build.split("--tokens_per_block ")[1].split()[0]
    assert int(blocks) == load_settings().gateway_kv_block_tokens
    assert any("tensorrt_llm_bls/1/" in line for line in dry)
    wrong = subprocess.run(["bash", str(SCRIPT), "--nope"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "unknown argument" in wrong.stderr


def upstream_request(client_module: object, text: str, stream: bool = True) -> list[object]:
    """An ensemble request as a TensorRT-LLM client writes it, with upstream's types."""
    values = {
        "text_input": ("BYTES", np.array([[text.encode()]], dtype=np.object_)),
        "max_tokens": ("INT32", np.array([[6]], dtype=np.int32)),
        "top_k": ("INT32", np.array([[0]], dtype=np.int32)),
        "top_p": ("FP32", np.array([[1.0]], dtype=np.float32)),
        "temperature": ("FP32", np.array([[0.0]], dtype=np.float32)),
        "seed": ("UINT64", np.array([[3]], dtype=np.uint64)),
        "end_id": ("INT32", np.array([[2]], dtype=np.int32)),
        "exclude_input_in_output": ("BOOL", np.array([[False]], dtype=np.bool_)),
        "return_num_output_tokens": ("BOOL", np.array([[True]], dtype=np.bool_)),
        "stream": ("BOOL", np.array([[stream]], dtype=np.bool_)),
    }
    inputs = []
    for name, (wire, array) in values.items():
        tensor = client_module.InferInput(name, list(array.shape), wire)  # type: ignore[attr-defined]
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def streamed(url: str, inputs: list[object], count: int) -> list[tuple[str, int]]:
    """The first `count` answers (text, output tokens) of a gRPC stream; an error raises."""
    client = grpcclient.InferenceServerClient(url)
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    client.async_stream_infer(MODEL, inputs, model_version="1")
    got = []
    try:
        while len(got) < count:
            result, error = answers.get(timeout=120)
            if error is not None:
                raise error  # type: ignore[misc]
            text = result.as_numpy("text_output").reshape(-1)[0].decode()  # type: ignore[attr-defined]
            got.append((text, int(result.as_numpy("num_output_tokens").reshape(-1)[0])))  # type: ignore[attr-defined]
    finally:
        client.stop_stream()
        client.close()
    return got


def test_grpc_client_with_upstream_types_is_served(served: Served) -> None:
    answers = streamed(served.a.grpc_url, upstream_request(grpcclient, "defmodule A do"), 6)
    assert answers[0][0].startswith("defmodule A do")  # exclude_input_in_output false: echoed
    assert [count for _, count in answers] == [1, 2, 3, 4, 5, 6]
    old = grpcclient.InferInput("max_tokens", [1, 1], "UINT32")  # the contract's old type
    old.set_data_from_numpy(np.array([[6]], dtype=np.uint32))
    text = upstream_request(grpcclient, "x")[0]
    with pytest.raises(InferenceServerException, match="INT32"):
        streamed(served.a.grpc_url, [text, old], 1)


def test_http_client_sees_upstream_types_and_streams(served: Served) -> None:
    client = httpclient.InferenceServerClient(served.a.http_url.removeprefix("http://"))
    metadata = client.get_model_metadata(MODEL, "1")
    ensemble = {name: dtype for name, dtype, _, _ in upstream("ensemble", "input")}
    for tensor in metadata["inputs"]:
        wire = (
            "BYTES" if ensemble[tensor["name"]] == "TYPE_STRING" else ensemble[tensor["name"]][5:]
        )
        assert tensor["datatype"] == wire
    # Triton answers HTTP `infer` on a decoupled model (upstream's and ours) with 501; HTTP
    # clients use its generate extension, which converts JSON to the declared types
    body = {
        "text_input": "defmodule A do",
        "max_tokens": 4,
        "top_k": 0,
        "top_p": 1.0,
        "temperature": 0.0,
        "seed": 3,
        "end_id": 2,
        "exclude_input_in_output": False,
        "return_num_output_tokens": True,
        "stream": True,
    }
    with httpx.stream(
        "POST",
        f"{served.a.http_url}/v2/models/{MODEL}/versions/1/generate_stream",
        json=body,
        timeout=120,
    ) as response:
        events = [
            json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")
        ]
    assert [e["num_output_tokens"] for e in events if "text_output" in e] == [1, 2, 3, 4]
    assert events[0]["text_output"].startswith("defmodule A do")  # echoed, as asked
    client.close()


def test_http_infer_on_the_model_deployed_without_decoupling(served: Served) -> None:
    instance = triton.Instance("triton-http", free_port(), free_port(), free_port())
    triton.start(served.settings, instance, repository(served.settings))
    try:
        triton.load(instance, MODEL, [1], decoupled=False)
        client = httpclient.InferenceServerClient(instance.http_url.removeprefix("http://"))
        config = client.get_model_config(MODEL, "1")
        assert not config.get("model_transaction_policy", {}).get("decoupled", False)
        request = upstream_request(httpclient, "defmodule A do", stream=False)
        result = client.infer(MODEL, request, model_version="1")
        text = result.as_numpy("text_output").reshape(-1)[0].decode()
        assert text.startswith("defmodule A do")  # exclude_input_in_output false: echoed
        assert int(result.as_numpy("num_output_tokens").reshape(-1)[0]) == 6
        answers = streamed(served.a.grpc_url, upstream_request(grpcclient, "defmodule A do"), 6)
        assert text == "".join(piece for piece, _ in answers)  # the decoupled model's stream
        streaming = upstream_request(httpclient, "defmodule A do", stream=True)
        with pytest.raises(InferenceServerException, match="decoupled"):
            client.infer(MODEL, streaming, model_version="1")
        client.close()
    finally:
        triton.stop(served.settings, instance)
