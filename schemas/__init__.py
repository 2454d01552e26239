"""Topic records and the topic catalogue."""

from schemas.catalogue import BY_NAME, CATALOGUE, TopicSpec, spec
from schemas.records import (
    SCHEMA_VERSION,
    DeadLetter,
    FunctionInfo,
    InstructionSample,
    ModelVersionEvent,
    ModuleInfo,
    ParsedFile,
    RawPackage,
    Record,
    SampleMeta,
    SourceRef,
    SourceRequest,
    TrainingEvent,
    TrainingShard,
    Turn,
)

__all__ = [
    "BY_NAME",
    "CATALOGUE",
    "SCHEMA_VERSION",
    "DeadLetter",
    "FunctionInfo",
    "InstructionSample",
    "ModelVersionEvent",
    "ModuleInfo",
    "ParsedFile",
    "RawPackage",
    "Record",
    "SampleMeta",
    "SourceRef",
    "SourceRequest",
    "TopicSpec",
    "TrainingEvent",
    "TrainingShard",
    "Turn",
    "spec",
]
