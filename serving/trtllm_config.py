"""The TensorRT-LLM flavor: the five models of TensorRT-LLM's in-flight batching
repository (`triton_backend/all_models/inflight_batcher_llm`), with upstream's tensor
names, data types and dims, rendered for one exported version.

The entry point clients call is the ensemble, named after the served model; its version
folder is the registry version, so `model_version` means the same as on the cpu flavor.
The python models' code (preprocessing, postprocessing, BLS) comes from the Triton image
the engine is built in (`build_engine.sh`), so it matches these configurations.
"""

from __future__ import annotations

from typing import Any

from serving.modelconfig import MAX_BATCH, QUEUE_DELAY_US, Config, params

LOGITS_TYPE = "TYPE_FP32"  # upstream's ${logits_datatype}

PERF_OUTPUTS = tuple(
    f"{name} TYPE_{kind} [1]"
    for name, kind in (
        ("kv_cache_alloc_new_blocks", "INT32"),
        ("kv_cache_reused_blocks", "INT32"),
        ("kv_cache_alloc_total_blocks", "INT32"),
        ("arrival_time_ns", "INT64"),
        ("first_scheduled_time_ns", "INT64"),
        ("first_token_time_ns", "INT64"),
        ("last_token_time_ns", "INT64"),
        ("acceptance_rate", "FP32"),
        ("total_accepted_draft_tokens", "INT32"),
        ("total_draft_tokens", "INT32"),
        ("num_input_tokens", "INT32"),
        ("num_output_tokens", "INT32"),
    )
)
ENTRY_OUTPUTS = (  # the ensemble's and the BLS model's
    "text_output TYPE_STRING [-1]",
    "cum_log_probs TYPE_FP32 [-1]",
    "output_log_probs TYPE_FP32 [-1,-1]",
    "context_logits LOGITS [-1,-1]",
    "generation_logits LOGITS [-1,-1,-1]",
    "batch_index TYPE_INT32 [1]",
    "sequence_index TYPE_INT32 [1]",
    *PERF_OUTPUTS,
)

