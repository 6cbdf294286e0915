"""The application's arguments: the `args:` block of a Serve config, validated by Serve
against `AppArgs` because the builder is typed."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.config import ModelConfig

Accelerator = Literal["auto", "gpu", "cpu"]


class AutoscalingArgs(BaseModel):
    """Serve autoscaling for a model deployment (passed to Serve's autoscaling_config)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=0, description="Fewest replicas kept running.")
    max_replicas: int = Field(default=1, ge=1, description="Most replicas Serve may start.")
    initial_replicas: int | None = Field(
        default=None, ge=0, description="Replicas at deploy time; unset means min_replicas."
    )
    target_ongoing_requests: float = Field(
        default=8,
        gt=0,
        description="In-flight requests per replica Serve aims for; above it, it adds replicas.",
    )
    upscale_delay_s: float = Field(
        default=10, ge=0, description="How long load must stay high before scaling up."
    )
    downscale_delay_s: float = Field(
        default=60, ge=0, description="How long load must stay low before scaling down."
    )

    @model_validator(mode="after")
    def _bounds_are_ordered(self) -> "AutoscalingArgs":
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) exceeds max_replicas "
                f"({self.max_replicas}); raise max_replicas or lower min_replicas"
            )
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError(
                f"initial_replicas ({self.initial_replicas}) must lie between min_replicas "
                f"({self.min_replicas}) and max_replicas ({self.max_replicas})"
            )
        return self


class ModelArgs(ModelConfig):
    """One model deployment: the model (ModelConfig) plus how Serve places and scales it."""

    accelerator: Accelerator = Field(
        default="auto",
        description=(
            "`gpu` gives each replica one GPU (num_gpus: 1); `cpu` none; `auto` picks gpu "
            "when the cluster has a GPU at deploy time (on clusters that add GPU nodes on "
            "demand, say `gpu`)."
        ),
    )
    num_cpus: float = Field(
        default=1, ge=0, description="Logical CPUs reserved per replica (Ray resource)."
    )
    num_replicas: int | None = Field(
        default=None, ge=1, description="A fixed replica count; exclusive with `autoscaling`."
    )
    autoscaling: AutoscalingArgs | None = Field(
        default_factory=AutoscalingArgs,
        description="Autoscaling bounds and target; set to null to use num_replicas.",
    )
    max_ongoing_requests: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Requests one replica accepts at once; unset means 2 x max_batch_size so the "
            "next batch queues while one decodes. A batch can never exceed it."
        ),
    )

    @model_validator(mode="after")
    def _replicas_and_batching_agree(self) -> "ModelArgs":
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError(
                "num_replicas and autoscaling are exclusive; set autoscaling: null to use a "
                "fixed num_replicas, or remove num_replicas"
            )
        if self.num_replicas is None and self.autoscaling is None:
            raise ValueError("set num_replicas or autoscaling for the model deployment")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) is below max_batch_size "
                f"({self.max_batch_size}), so batches could never fill; raise "
                "max_ongoing_requests or lower max_batch_size"
            )
        return self

    @property
    def replica_max_ongoing_requests(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch_size

    @property
    def deployment_name(self) -> str:
        """Serve deployment name for this model (names allow fewer characters than models)."""
        return "Model-" + re.sub(r"[^A-Za-z0-9_-]", "-", self.name)

    def to_model_config(self) -> ModelConfig:
        """The part the replica needs: the model, without placement and scaling."""
        return ModelConfig(**self.model_dump(include=set(ModelConfig.model_fields)))


class IngressArgs(BaseModel):
    """The HTTP ingress deployment (FastAPI; light, no torch)."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(default=1, ge=1, description="Ingress replicas.")
    num_cpus: float = Field(default=0.25, ge=0, description="Logical CPUs per ingress replica.")
    max_ongoing_requests: int = Field(
        default=256,
        ge=1,
        description=(
            "Requests one ingress replica holds at once; Serve's default of 5 would cap "
            "the whole service, since each request waits here while the model decodes."
        ),
    )


class AppArgs(BaseModel):
    """Arguments of `serve_app.app:build_app`."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelArgs] = Field(
        default_factory=lambda: [ModelArgs()],
        min_length=1,
        description="Served models; the first is the default when a request names none.",
    )
    ingress: IngressArgs = Field(default_factory=IngressArgs, description="The HTTP ingress.")

    @model_validator(mode="after")
    def _model_names_are_unique(self) -> "AppArgs":
        for attribute in ("name", "deployment_name"):
            values = [getattr(model, attribute) for model in self.models]
            duplicates = sorted({v for v in values if values.count(v) > 1})
            if duplicates:
                raise ValueError(
                    f"models need distinct names; {', '.join(duplicates)} appears more than "
                    "once (names that differ only in punctuation collide as deployment names)"
                )
        return self
