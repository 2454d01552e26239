"""Sample packing: several conversations per fixed-length sequence, none seeing another.

Each packed sequence restarts `position_ids` at 0 for every sample; transformers turns
those restarts into a block-diagonal causal mask (varlen kernels with flash attention),
so a packed batch trains exactly like the samples one by one, without padding waste.
Targets are shifted here, per sample, so no sample is asked to predict its neighbour.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from exforge.llm.chat import IGNORE, Encoded

PAD_ID = 11  # Tekken's <pad>


@dataclass(frozen=True)
class Pack:
    """One fixed-length sequence: ids, next-token targets, positions, sample number."""

    input_ids: list[int]
    targets: list[int]
    position_ids: list[int]
    sample_index: list[int]  # -1 on padding


def shifted_targets(sample: Encoded) -> list[int]:
    """targets[t] = labels[t + 1]: what position t must predict, within the sample."""
    return [*sample.labels[1:], IGNORE]


def pack(samples: Iterable[Encoded], seq_len: int) -> list[Pack]:
    """Fill sequences greedily in the given order (deterministic: resume depends on it).

    A sample longer than `seq_len` is truncated; one without any trained token left is
    dropped, as it could only dilute the batch.
    """
    packs: list[Pack] = []
    ids: list[int] = []
    targets: list[int] = []
    positions: list[int] = []
    owners: list[int] = []
    for number, sample in enumerate(samples):
        length = min(len(sample.input_ids), seq_len)
        sample_targets = shifted_targets(sample)[:length]
        if all(t == IGNORE for t in sample_targets):
            continue
        if len(ids) + length > seq_len:
            packs.append(_close(ids, targets, positions, owners, seq_len))
            ids, targets, positions, owners = [], [], [], []
        ids += sample.input_ids[:length]
        targets += sample_targets
        positions += range(length)
        owners += [number] * length
    if ids:
        packs.append(_close(ids, targets, positions, owners, seq_len))
    return packs


def padding(seq_len: int) -> Pack:
    """A sequence of padding only: it trains and weighs nothing (see `Recipe.lockstep`)."""
    return _close([], [], [], [], seq_len)


def _close(
    ids: list[int], targets: list[int], positions: list[int], owners: list[int], seq_len: int
) -> Pack:
    pad = seq_len - len(ids)
    return Pack(
        ids + [PAD_ID] * pad,
        targets + [IGNORE] * pad,
        positions + list(range(pad)),
        owners + [-1] * pad,
    )


def collate(packs: Sequence[Pack]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.tensor([p.input_ids for p in packs]),
        "targets": torch.tensor([p.targets for p in packs]),
        "position_ids": torch.tensor([p.position_ids for p in packs]),
        "sample_index": torch.tensor([p.sample_index for p in packs]),
    }
