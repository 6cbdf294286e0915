"""Shared fixtures. The Ray environment is set here exactly as the Makefile sets it."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest  # noqa: E402

from tests.tiny_model import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved as a local HF folder."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module", params=["dynamic", "slots"])
def tiny_engine(tiny_model_dir, request):
    """The transformers engine on the tiny model, once on each KV cache."""
    from deployments.config import ModelConfig
    from deployments.transformers_engine import TransformersEngine

    config = ModelConfig(name="tiny", source=str(tiny_model_dir), dtype="float32", kv_cache=request.param)
    engine = TransformersEngine(config, "cpu")
    engine.load()
    yield engine
    engine.close()
