"""Facts about the environment a process runs in, read once from ``TEXTGEN_*`` variables.

This is the only place the service reads environment variables of its own; everything
that shapes the application itself comes from the validated Serve config args.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

RATE_LIMIT_OFF = "off"


def split_limits(value: str) -> list[str]:
    """``10/minute;100/hour`` (or comma-separated) into single limits."""
    return [part.strip() for part in re.split(r"[;,]", value) if part.strip()]


class Settings(BaseSettings):
    """Environment settings (prefix ``TEXTGEN_``)."""

    model_config = SettingsConfigDict(env_prefix="TEXTGEN_", extra="ignore")

    cache_dir: Path = Field(
        default=Path.home() / ".cache" / "ray-textgen",
        description="Where prepared models (the embedded default) are kept.",
    )
    rate_limit: str | None = Field(
        default=None,
        description=(
            "Overrides the default quota's request limits: `10/minute`, "
            "`10/minute;100/hour`, or `off`."
        ),
    )
    api_keys: SecretStr | None = Field(
        default=None, description="API keys, `name:key` entries separated by commas."
    )
    api_keys_file: Path | None = Field(default=None, description="A file of API keys.")

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit_parses(cls, value: str | None) -> str | None:
        if value is None or value.strip().lower() == RATE_LIMIT_OFF:
            return value and RATE_LIMIT_OFF
        from limits import parse  # torch-free; only needed when the variable is set

        for part in split_limits(value):
            try:
                parse(part)
            except ValueError:
                raise ValueError(
                    f"TEXTGEN_RATE_LIMIT={value!r}: {part!r} is not a rate limit; "
                    "use e.g. 10/minute, 10/minute;100/hour or off"
                ) from None
        return value

    def default_request_limits(self, configured: list[str]) -> list[str]:
        """The default quota's request limits: TEXTGEN_RATE_LIMIT when set, else the config's."""
        if self.rate_limit is None:
            return configured
        if self.rate_limit == RATE_LIMIT_OFF:
            return []
        return split_limits(self.rate_limit)


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read on first use."""
    return Settings()