# Per model: inputs, then outputs, as "name data_type dims [optional] [ragged] [scalar]"
# (ragged: allow_ragged_batch; scalar: reshaped to [], as upstream declares them).
TENSORS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "ensemble": (
        (
            "text_input TYPE_STRING [1]",
            "decoder_text_input TYPE_STRING [1] optional",
            "max_tokens TYPE_INT32 [1]",
            "num_return_sequences TYPE_INT32 [1] optional",
            "bad_words TYPE_STRING [-1] optional",
            "stop_words TYPE_STRING [-1] optional",
            "exclude_input_in_output TYPE_BOOL [1] optional",
            "end_id TYPE_INT32 [1] optional",
            "pad_id TYPE_INT32 [1] optional",
            "top_k TYPE_INT32 [1] optional",
            "top_p TYPE_FP32 [1] optional",
            "temperature TYPE_FP32 [1] optional",
            "length_penalty TYPE_FP32 [1] optional",
            "repetition_penalty TYPE_FP32 [1] optional",
            "min_tokens TYPE_INT32 [1] optional",
            "presence_penalty TYPE_FP32 [1] optional",
            "frequency_penalty TYPE_FP32 [1] optional",
            "seed TYPE_UINT64 [1] optional",
            "return_log_probs TYPE_BOOL [1] optional",
            "return_context_logits TYPE_BOOL [1] optional",
            "return_generation_logits TYPE_BOOL [1] optional",
            "return_perf_metrics TYPE_BOOL [1] optional",
            "return_num_input_tokens TYPE_BOOL [1] optional",
            "return_num_output_tokens TYPE_BOOL [1] optional",
            "beam_width TYPE_INT32 [1] optional",
            "stream TYPE_BOOL [1] optional",
            "prompt_embedding_table TYPE_FP16 [-1,-1] optional",
            "prompt_table_extra_id TYPE_UINT64 [1] optional",
            "prompt_vocab_size TYPE_INT32 [1] optional",
            "embedding_bias_words TYPE_STRING [-1] optional",
            "embedding_bias_weights TYPE_FP32 [-1] optional",
            "lora_task_id TYPE_UINT64 [1] optional",
            "lora_weights TYPE_FP16 [-1,-1] optional ragged",
            "lora_config TYPE_INT32 [-1,3] optional ragged",
            "guided_decoding_guide_type TYPE_STRING [1] optional ragged",
            "guided_decoding_guide TYPE_STRING [1] optional ragged",
        ),
        ENTRY_OUTPUTS,
    ),
    "preprocessing": (
        (
            "QUERY TYPE_STRING [1]",
            "DECODER_QUERY TYPE_STRING [1] optional",
            "IMAGE_BYTES TYPE_UINT8 [-1,-1,-1,-1] optional",
            "IMAGE_URL TYPE_STRING [1] optional",
            "IMAGES TYPE_STRING [-1] optional",
            "VIDEO_BYTES TYPE_UINT8 [-1,-1,-1,-1] optional",
            "REQUEST_OUTPUT_LEN TYPE_INT32 [1]",
            "BAD_WORDS_DICT TYPE_STRING [-1] optional",
            "STOP_WORDS_DICT TYPE_STRING [-1] optional",
            "EMBEDDING_BIAS_WORDS TYPE_STRING [-1] optional",
            "EMBEDDING_BIAS_WEIGHTS TYPE_FP32 [-1] optional",
            "END_ID TYPE_INT32 [1] optional",
            "PAD_ID TYPE_INT32 [1] optional",
            "PROMPT_TABLE_EXTRA_ID TYPE_UINT64 [1] optional",
        ),
        (
            "INPUT_ID TYPE_INT32 [-1]",
            "REQUEST_INPUT_LEN TYPE_INT32 [1]",
            "DECODER_INPUT_ID TYPE_INT32 [-1]",
            "REQUEST_DECODER_INPUT_LEN TYPE_INT32 [1]",
            "BAD_WORDS_IDS TYPE_INT32 [2,-1]",
            "STOP_WORDS_IDS TYPE_INT32 [2,-1]",
            "EMBEDDING_BIAS TYPE_FP32 [-1]",
            "REQUEST_OUTPUT_LEN TYPE_INT32 [-1]",
            "OUT_END_ID TYPE_INT32 [1]",
            "OUT_PAD_ID TYPE_INT32 [1]",
            "OUT_PROMPT_TABLE_EXTRA_IDS TYPE_UINT64 [-1]",
            "PIXEL_VALUES TYPE_FP16 [-1,-1,-1,-1]",
            "ASPECT_RATIO_IDS TYPE_INT64 [-1]",
            "ASPECT_RATIO_MASK TYPE_INT64 [-1,-1]",
            "CROSS_ATTENTION_MASK TYPE_INT64 [-1,-1,-1]",
            "IMAGE_SIZES TYPE_INT64 [-1,2]",
            "IS_VIDEO_INPUT TYPE_BOOL [1]",
            "ATTENTION_MASK TYPE_INT64 [-1]",
            "IMAGE_GRID_THW TYPE_INT64 [3]",
            "VISION_INPUT_ID TYPE_INT32 [-1]",
        ),
    ),
    "tensorrt_llm": (
        (
            "input_ids TYPE_INT32 [-1] optional ragged",
            "encoder_input_features TYPE_FP16 [-1,-1] optional ragged",
            "encoder_output_lengths TYPE_INT32 [1] optional scalar",
            "input_lengths TYPE_INT32 [1] scalar",
            "request_output_len TYPE_INT32 [1] scalar",
            "num_return_sequences TYPE_INT32 [1] optional scalar",
            "draft_input_ids TYPE_INT32 [-1] optional ragged",
            "decoder_input_ids TYPE_INT32 [-1] optional ragged",
            "decoder_input_lengths TYPE_INT32 [1] optional scalar",
            "draft_logits LOGITS [-1,-1] optional ragged",
            "draft_acceptance_threshold TYPE_FP32 [1] optional scalar",
            "end_id TYPE_INT32 [1] optional scalar",
            "pad_id TYPE_INT32 [1] optional scalar",
            "stop_words_list TYPE_INT32 [2,-1] optional ragged",
            "bad_words_list TYPE_INT32 [2,-1] optional ragged",
            "embedding_bias TYPE_FP32 [-1] optional ragged",
            "beam_width TYPE_INT32 [1] optional scalar",
            "temperature TYPE_FP32 [1] optional scalar",
            "runtime_top_k TYPE_INT32 [1] optional scalar",
            "runtime_top_p TYPE_FP32 [1] optional scalar",
            "runtime_top_p_min TYPE_FP32 [1] optional scalar",
            "runtime_top_p_decay TYPE_FP32 [1] optional scalar",
            "runtime_top_p_reset_ids TYPE_INT32 [1] optional scalar",
            "len_penalty TYPE_FP32 [1] optional scalar",
            "early_stopping TYPE_BOOL [1] optional scalar",
            "repetition_penalty TYPE_FP32 [1] optional scalar",
            "min_tokens TYPE_INT32 [1] optional scalar",
            "beam_search_diversity_rate TYPE_FP32 [1] optional scalar",
            "presence_penalty TYPE_FP32 [1] optional scalar",
            "frequency_penalty TYPE_FP32 [1] optional scalar",
            "seed TYPE_UINT64 [1] optional scalar",
            "return_log_probs TYPE_BOOL [1] optional scalar",
            "return_context_logits TYPE_BOOL [1] optional scalar",
            "return_generation_logits TYPE_BOOL [1] optional scalar",
            "return_perf_metrics TYPE_BOOL [1] optional scalar",
            "return_num_input_tokens TYPE_BOOL [1] optional scalar",
            "return_num_output_tokens TYPE_BOOL [1] optional scalar",
            "exclude_input_in_output TYPE_BOOL [1] optional scalar",
            "stop TYPE_BOOL [1] optional scalar",
            "streaming TYPE_BOOL [1] optional scalar",
            "prompt_embedding_table TYPE_FP16 [-1,-1] optional ragged",
            "prompt_table_extra_ids TYPE_UINT64 [-1] optional ragged",
            "prompt_vocab_size TYPE_INT32 [1] optional scalar",
            "cross_attention_mask TYPE_BOOL [-1,-1] optional ragged",
            "mrope_rotary_cos_sin TYPE_FP32 [-1] optional",
            "mrope_position_deltas TYPE_INT64 [1] optional",
            "lora_task_id TYPE_UINT64 [1] optional scalar",
            "lora_weights TYPE_FP16 [-1,-1] optional ragged",
            "lora_config TYPE_INT32 [-1,3] optional ragged",
            "context_phase_params TYPE_UINT8 [-1] optional ragged",
            "skip_cross_attn_blocks TYPE_BOOL [1] optional ragged",
            "retention_token_range_starts TYPE_INT32 [-1] optional ragged",
            "retention_token_range_ends TYPE_INT32 [-1] optional ragged",
            "retention_token_range_priorities TYPE_INT32 [-1] optional ragged",
            "retention_token_range_durations_ms TYPE_INT32 [-1] optional ragged",
            "retention_decode_priority TYPE_INT32 [1] optional ragged",
            "retention_decode_duration_ms TYPE_INT32 [1] optional ragged",
            "guided_decoding_guide_type TYPE_STRING [1] optional ragged",
            "guided_decoding_guide TYPE_STRING [1] optional ragged",
            "lookahead_window_size TYPE_INT32 [1] optional ragged",
            "lookahead_ngram_size TYPE_INT32 [1] optional ragged",
            "lookahead_verification_set_size TYPE_INT32 [1] optional ragged",
        ),
        (
            "output_ids TYPE_INT32 [-1,-1]",
            "sequence_length TYPE_INT32 [-1]",
            "cum_log_probs TYPE_FP32 [-1]",
            "output_log_probs TYPE_FP32 [-1,-1]",
            "context_logits LOGITS [-1,-1]",
            "generation_logits LOGITS [-1,-1,-1]",
            "batch_index TYPE_INT32 [1]",
            "sequence_index TYPE_INT32 [1]",
            "context_phase_params TYPE_UINT8 [-1]",
            *PERF_OUTPUTS,
        ),
    ),
    "postprocessing": (
        (
            "TOKENS_BATCH TYPE_INT32 [-1,-1]",
            "SEQUENCE_LENGTH TYPE_INT32 [-1]",
        ),
        ("OUTPUT TYPE_STRING [-1]",),
    ),
    "tensorrt_llm_bls": (
        (
            "text_input TYPE_STRING [1]",
            "decoder_text_input TYPE_STRING [1] optional",
            "image_input TYPE_FP16 [-1,3,-1,-1] optional",
            "image_bytes_input TYPE_UINT8 [-1,-1,-1,-1] optional",
            "image_url_input TYPE_STRING [1] optional",
            "video_bytes_input TYPE_UINT8 [-1,-1,-1,-1] optional",
            "max_tokens TYPE_INT32 [1]",
            "bad_words TYPE_STRING [-1] optional",
            "stop_words TYPE_STRING [-1] optional",
            "exclude_input_in_output TYPE_BOOL [1] optional",
            "end_id TYPE_INT32 [1] optional",
            "pad_id TYPE_INT32 [1] optional",
            "top_k TYPE_INT32 [1] optional",
            "top_p TYPE_FP32 [1] optional",
            "temperature TYPE_FP32 [1] optional",
            "length_penalty TYPE_FP32 [1] optional",
            "repetition_penalty TYPE_FP32 [1] optional",
            "min_tokens TYPE_INT32 [1] optional",
            "presence_penalty TYPE_FP32 [1] optional",
            "frequency_penalty TYPE_FP32 [1] optional",
            "seed TYPE_UINT64 [1] optional",
            "return_log_probs TYPE_BOOL [1] optional scalar",
            "return_context_logits TYPE_BOOL [1] optional scalar",
            "return_generation_logits TYPE_BOOL [1] optional scalar",
            "num_return_sequences TYPE_INT32 [1] optional scalar",
            "beam_width TYPE_INT32 [1] optional",
            "stream TYPE_BOOL [1] optional",
            "prompt_embedding_table TYPE_FP16 [-1,-1] optional",
            "prompt_vocab_size TYPE_INT32 [1] optional",
            "prompt_table_extra_id TYPE_UINT64 [1] optional",
            "embedding_bias_words TYPE_STRING [-1] optional",
            "embedding_bias_weights TYPE_FP32 [-1] optional",
            "num_draft_tokens TYPE_INT32 [1] optional",
            "use_draft_logits TYPE_BOOL [1] optional scalar",
            "lora_task_id TYPE_UINT64 [1] optional scalar",
            "lora_weights TYPE_FP16 [-1,-1] optional ragged",
            "lora_config TYPE_INT32 [-1,3] optional ragged",
            "return_perf_metrics TYPE_BOOL [1] optional scalar",
            "return_num_input_tokens TYPE_BOOL [1] optional scalar",
            "return_num_output_tokens TYPE_BOOL [1] optional scalar",
            "guided_decoding_guide_type TYPE_STRING [1] optional",
            "guided_decoding_guide TYPE_STRING [1] optional",
        ),
        ENTRY_OUTPUTS,
    ),
}

