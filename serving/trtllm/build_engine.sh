#!/usr/bin/env bash
# Build the TensorRT-LLM engine of one exported version and complete its repository.
#
# Run inside the Triton image with the TensorRT-LLM backend (the tag docker-compose.yml
# uses, nvcr.io/nvidia/tritonserver:25.08-trtllm-python-py3), on the GPU that will serve
# it, from the exported version folder (`exforge serve export NAME VERSION --flavor trtllm`
# writes it):
#
#   docker run --rm --gpus all -v "$PWD":/models -w /models \
#       nvcr.io/nvidia/tritonserver:25.08-trtllm-python-py3 bash build_engine.sh
#
# TensorRT-LLM's checkpoint workflow: convert the merged Hugging Face checkpoint
# (checkpoint/; Mistral models use the Llama converter, examples/models/core/llama) to a
# TensorRT-LLM checkpoint, then `trtllm-build` an engine with a paged KV cache, packed
# (padding-free) inputs and paged context attention, which in-flight batching needs, and
# KV blocks of KV_BLOCK_TOKENS tokens (the gateway's EXFORGE_GATEWAY_KV_BLOCK_TOKENS).
# Then the python models' code (preprocessing, postprocessing, BLS) is copied from the
# image's inflight_batcher_llm templates, which the exported configs follow.
#
#   bash build_engine.sh --dry-run   # print the commands instead of running them
#
# Then serve it: tritonserver --model-repository=/models/repository
set -euo pipefail

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }
DRY_RUN=false
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=true ;;
        -h | --help) usage; exit 0 ;;
        *) echo "build_engine.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
    esac
done

MODELS_DIR=${MODELS_DIR:-/models}
TRTLLM_DIR=${TRTLLM_DIR:-/app/tensorrt_llm}
CONVERTER=${CONVERTER:-$TRTLLM_DIR/examples/models/core/llama/convert_checkpoint.py}
TEMPLATES=${TEMPLATES:-/app/all_models/inflight_batcher_llm}
DTYPE=${DTYPE:-bfloat16}
TP_SIZE=${TP_SIZE:-1}
MAX_BATCH_SIZE=${MAX_BATCH_SIZE:-8}
MAX_INPUT_LEN=${MAX_INPUT_LEN:-8192}
MAX_SEQ_LEN=${MAX_SEQ_LEN:-16384}
MAX_NUM_TOKENS=${MAX_NUM_TOKENS:-16384}
KV_BLOCK_TOKENS=${KV_BLOCK_TOKENS:-32}

run() {
    if [ "$DRY_RUN" = true ]; then
        printf '%q ' "$@"
        printf '\n'
    else
        "$@"
    fi
}

run cd "$MODELS_DIR"
run python3 "$CONVERTER" \
    --model_dir checkpoint --output_dir trtllm-checkpoint --dtype "$DTYPE" --tp_size "$TP_SIZE"
run trtllm-build \
    --checkpoint_dir trtllm-checkpoint --output_dir engine \
    --gemm_plugin auto --gpt_attention_plugin auto \
    --paged_kv_cache enable --remove_input_padding enable --use_paged_context_fmha enable \
    --tokens_per_block "$KV_BLOCK_TOKENS" \
    --max_batch_size "$MAX_BATCH_SIZE" --max_input_len "$MAX_INPUT_LEN" \
    --max_seq_len "$MAX_SEQ_LEN" --max_num_tokens "$MAX_NUM_TOKENS"
run cp "$TEMPLATES/preprocessing/1/model.py" repository/preprocessing/1/model.py
run cp "$TEMPLATES/postprocessing/1/model.py" repository/postprocessing/1/model.py
run cp -r "$TEMPLATES/tensorrt_llm_bls/1/." repository/tensorrt_llm_bls/1/
echo "engine in $MODELS_DIR/engine; serve with: tritonserver --model-repository=$MODELS_DIR/repository"
