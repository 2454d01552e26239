"""Generate `schemas/json/*.json` from the record models (`python -m schemas.jsonschema`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from schemas.catalogue import CATALOGUE

JSON_DIR = Path(__file__).parent / "json"


def render() -> dict[str, str]:
    """File name → JSON Schema text, one per record model in the catalogue."""
    files: dict[str, str] = {}
    for spec in CATALOGUE:
        model = spec.value
        schema = model.model_json_schema(by_alias=True)
        schema["$id"] = f"https://exforge.dev/schemas/{model.__name__}.json"
        schema["description"] = (schema.get("description") or "").strip()
        files[f"{model.__name__}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return files


def write(directory: Path = JSON_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write():
        sys.stdout.write(f"wrote {path}\n")
