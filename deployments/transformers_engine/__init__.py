"""The transformers engine: the only package that imports torch and transformers."""

from deployments.transformers_engine.engine import TransformersEngine
from deployments.transformers_engine.loading import prepare_embedded_model

__all__ = ["TransformersEngine", "prepare_embedded_model"]
