"""The suite's four groups, one per test module, as pytest markers (`pytest -m GROUP`):
the heaviest thing the module's tests do. A test that carries a group marker itself keeps
it. A module in no group stops the run: add it here.

- unit: in-process only (SQLite, the file store, tree-sitter, PyMuPDF, tiny torch models);
- component: a real component in another process or on loopback (the embedded broker,
  moto's S3 server, PostgreSQL, Elixir VMs and the sandbox, the local Hex, GitHub and OSV
  servers, gloo ranks);
- e2e: exforge as a user runs it (the CLI in a subprocess, worker processes over the
  broker, the gateway in front of tritonserver);
- corpus: the ten real libraries of the shared corpus, judged by Elixir's parser or
  made into every candidate conversation.
"""

from __future__ import annotations

import pytest

GROUPS: dict[str, tuple[str, ...]] = {
    "unit": (
        "test_anomaly",
        "test_bench",
        "test_architecture",
        "test_docs",
        "test_eval_generate",
        "test_eval_metrics",
        "test_gateway_guard",
        "test_eval_qa",
        "test_generation",
        "test_neardup",
        "test_schemas",
        "test_sources_archives",
        "test_sources_books",
        "test_suite_rules",
        "test_train_chat",
        "test_train_lora",
        "test_train_model",
        "test_train_packing",
        "test_train_kernels",
        "test_train_loss",
        "test_train_ssr",
    ),
    "component": (
        "test_analysis",
        "test_database",
        "test_dataset",
        "test_deploy",
        "test_eval_benchmarks",
        "test_eval_sandbox",
        "test_filters",
        "test_generators",
        "test_offsets",
        "test_security",
        "test_serving_rollout",
        "test_sources_github",
        "test_stage_logic",
        "test_store",
        "test_train_ddp",
        "test_train_fsdp",
        "test_train_profile",
    ),
    "e2e": (
        "test_backup",
        "test_compress",
        "test_dataset_pipeline",
        "test_dedup_stream",
        "test_eval_cli",
        "test_eval_gate",
        "test_eval_run",
        "test_eval_unisolated",
        "test_inspect",
        "test_openai_client",
        "test_pipeline",
        "test_replay",
        "test_serving_e2e",
        "test_settings",
        "test_sources_hex",
        "test_sources_pipeline",
        "test_stack",
        "test_tracing",
        "test_train_resume",
        "test_triton_contract",
    ),
    "corpus": ("test_corpus", "test_token_counts"),
}
GROUP_OF = {module: group for group, modules in GROUPS.items() for module in modules}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    unplaced = sorted({item.path.name for item in items if item.path.stem not in GROUP_OF})
    if unplaced:
        raise pytest.UsageError(
            f"test modules in no group: {', '.join(unplaced)} (add each to GROUPS in {__file__})"
        )
    for item in items:
        if not any(item.get_closest_marker(group) for group in GROUPS):
            item.add_marker(GROUP_OF[item.path.stem])
