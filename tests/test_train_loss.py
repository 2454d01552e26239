"""The chunked output-head loss: equal to the full-logits loss, distillation exactly as
written by hand, and a distilled run whose loss falls."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import MistralForCausalLM

from exforge.core.settings import load_settings
from exforge.core.store import FileStore
from exforge.llm.chat import IGNORE, encode, load_tokenizer
from exforge.llm.lora import LoraSettings, apply_lora, trainable
from exforge.llm.model import materialise_preset, preset_config
from tests.support.shards import synthetic_samples, write_split
from workers.trainer.loss import Teacher, forward_losses, head_losses, token_losses
from workers.trainer.packing import collate, pack
from workers.trainer.recipe import DistillConfig, Recipe, StageConfig, TrainConfig


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    base = MistralForCausalLM(preset_config("tiny", num_hidden_layers=2, vocab_size=512))
    model = apply_lora(base, LoraSettings(rank=4))
    for name, param in trainable(model).items():  # trained adapters: B no longer zero
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return model


def batch_of(vocab: int) -> dict[str, torch.Tensor]:
    tokenizer = load_tokenizer()
    samples = [encode(tokenizer, s["conversations"]) for s in synthetic_samples(2, 6)]
    batch = collate(pack(samples, 96))
    batch["input_ids"] %= vocab
    batch["targets"] = torch.where(batch["targets"] == IGNORE, IGNORE, batch["targets"] % vocab)
    return batch


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_chunked_loss_equals_the_full_logits_loss(chunk: int) -> None:
    model, batch = small_model(), batch_of(512)
    reference = token_losses(
        model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits,
        batch["targets"],
    )
    reference.sum().backward()
    expected = {n: p.grad.clone() for n, p in trainable(model).items()}  # type: ignore[union-attr]
    model.zero_grad()
    chunked = forward_losses(model, batch, chunk=chunk)
    chunked.sum().backward()
    torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-5)
    assert bool((chunked[batch["targets"] == IGNORE] == 0).all())
    for name, param in trainable(model).items():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-3, atol=1e-5)


def test_distillation_loss_on_hand_computed_logits() -> None:
    """Vocabulary of 3, an identity head: the hidden states are the logits."""
    student = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    teacher_logits = torch.tensor([[math.log(2), 0.0, 0.0]])
    eye, target = torch.eye(3), torch.tensor([0])
    ce = math.log(3)  # uniform student, target 0
    # T = 1: teacher (1/2, 1/4, 1/4) against a uniform student.
    kl_1 = 0.5 * math.log(1.5) + 0.5 * math.log(0.75)
    # T = 2: teacher ∝ (√2, 1, 1); the T² factor keeps gradients at the CE's scale.
    p = [math.sqrt(2) / (2 + math.sqrt(2)), 1 / (2 + math.sqrt(2)), 1 / (2 + math.sqrt(2))]
    kl_2 = 4 * sum(q * math.log(3 * q) for q in p)
    for t, kl in ((1.0, kl_1), (2.0, kl_2)):
        teacher = Teacher(teacher_logits, eye, t, alpha=0.5)
        loss = head_losses(student, eye, target, teacher)
        assert float(loss) == pytest.approx(0.5 * ce + 0.5 * kl, abs=1e-6)
    only_kd = head_losses(student, eye, target, Teacher(teacher_logits, eye, 2.0, alpha=1.0))
    only_kd.sum().backward()
    # d/dz of T²·KL at a uniform student: T·(1/3 - p_teacher).
    expected = [2 * (1 / 3 - q) for q in p]
    torch.testing.assert_close(student.grad, torch.tensor([expected]), rtol=1e-5, atol=1e-6)


def test_distillation_gradients_match_autograd_through_full_logits() -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, generator=generator, dtype=torch.float64)
    teacher_hidden = torch.randn(10, 6, generator=generator, dtype=torch.float64)
    teacher_weight = torch.randn(50, 6, generator=generator, dtype=torch.float64)
    targets = torch.randint(50, (10,), generator=generator)
    t, alpha = 2.0, 0.3
    logits, teacher_logits = hidden @ weight.T, teacher_hidden @ teacher_weight.T
    kl = torch.nn.functional.kl_div(
        torch.log_softmax(logits / t, -1),
        torch.log_softmax(teacher_logits / t, -1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    weights = torch.rand(10, generator=generator, dtype=torch.float64)
    reference = (1 - alpha) * ce + alpha * t * t * kl
    (reference * weights).sum().backward()
    expected = hidden.grad.clone()  # type: ignore[union-attr]
    hidden.grad = None
    teacher = Teacher(teacher_hidden, teacher_weight, t, alpha)
    mine = head_losses(hidden, weight, targets, teacher, chunk=3)
    (mine * weights).sum().backward()
    torch.testing.assert_close(mine.double(), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad, expected, rtol=1e-4, atol=1e-6)


def test_a_distilled_run_learns_from_its_teacher(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "data")
    store = FileStore(tmp_path / "data" / "store")
    write_split(store, "elixir", 1, "train", synthetic_samples(1, 24), 8)
    write_split(store, "elixir", 1, "validation", synthetic_samples(1, 4, 1), 8)
    teacher = materialise_preset("tiny", tmp_path / "teacher", seed=1)
    config = TrainConfig(
        run_id="distilled",
        seq_len=128,
        batch_size=2,
        validate_every=0,
        fisher_samples=0,
        register_as=None,
        stages=[StageConfig(stage=1, steps=6, learning_rate=1e-2)],
        lora=LoraSettings(rank=4),
        distill=DistillConfig(teacher=str(teacher), temperature=2.0, alpha=0.9),
    )
    losses = Recipe(config, settings, store).run()["losses"]
    assert len(losses) == 6 and losses[-1] < losses[0]
