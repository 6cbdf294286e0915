"""Facts about the environment a process runs in, read once from ``TEXTGEN_*`` variables.

This is the only place the service reads environment variables of its own; everything
that shapes the application itself comes from the validated Serve config args.
"""

from __future__ import annotations

import functools
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Environment settings (prefix ``TEXTGEN_``)."""

    model_config = SettingsConfigDict(env_prefix="TEXTGEN_", extra="ignore")

    cache_dir: Path = Field(
        default=Path.home() / ".cache" / "ray-textgen",
        description="Where prepared models (the embedded default) are kept.",
    )


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read on first use."""
    return Settings()
