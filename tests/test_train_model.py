"""Model loading: presets and Mistral's native format round trip."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import MistralForCausalLM

from exforge.llm.model import (
    PRESETS,
    TEKKEN_VOCAB,
    config_from_params,
    native_to_hf_dir,
    preset_config,
)
from tests.support.native import save_native


def test_presets_are_devstral_shaped() -> None:
    big, tiny = preset_config("devstral-small"), preset_config("tiny")
    assert (big.num_hidden_layers, big.hidden_size, big.num_key_value_heads) == (40, 5120, 8)
    assert big.vocab_size == tiny.vocab_size == TEKKEN_VOCAB
    assert set(PRESETS) == {"tiny", "devstral-small"}


def test_native_format_round_trip_keeps_weights_and_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MistralForCausalLM(preset_config("tiny")).eval()
    save_native(model, tmp_path / "native")
    params = json.loads((tmp_path / "native" / "params.json").read_text())
    assert config_from_params(params).hidden_size == model.config.hidden_size
    back = MistralForCausalLM.from_pretrained(
        native_to_hf_dir(tmp_path / "native", tmp_path / "hf")
    )
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, back.eval()(input_ids=ids).logits)
