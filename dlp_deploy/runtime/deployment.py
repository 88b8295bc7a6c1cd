"""Reading a deployment folder (written by export/deployment.py): its model file (model.onnx, + model.data when over
2 GB, or model.gguf), config.json, tokenizer files and export.json; and whether an engine can run it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .engines import ENGINES, engines_for, engines_refusing

MODEL_FILE = "model.onnx"
GGUF_FILE = "model.gguf"
EXPORT_FILE = "export.json"


@dataclass(frozen=True)
class Deployment:
    folder: Path
    model_path: Path  # model.onnx or model.gguf
    info: dict

    @property
    def format(self) -> str:
        return "gguf" if self.model_path.suffix == ".gguf" else "onnx"

    @property
    def onnx_path(self) -> Path:
        if self.format != "onnx":
            raise UserError(f"{self.folder} is a GGUF deployment (llama.cpp); this step needs an ONNX one "
                            "(`dlp-deploy export MODEL --format onnx`)")
        return self.model_path

    def check_engine(self, engine: str) -> None:
        """A one-line refusal when `engine` cannot run this folder's file."""
        wanted = ENGINES[engine].model_format
        if wanted != self.format:
            raise UserError(f"engine {engine} runs {wanted.upper()} deployments and {self.folder} holds a "
                            f"{self.format.upper()} one; use --engine {' or '.join(engines_for(self.format))}, or "
                            f"export with --format {wanted}")
        refusals = engines_refusing(self.info.get("quantization"))
        if engine in refusals:
            scheme = self.info["quantization"].get("scheme", "int8")
            raise UserError(f"engine {engine} cannot run the {scheme} deployment {self.folder}: {refusals[engine]}")

    @property
    def seq_len(self) -> int:
        return int(self.info.get("seq_len", 512))

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.folder)


def load_deployment(folder) -> Deployment:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; give a deployment folder made by `dlp-deploy export`")
    model_file = GGUF_FILE if (folder / GGUF_FILE).is_file() else MODEL_FILE
    missing = [name for name in (model_file, EXPORT_FILE, "config.json") if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{folder} is not a deployment folder (no {', '.join(missing)}); "
                        "create one with `dlp-deploy export MODEL --out DIR`")
    try:
        info = json.loads((folder / EXPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{folder / EXPORT_FILE} is unreadable ({exc}); re-run `dlp-deploy export`") from None
    return Deployment(folder, folder / model_file, info)