# The ensemble's steps: each model's inputs from the ensemble's tensors (or an earlier
# step's outputs, `_`-prefixed), and where each output goes.
PREPROCESS_IN = {
    "QUERY": "text_input",
    "DECODER_QUERY": "decoder_text_input",
    "REQUEST_OUTPUT_LEN": "max_tokens",
    "BAD_WORDS_DICT": "bad_words",
    "STOP_WORDS_DICT": "stop_words",
    "EMBEDDING_BIAS_WORDS": "embedding_bias_words",
    "EMBEDDING_BIAS_WEIGHTS": "embedding_bias_weights",
    "END_ID": "end_id",
    "PAD_ID": "pad_id",
    "PROMPT_TABLE_EXTRA_ID": "prompt_table_extra_id",
}
PREPROCESS_OUT = {
    "REQUEST_INPUT_LEN": "_REQUEST_INPUT_LEN",
    "INPUT_ID": "_INPUT_ID",
    "REQUEST_DECODER_INPUT_LEN": "_REQUEST_DECODER_INPUT_LEN",
    "DECODER_INPUT_ID": "_DECODER_INPUT_ID",
    "REQUEST_OUTPUT_LEN": "_REQUEST_OUTPUT_LEN",
    "STOP_WORDS_IDS": "_STOP_WORDS_IDS",
    "BAD_WORDS_IDS": "_BAD_WORDS_IDS",
    "EMBEDDING_BIAS": "_EMBEDDING_BIAS",
    "OUT_END_ID": "_PREPROCESSOR_END_ID",
    "OUT_PAD_ID": "_PREPROCESSOR_PAD_ID",
    "OUT_PROMPT_TABLE_EXTRA_IDS": "_OUT_PROMPT_TABLE_EXTRA_IDS",
}
ENGINE_IN = {
    "input_ids": "_INPUT_ID",
    "decoder_input_ids": "_DECODER_INPUT_ID",
    "input_lengths": "_REQUEST_INPUT_LEN",
    "decoder_input_lengths": "_REQUEST_DECODER_INPUT_LEN",
    "exclude_input_in_output": "exclude_input_in_output",
    "request_output_len": "_REQUEST_OUTPUT_LEN",
    "end_id": "_PREPROCESSOR_END_ID",
    "pad_id": "_PREPROCESSOR_PAD_ID",
    "embedding_bias": "_EMBEDDING_BIAS",
    "runtime_top_k": "top_k",
    "runtime_top_p": "top_p",
    "temperature": "temperature",
    "len_penalty": "length_penalty",
    "repetition_penalty": "repetition_penalty",
    "min_tokens": "min_tokens",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "seed": "seed",
    "return_log_probs": "return_log_probs",
    "return_context_logits": "return_context_logits",
    "return_generation_logits": "return_generation_logits",
    "return_perf_metrics": "return_perf_metrics",
    "return_num_input_tokens": "return_num_input_tokens",
    "return_num_output_tokens": "return_num_output_tokens",
    "num_return_sequences": "num_return_sequences",
    "beam_width": "beam_width",
    "streaming": "stream",
    "prompt_embedding_table": "prompt_embedding_table",
    "prompt_vocab_size": "prompt_vocab_size",
    "stop_words_list": "_STOP_WORDS_IDS",
    "bad_words_list": "_BAD_WORDS_IDS",
    "prompt_table_extra_ids": "_OUT_PROMPT_TABLE_EXTRA_IDS",
    "lora_task_id": "lora_task_id",
    "lora_weights": "lora_weights",
    "lora_config": "lora_config",
    "guided_decoding_guide_type": "guided_decoding_guide_type",
    "guided_decoding_guide": "guided_decoding_guide",
}
ENGINE_PASSED_OUT = [row.split()[0] for row in ENTRY_OUTPUTS[1:]]  # returned as they are


