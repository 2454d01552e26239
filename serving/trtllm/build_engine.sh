#!/usr/bin/env bash
# Build the TensorRT-LLM engine of one exported version and complete its repository.
#
# Run inside the Triton image with the TensorRT-LLM backend (same tag as in
# docker-compose.yml, e.g. nvcr.io/nvidia/tritonserver:25.08-trtllm-python-py3), on the
# GPU that will serve it, from the exported version folder
# (`exforge serve export NAME VERSION --flavor trtllm` writes it):
#
#   docker run --rm --gpus all -v "$PWD":/models -w /models \
#       nvcr.io/nvidia/tritonserver:25.08-trtllm-python-py3 bash build_engine.sh
#
# Steps: convert the merged Hugging Face checkpoint (checkpoint/) to a TensorRT-LLM
# checkpoint, build the engine with paged KV cache and in-flight batching support
# (engine/), and copy the model.py files of preprocessing, postprocessing and the BLS
# entry point from the image's inflight_batcher_llm templates into repository/.
# Then serve it: tritonserver --model-repository=/models/repository
set -euo pipefail

MODELS_DIR=${MODELS_DIR:-/models}
TEMPLATES=${TEMPLATES:-/app/all_models/inflight_batcher_llm}
LLAMA_EXAMPLE=${LLAMA_EXAMPLE:-/app/examples/llama}  # Mistral uses the Llama converter
DTYPE=${DTYPE:-bfloat16}
MAX_BATCH_SIZE=${MAX_BATCH_SIZE:-8}
MAX_INPUT_LEN=${MAX_INPUT_LEN:-8192}
MAX_SEQ_LEN=${MAX_SEQ_LEN:-16384}
TP_SIZE=${TP_SIZE:-1}

cd "$MODELS_DIR"
python3 "$LLAMA_EXAMPLE/convert_checkpoint.py" \
    --model_dir checkpoint --output_dir trtllm-checkpoint --dtype "$DTYPE" --tp_size "$TP_SIZE"
trtllm-build \
    --checkpoint_dir trtllm-checkpoint --output_dir engine \
    --gemm_plugin auto --gpt_attention_plugin auto \
    --paged_kv_cache enable --use_paged_context_fmha enable \
    --max_batch_size "$MAX_BATCH_SIZE" --max_input_len "$MAX_INPUT_LEN" \
    --max_seq_len "$MAX_SEQ_LEN"

ENTRY=$(find repository -mindepth 1 -maxdepth 1 -type d \
    ! -name preprocessing ! -name postprocessing ! -name tensorrt_llm -printf '%f\n')
cp "$TEMPLATES/preprocessing/1/model.py" repository/preprocessing/1/model.py
cp "$TEMPLATES/postprocessing/1/model.py" repository/postprocessing/1/model.py
cp -r "$TEMPLATES/tensorrt_llm_bls/1/." "repository/$ENTRY/1/"
echo "engine in $MODELS_DIR/engine; serve with: tritonserver --model-repository=$MODELS_DIR/repository"
