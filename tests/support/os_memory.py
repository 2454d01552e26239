"""Peak memory of one training step as the operating system sees it (Linux, glibc).

    python tests/support/os_memory.py EVERY...

glibc is told to serve every block of 64 KiB or more with its own mapping, given back on
free, so the resident set's high-water mark (VmHWM, reset through /proc/self/clear_refs)
rises with what a step holds at once, not with what the heap kept from earlier. Prints
`{every: bytes}` as JSON: for each checkpointing setting, how far the high-water mark
rose above the resident set before the step; the least of two steps, as the first one
with a setting also allocates what is set up once.
"""

from __future__ import annotations

import ctypes
import json
import sys

import torch
from transformers import MistralForCausalLM

from exforge.llm.lora import LoraSettings, apply_lora
from exforge.llm.model import preset_config
from workers.trainer.profile import profile_batch, set_checkpointing, train_step

M_MMAP_THRESHOLD = -3
LAYERS, VOCAB, BATCH, SEQ = 8, 512, 4, 256


def profiled_model() -> torch.nn.Module:
    """The model and batch the profiler test and this script both measure."""
    torch.manual_seed(0)
    base = MistralForCausalLM(preset_config("tiny", num_hidden_layers=LAYERS, vocab_size=VOCAB))
    return apply_lora(base, LoraSettings(rank=4))


def profiled_batch() -> dict[str, torch.Tensor]:
    return profile_batch(VOCAB, BATCH, SEQ)


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field))
    return int(line.split()[1]) * 1024


def step_growth(model: torch.nn.Module, batch: dict[str, torch.Tensor], libc: ctypes.CDLL) -> int:
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current resident set
    before = _status("VmRSS:")
    train_step(model, batch)
    return _status("VmHWM:") - before


def main() -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    model, batch = profiled_model(), profiled_batch()
    model.train()
    growth = {}
    for every in map(int, sys.argv[1:]):
        set_checkpointing(model, every)
        growth[every] = min(step_growth(model, batch, libc) for _ in range(2))
    print(json.dumps(growth))


if __name__ == "__main__":
    main()
