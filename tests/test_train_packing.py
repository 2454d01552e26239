"""Packing: a packed batch gives every sample exactly the loss it has alone."""

from __future__ import annotations

import torch
from transformers import MistralForCausalLM

from exforge.llm.chat import IGNORE, encode, load_tokenizer
from exforge.llm.model import preset_config
from tests.support.shards import synthetic_samples
from workers.trainer.loss import forward_losses
from workers.trainer.packing import collate, pack


def test_packed_per_sample_loss_equals_unpacked() -> None:
    tokenizer = load_tokenizer()
    samples = [encode(tokenizer, s["conversations"]) for s in synthetic_samples(3, 6)]
    torch.manual_seed(0)
    model = MistralForCausalLM(preset_config("tiny")).eval()
    packs = pack(samples, 128)
    assert len(packs) < len(samples)  # several samples share a sequence
    batch = collate(packs)
    with torch.no_grad():
        losses = forward_losses(model, batch)
        for index, sample in enumerate(samples):
            mine = batch["sample_index"] == index
            packed = losses[mine].sum() / (batch["targets"][mine] != IGNORE).sum()
            alone = collate(pack([sample], len(sample.input_ids)))
            single = forward_losses(model, alone).sum() / (alone["targets"] != IGNORE).sum()
            torch.testing.assert_close(packed, single, rtol=1e-5, atol=1e-5)