def tensor(row: str, output: bool) -> Config:
    """One `input`/`output` entry from its table row."""
    name, dtype, dims, *flags = row.split()
    entry: Config = {
        "name": name,
        "data_type": LOGITS_TYPE if dtype == "LOGITS" else dtype,
        "dims": [int(d) for d in dims.strip("[]").split(",")],
    }
    if output:
        return entry
    if "optional" in flags:
        entry["optional"] = True
    if "ragged" in flags:
        entry["allow_ragged_batch"] = True
    if "scalar" in flags:
        entry["reshape"] = {"shape": []}
    return entry


def io(model: str) -> Config:
    inputs, outputs = TENSORS[model]
    return {
        "input": [tensor(row, False) for row in inputs],
        "output": [tensor(row, True) for row in outputs],
    }


def _step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> Config:
    return {"model_name": model, "model_version": -1, "input_map": inputs, "output_map": outputs}


def ensemble(name: str, version: int) -> Config:
    """The entry point: preprocessing → tensorrt_llm → postprocessing."""
    engine_out = {"output_ids": "_TOKENS_BATCH", "sequence_length": "_SEQUENCE_LENGTH"}
    return {
        "name": name,
        "platform": "ensemble",
        "max_batch_size": MAX_BATCH,
        **io("ensemble"),
        "version_policy": {"specific": {"versions": [version]}},
        "ensemble_scheduling": {
            "step": [
                _step("preprocessing", PREPROCESS_IN, PREPROCESS_OUT),
                _step("tensorrt_llm", ENGINE_IN, engine_out | {o: o for o in ENGINE_PASSED_OUT}),
                _step(
                    "postprocessing",
                    {"TOKENS_BATCH": "_TOKENS_BATCH", "SEQUENCE_LENGTH": "_SEQUENCE_LENGTH"},
                    {"OUTPUT": "text_output"},
                ),
            ]
        },
    }


