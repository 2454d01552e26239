"""QLoRA: NF4 base frozen bit for bit, gradients only on adapters."""

from __future__ import annotations

from pathlib import Path

import torch

from exforge.llm.chat import encode, load_tokenizer
from exforge.llm.lora import LoraSettings, apply_lora, trainable
from exforge.llm.model import load_model
from tests.support.shards import synthetic_samples
from workers.trainer.loss import forward_losses
from workers.trainer.packing import collate, pack


def test_base_frozen_adapters_train(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = apply_lora(load_model("tiny", "nf4", tmp_path), LoraSettings(rank=4))
    base_before = {
        k: v.clone() for k, v in model.get_base_model().state_dict().items() if ".lora_" not in k
    }
    tokenizer = load_tokenizer()
    batch = collate(
        pack([encode(tokenizer, s["conversations"]) for s in synthetic_samples(2, 8)], 128)
    )
    adapters = trainable(model)
    adapters_before = {name: p.detach().clone() for name, p in adapters.items()}
    optimizer = torch.optim.AdamW(adapters.values(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        loss = forward_losses(model, batch).sum()
        loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad and all(".lora_" in n for n in with_grad)
        optimizer.step()
    assert all(".lora_" in name for name in adapters)
    unchanged = [n for n, p in adapters.items() if torch.equal(p.detach(), adapters_before[n])]
    assert unchanged == [], "adapters that did not train"
    after = model.get_base_model().state_dict()
    for name, tensor in base_before.items():
        assert torch.equal(tensor, after[name]), name
