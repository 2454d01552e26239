"""`exforge compress report`: what each compressed version costs and saves.

One row per version of a model's lineage: its method and parameters (`base` for a
version no compression made), its size on disk as served (the merged bf16 safetensors),
decoding speed (tokens/s and first-token latency on the same prompts, decoded as one
batch by the serving loop, every version measured in the same run, round by round),
pass@1 on the gate benchmark and on the idioms set (evaluated once and kept in the
registry), and whether it is on the Pareto front of size (smaller), speed and pass@1
(higher). `plot` draws size against pass@1 and against speed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from exforge.core.settings import Settings
from exforge.core.store import ObjectStore
from exforge.llm.chat import text_ids
from exforge.llm.generation import DecodeOptions, Decoder, Event, Request, Sampling
from exforge.llm.lora import merged_version_dir
from exforge.llm.registry import list_versions, stored_metric
from workers.evaluator.benchmarks import BUILTIN, load_benchmark
from workers.evaluator.generate import InProcessGenerator
from workers.evaluator.qa import IDIOMS
from workers.evaluator.run import DEMO_SAMPLING, EvalRequest, run_evaluation


@dataclass
class Row:
    version: int
    parent_version: int | None
    method: str
    parameters: dict[str, Any]
    size_bytes: int
    tokens_per_s: float
    first_token_s: float
    pass_at_1: float
    idioms_pass_at_1: float
    pareto: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Speed:
    tokens_per_s: float
    first_token_s: float


def lineage(versions: Sequence[dict[str, Any]], root: int | None) -> list[dict[str, Any]]:
    """The versions descending from `root` (itself included); every version when None."""
    if root is None:
        return list(versions)
    family = {root}
    for row in sorted(versions, key=lambda r: r["version"]):
        if row["parent_version"] in family:
            family.add(row["version"])
    return [row for row in versions if row["version"] in family]


def served_size(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.glob("*.safetensors"))


def timed_batch(decoder: Decoder, prompts: Sequence[list[int]], sampling: Sampling) -> Speed:
    """Decode the prompts as one continuously batched run: tokens/s over the run and
    the median latency from submission to first token."""
    tokens = [0] * len(prompts)

    def counter(index: int) -> Callable[[Event], None]:
        def emit(event: Event) -> None:
            if isinstance(event, Exception):
                raise event
            tokens[index] = event.tokens

        return emit

    requests = [Request(list(ids), sampling, counter(i)) for i, ids in enumerate(prompts)]
    started = time.perf_counter()
    for request in requests:
        decoder.submit(request)
    decoder.run()
    seconds = time.perf_counter() - started
    firsts = [
        (r.first_token_ns - r.arrived_ns) / 1e9 for r in requests if r.first_token_ns is not None
    ]
    return Speed(sum(tokens) / seconds, statistics.median(firsts) if firsts else 0.0)


def decode_speed(
    directories: dict[int, Path],
    prompts: Sequence[str],
    max_tokens: int,
    rounds: int,
    options: DecodeOptions,
) -> dict[int, Speed]:
    """Greedy decoding of the prompts, batched, by every version with the serving loop
    and its options; the versions take turns within each round; medians over the rounds."""
    decoders = {}
    for version, path in directories.items():
        generator = InProcessGenerator.from_dir(path)
        ids = [text_ids(generator.tokenizer, prompt) for prompt in prompts]
        # no prefix cache: every round pays the prompts' prefill, as a first request does
        decoder = Decoder(
            generator.model, generator.tokenizer, len(ids), prefix_entries=0, options=options
        )
        decoders[version] = (decoder, ids)
    sampling = Sampling(max_tokens=max_tokens)
    runs: dict[int, list[Speed]] = {version: [] for version in decoders}
    for number in range(rounds + 1):  # round 0 warms every model up
        for version, (decoder, ids) in decoders.items():
            speed = timed_batch(decoder, ids, sampling)
            if number:
                runs[version].append(speed)
    return {
        version: Speed(
            statistics.median(s.tokens_per_s for s in speeds),
            statistics.median(s.first_token_s for s in speeds),
        )
        for version, speeds in runs.items()
    }


def pass_at_1(
    settings: Settings,
    store: ObjectStore,
    engine: Engine,
    row: dict[str, Any],
    benchmark: str,
    limit: int | None,
) -> float:
    """The version's stored pass@1 on `benchmark`, evaluated now if it has none."""
    stored = stored_metric(engine, row["name"], row["version"], benchmark)
    if stored is not None:
        return stored
    request = EvalRequest(
        row["name"], row["version"], benchmark, sampling=DEMO_SAMPLING, limit=limit
    )
    return float(run_evaluation(settings, store, engine, request)["pass_at_k"]["1"])


def pareto(rows: Sequence[Row]) -> None:
    """Mark the rows no other row beats or equals on size, speed and pass@1 at once."""

    def scores(row: Row) -> tuple[float, float, float]:
        return (-row.size_bytes, row.tokens_per_s, row.pass_at_1)

    for row in rows:
        mine = scores(row)
        row.pareto = not any(
            all(a >= b for a, b in zip(scores(other), mine, strict=True)) and scores(other) != mine
            for other in rows
        )


def report(
    settings: Settings,
    store: ObjectStore,
    engine: Engine,
    name: str,
    root: int | None = None,
    prompts: int = 4,
    max_tokens: int = 32,
    rounds: int = 3,
    limit: int | None = None,
) -> list[Row]:
    """Rows for the lineage of `name` (from `root`), measured in this run."""
    versions = lineage(list_versions(engine, name), root)
    if not versions:
        raise LookupError(f"the registry has no versions of {name}")
    directories = {row["version"]: merged_version_dir(settings, store, row) for row in versions}
    texts = [p.prompt for p in load_benchmark(BUILTIN).problems[:prompts]]
    options = DecodeOptions.from_settings(settings)
    speeds = decode_speed(directories, texts, max_tokens, rounds, options)
    rows = [
        Row(
            version=row["version"],
            parent_version=row["parent_version"],
            method=row["method"] or "base",
            parameters=row["parameters"],
            size_bytes=served_size(directories[row["version"]]),
            tokens_per_s=round(speeds[row["version"]].tokens_per_s, 2),
            first_token_s=round(speeds[row["version"]].first_token_s, 4),
            pass_at_1=pass_at_1(settings, store, engine, row, settings.eval_gate_benchmark, limit),
            idioms_pass_at_1=pass_at_1(settings, store, engine, row, IDIOMS, limit),
        )
        for row in versions
    ]
    pareto(rows)
    return rows


def plot(rows: Sequence[Row], path: Path) -> Path:
    """Size against pass@1 and against tokens/s, one point per version, front circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, field, label in (
        (axes[0], "pass_at_1", "pass@1 (gate benchmark)"),
        (axes[1], "tokens_per_s", "decoding tokens/s"),
    ):
        for row in rows:
            x, y = row.size_bytes / 2**20, getattr(row, field)
            edge = "black" if row.pareto else "none"
            axis.scatter([x], [y], s=60 if row.pareto else 25, edgecolors=edge)
            axis.annotate(f"v{row.version} {row.method}", (x, y), fontsize=8)
        axis.set_xlabel("size on disk, served (MiB)")
        axis.set_ylabel(label)
    fig.suptitle("compressed versions (outlined: Pareto front)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