def trtllm_configs(
    name: str, version: int, engine_dir: str, tokenizer_dir: str
) -> dict[str, Config]:
    """The five models of one version's repository, by folder name."""
    cpu = [{"kind": "KIND_CPU", "count": 4}]
    batching: dict[str, Any] = {
        "preferred_batch_size": [MAX_BATCH],
        "max_queue_delay_microseconds": QUEUE_DELAY_US,
    }
    return {
        name: ensemble(name, version),
        "preprocessing": {
            "name": "preprocessing",
            "backend": "python",
            "max_batch_size": MAX_BATCH,
            "dynamic_batching": batching,
            **io("preprocessing"),
            "instance_group": cpu,
            "parameters": params({"tokenizer_dir": tokenizer_dir, "add_special_tokens": True}),
        },
        "tensorrt_llm": {
            "name": "tensorrt_llm",
            "backend": "tensorrtllm",
            "max_batch_size": MAX_BATCH,
            "model_transaction_policy": {"decoupled": True},
            "dynamic_batching": batching,
            **io("tensorrt_llm"),
            "instance_group": [{"kind": "KIND_CPU", "count": 1}],  # the backend owns the GPUs
            "parameters": params(
                {
                    "gpt_model_type": "inflight_fused_batching",  # upstream's batching_strategy
                    "gpt_model_path": engine_dir,
                    "tokenizer_dir": tokenizer_dir,
                    "max_beam_width": 1,
                    "batch_scheduler_policy": "guaranteed_no_evict",
                    "kv_cache_free_gpu_mem_fraction": 0.9,
                    "enable_kv_cache_reuse": True,
                    "exclude_input_in_output": True,
                    "enable_chunked_context": True,
                    "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
                }
            ),
        },
        "postprocessing": {
            "name": "postprocessing",
            "backend": "python",
            "max_batch_size": MAX_BATCH,
            "dynamic_batching": {},
            **io("postprocessing"),
            "instance_group": cpu,
            "parameters": params({"tokenizer_dir": tokenizer_dir, "skip_special_tokens": True}),
        },
        "tensorrt_llm_bls": {
            "name": "tensorrt_llm_bls",
            "backend": "python",
            "max_batch_size": MAX_BATCH,
            "model_transaction_policy": {"decoupled": True},
            **io("tensorrt_llm_bls"),
            "instance_group": cpu,
            "parameters": params(
                {"tensorrt_llm_model_name": "tensorrt_llm", "accumulate_tokens": False}
            ),
        },
    }
