"""Model loading: presets, Mistral's native format round trip, quantisation report."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import MistralForCausalLM

from exforge.llm.model import (
    PRESETS,
    TEKKEN_VOCAB,
    load_config,
    native_to_hf_dir,
    preset_config,
    quantisation_report,
    save_native,
)


def test_presets_are_devstral_shaped() -> None:
    big, tiny = load_config("devstral-small"), load_config("tiny")
    assert (big.num_hidden_layers, big.hidden_size, big.num_key_value_heads) == (40, 5120, 8)
    assert big.vocab_size == tiny.vocab_size == TEKKEN_VOCAB
    assert set(PRESETS) == {"tiny", "devstral-small"}


def test_native_format_round_trip_keeps_weights_and_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MistralForCausalLM(preset_config("tiny")).eval()
    save_native(model, tmp_path / "native")
    assert load_config(str(tmp_path / "native")).hidden_size == model.config.hidden_size
    back = MistralForCausalLM.from_pretrained(
        native_to_hf_dir(tmp_path / "native", tmp_path / "hf")
    )
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, back.eval()(input_ids=ids).logits)


def test_quantisation_report_nf4_saves_bytes_int8_is_closer() -> None:
    torch.manual_seed(0)
    model = MistralForCausalLM(preset_config("tiny"))
    nf4, int8 = quantisation_report(model, "nf4"), quantisation_report(model, "int8")
    assert len(nf4) == len(int8) == 7 * model.config.num_hidden_layers
    assert all(row.bytes_saved > 0 and row.max_abs_error >= row.mean_abs_error for row in nf4)
    mean = lambda rows: sum(r.mean_abs_error for r in rows) / len(rows)  # noqa: E731
    assert 0 < mean(int8) < mean(nf4)
