"""The expert artifact: what a trained subject leaves behind, read by the registry and serving.

An expert is a folder, written atomically::

    expert.json                           # ExpertInfo below
    pytorch_lora_weights.safetensors      # method=lora (diffusers LoRA format)
    unet/ [text_encoder/]                 # method=full (diffusers save_pretrained, safetensors)
    validation/step-NNNNNNNN.png          # validation grids (rows: prompts)
    instance/NN.png                       # the training photos as used (normalised, downscaled)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreamfleet.core.artifacts import read_json
from dreamfleet.core.errors import DataError

EXPERT_SCHEMA_VERSION = 1
EXPERT_FILE = "expert.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


@dataclass
class ExpertInfo:
    subject_id: str
    class_noun: str
    identifier: str
    instance_prompt: str
    method: str
    base_model: dict[str, Any]
    config: dict[str, Any]
    code_version: dict[str, Any]
    input_hash: str
    num_images: int
    final_loss: float | None
    wall_time_s: float
    created_at: str
    weights: list[str]
    class_images: dict[str, Any] | None = None
    tenant: str | None = None
    source: str | None = None
    train_stats: dict[str, Any] = field(default_factory=dict)
    schema_version: int = EXPERT_SCHEMA_VERSION

    def prompt(self, template: str) -> str:
        """Fill ``{identifier}``/``{class_noun}``, ``{0}``/``{1}`` (DreamBench), ``{subject}`` or ``[V]``."""
        subject = f"{self.identifier} {self.class_noun}"
        text = template.replace("[V]", self.identifier).replace("{subject}", subject)
        return text.replace("{identifier}", self.identifier).replace("{class_noun}", self.class_noun).replace(
            "{0}", self.identifier).replace("{1}", self.class_noun)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def read(cls, folder: str | Path) -> ExpertInfo:
        path = Path(folder) / EXPERT_FILE
        if not path.is_file():
            raise DataError(f"{folder}: not an expert folder (no {EXPERT_FILE})")
        data = read_json(path)
        version = int(data.get("schema_version", 0))
        if version > EXPERT_SCHEMA_VERSION:
            raise DataError(
                f"{path}: written by a newer dreamfleet (expert schema {version}, this one reads up to "
                f"{EXPERT_SCHEMA_VERSION}); upgrade dreamfleet"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
