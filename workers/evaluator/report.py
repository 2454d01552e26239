"""Stored evaluation results and the HTML + PNG report made from them.

Results live in the object store as `evals/<model>/<version>/<benchmark>.json` (the JSON
that `exforge eval score --save` writes); the report compares every stored version.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exforge.core.store import ObjectStore
from exforge.elixir.sandbox import STATUSES

PREFIX = "evals/"
PNG_NAME = "eval-report.png"
HTML_NAME = "eval-report.html"


@dataclass(frozen=True)
class StoredResult:
    model: str
    version: str
    benchmark: str
    result: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.model}:{self.version}"


def result_key(model: str, version: str, benchmark: str) -> str:
    return f"{PREFIX}{model}/{version}/{benchmark}.json"


def save_result(store: ObjectStore, model: str, version: str, result: dict[str, Any]) -> str:
    key = result_key(model, version, result["benchmark"])
    store.put(key, json.dumps(result, indent=1).encode())
    return key


def load_results(store: ObjectStore) -> list[StoredResult]:
    results = []
    for key in store.list(PREFIX):
        parts = key.removeprefix(PREFIX).split("/")
        if len(parts) == 3 and parts[2].endswith(".json"):
            model, version, name = parts
            result = json.loads(store.get(key))
            results.append(StoredResult(model, version, name.removesuffix(".json"), result))
    return results


def summary_rows(results: list[StoredResult]) -> list[dict[str, Any]]:
    return [
        {
            "model": r.model,
            "version": r.version,
            "benchmark": r.benchmark,
            "problems": r.result["problems"],
            "samples": r.result["samples"],
            **{f"pass@{k}": v for k, v in r.result["pass_at_k"].items()},
            "compile_rate": r.result["compile_rate"],
            "warnings": r.result["warnings"],
            "chrf": r.result["chrf"],
            **r.result["status_counts"],
        }
        for r in results
    ]


def _category_pass1(result: dict[str, Any]) -> dict[str, float]:
    return {
        category: summary["pass_at_k"].get("1", 0.0)
        for category, summary in result["by_category"].items()
    }


def write_png(results: list[StoredResult], path: Path) -> None:
    """Three panels: pass@1 by category, pass@1 per version, status breakdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_category, by_version, statuses) = plt.subplots(1, 3, figsize=(18, 5.5))
    categories = sorted({c for r in results for c in r.result["by_category"]})
    width = 0.8 / max(len(results), 1)
    for index, r in enumerate(results):
        values = _category_pass1(r.result)
        xs = [i + index * width for i in range(len(categories))]
        label = f"{r.label} {r.benchmark}"
        by_category.bar(xs, [values.get(c, 0.0) for c in categories], width, label=label)
    by_category.set_xticks([i + 0.4 - width / 2 for i in range(len(categories))], categories)
    by_category.tick_params(axis="x", rotation=30)
    by_category.set_ylim(0, 1)
    by_category.set_title("pass@1 by category")
    by_category.legend(fontsize="small")

    for benchmark in sorted({r.benchmark for r in results}):
        rows = [r for r in results if r.benchmark == benchmark]
        by_version.plot(
            [r.label for r in rows],
            [r.result["pass_at_k"].get("1", 0.0) for r in rows],
            marker="o",
            label=benchmark,
        )
    by_version.set_ylim(0, 1)
    by_version.set_title("pass@1 per model version")
    by_version.legend(fontsize="small")

    labels = [f"{r.label}\n{r.benchmark}" for r in results]
    bottoms = [0] * len(results)
    for status in STATUSES:
        counts = [r.result["status_counts"].get(status, 0) for r in results]
        statuses.bar(labels, counts, bottom=bottoms, label=status)
        bottoms = [b + c for b, c in zip(bottoms, counts, strict=True)]
    statuses.set_title("status of every sample")
    statuses.legend(fontsize="small")

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape("" if value is None else str(value))


def html_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>none</p>"
    columns = list(dict.fromkeys(column for row in rows for column in row))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(row.get(c))}</td>" for c in columns) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(results: list[StoredResult], png_name: str) -> str:
    category_rows = [
        {"model": r.label, "benchmark": r.benchmark, **_category_pass1(r.result)} for r in results
    ]
    sections = [
        "<h2>Summary</h2>",
        html_table(summary_rows(results)),
        "<h2>pass@1 by category</h2>",
        html_table(category_rows),
        f'<h2>Plots</h2><img src="{html.escape(png_name)}" alt="evaluation plots">',
    ]
    for r in results:
        problems = [
            {
                "problem": p["name"],
                "category": p["category"],
                "n": p["n"],
                "c": p["c"],
                "pass@1": p["pass_at_k"].get("1"),
                "statuses": " ".join(p["statuses"]),
            }
            for p in r.result["per_problem"]
        ]
        sections.append(f"<h2>{html.escape(r.label)} on {html.escape(r.benchmark)}</h2>")
        sections.append(f"<p>sandbox isolation: {html.escape(r.result['isolation'])}</p>")
        sections.append(html_table(problems))
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px}img{max-width:100%}"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>exforge evaluation</title>"
        f"<style>{style}</style></head><body><h1>exforge evaluation report</h1>"
        + "".join(sections)
        + "</body></html>\n"
    )


def write_report(results: list[StoredResult], out_dir: Path) -> tuple[Path, Path]:
    """Write the HTML report and its PNG into `out_dir`; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png, page = out_dir / PNG_NAME, out_dir / HTML_NAME
    write_png(results, png)
    page.write_text(render_html(results, PNG_NAME), encoding="utf-8")
    return page, png
