"""Instruct stage: `parsed.files` → ShareGPT conversations → `instruction.samples`.

This stage's generator: every public function with a `@doc` becomes one `doc_to_code`
sample (human: the doc and the head to implement; gpt: the implementation).
"""

from __future__ import annotations

from schemas.records import (
    FunctionInfo,
    InstructionSample,
    ParsedFile,
    SampleMeta,
    SourceRef,
    Turn,
)
from streams.stage import Output, Result, StageContext, attach_stage

DOC_TO_CODE_STAGE = 2


def fenced(code: str) -> str:
    return f"```elixir\n{code.rstrip()}\n```"


def doc_to_code_prompt(function: FunctionInfo) -> str:
    return (
        f"Implement `{function.module}.{function.name}/{function.arity}` in Elixir.\n\n"
        f"Documentation:\n\n{function.doc}\n\n"
        f"Start from this head:\n\n{fenced(function.head)}"
    )


def sample(
    kind: str, stage: int, human: str, gpt: str, file: ParsedFile, function: FunctionInfo
) -> InstructionSample:
    conversations = [Turn(from_="human", value=human), Turn(from_="gpt", value=gpt)]
    return InstructionSample(
        sample_id=InstructionSample.content_id(conversations, kind),
        conversations=conversations,
        meta=SampleMeta(
            kind=kind,
            stage=stage,
            license=file.license,
            source_refs=[
                SourceRef(
                    source_id=file.source_id,
                    path=file.path,
                    sha256=file.sha256,
                    start_line=function.start_line,
                    end_line=function.end_line,
                )
            ],
        ),
    )


def doc_to_code_samples(file: ParsedFile) -> list[InstructionSample]:
    """One sample per documented public function of the file."""
    return [
        sample("doc_to_code", DOC_TO_CODE_STAGE, doc_to_code_prompt(f), fenced(f.source), file, f)
        for f in file.functions
        if f.public and f.doc and f.doc.strip()
    ]


def attach(ctx: StageContext) -> None:
    def handle(value: bytes, key: str | None) -> Result:
        file = ParsedFile.model_validate_json(value)
        return Result(
            outputs=[
                Output("instruction.samples", s.sample_id, s) for s in doc_to_code_samples(file)
            ]
        )

    attach_stage(ctx, "instruct", "parsed.files", handle)
