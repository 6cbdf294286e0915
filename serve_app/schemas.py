"""Public HTTP schemas of POST /generate and the error body."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StringConstraints, ValidationInfo, field_validator, model_validator

from deployments.protocol import (
    MAX_NEW_TOKENS,
    MAX_TOP_LOGPROBS,
    GenerationParams,
    GenerationResult,
    OutputConstraint,
    TokenLogprobs,
)

MAX_NEW_TOKENS_LIMIT = MAX_NEW_TOKENS
MAX_SEED = 2**63 - 1
StopString = Annotated[str, StringConstraints(min_length=1, max_length=256)]
# The sampling bounds, one definition for /generate and /v1 alike.
Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]
TopK = Annotated[int, Field(ge=0, le=2**31 - 1)]
RepetitionPenalty = Annotated[float, Field(gt=0, le=10)]
# OpenAI's presence and frequency penalties: subtracted from the logits of tokens the
# sequence has generated (once, or once per time).
OpenAIPenalty = Annotated[float, Field(ge=-2, le=2)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]
# Structured outputs: the largest JSON schema (as JSON text) and regular expression a
# request may send; each is compiled into a grammar in the model replica.
MAX_SCHEMA_CHARS = 32_768
MAX_REGEX_CHARS = 1_024


class PromptFieldError(ValueError):
    """A rule on several fields, naming the field at fault (the error handler reads
    ``param``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def schema_constraint(schema: dict[str, Any], param: str) -> OutputConstraint:
    """The constraint of a JSON schema given in field ``param``.

    Raises:
        ValueError: the schema's JSON text is over MAX_SCHEMA_CHARS.
    """
    source = json.dumps(schema, ensure_ascii=False)  # key order kept: it is the output's order
    if len(source) > MAX_SCHEMA_CHARS:
        raise ValueError(f"the JSON schema has {len(source)} characters as JSON; the limit is {MAX_SCHEMA_CHARS}")
    return OutputConstraint("json_schema", source, param)


class GenerateRequest(BaseModel):
    """Body of POST /generate."""

    # strict: a string is never silently read as a number or a bool.
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [{"prompt": "The capital of France is", "max_new_tokens": 8, "temperature": 0}]
        },
    )

    # What an empty body is told it needs (prompt_token_ids would do too).
    BODY_NEEDS: ClassVar[tuple[str, ...]] = ("prompt",)

    prompt: str | None = Field(default=None, min_length=1, description="Text to continue.")
    prompt_token_ids: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] | None = Field(
        default=None, min_length=1,
        description="The prompt as token ids of the model's vocabulary, instead of prompt (used as they are).",
    )
    max_new_tokens: int | None = Field(
        default=None,
        ge=0,
        le=MAX_NEW_TOKENS_LIMIT,
        description=(
            "Most tokens to generate (default 64, or the model's generation_config); 0 only with "
            "prompt_logprobs (the prompt is scored, nothing is generated)."
        ),
    )
    max_length: int | None = Field(
        default=None,
        ge=2,
        le=2**31 - 1,
        description="Deprecated HF-style limit on prompt + new tokens; never with max_new_tokens.",
    )
    temperature: Temperature | None = Field(default=None, description="0 means greedy.")
    top_p: TopP | None = Field(default=None, description="Nucleus sampling mass.")
    top_k: TopK | None = Field(default=None, description="Keep the k likeliest tokens; 0 = off.")
    repetition_penalty: RepetitionPenalty | None = Field(
        default=None, description="Above 1 discourages repeating seen tokens."
    )
    presence_penalty: OpenAIPenalty = Field(
        default=0, description="OpenAI's: subtracted once from each token already generated."
    )
    frequency_penalty: OpenAIPenalty = Field(
        default=0, description="OpenAI's: subtracted from each token once per time it was generated."
    )
    stop: list[StopString] = Field(
        default_factory=list,
        max_length=4,
        description="Generation ends at the first of these; the stop text is not returned.",
    )
    seed: Seed | None = Field(default=None, description="Same seed and parameters give the same text.")
    num_return_sequences: int = Field(default=1, ge=1, le=4, description="Sequences to return.")
    stream: bool = Field(default=False, description="Answer with server-sent events.")
    model: str | None = Field(default=None, description="Model name; unset means the default.")
    json_schema: dict[str, Any] | None = Field(
        default=None,
        description=(
            "The text is JSON valid against this JSON schema (compact, no whitespace between "
            "tokens); a schema that cannot be enforced is a 422 naming the reason."
        ),
    )
    regex: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_REGEX_CHARS,
        description="The whole text matches this regular expression (Rust regex syntax); never with json_schema.",
    )

    logprobs: TopLogprobs | None = Field(
        default=None,
        description=(
            "Return each generated token's log probability and those of the N likeliest tokens at "
            "its position (0..20): the model's log-softmax, before penalties, temperature, top-k/top-p "
            "and structured-output masks."
        ),
    )

    prompt_logprobs: TopLogprobs | None = Field(
        default=None,
        description=(
            "Return each prompt token's log probability given the tokens before it (the first's is null) "
            "and those of the N likeliest tokens at its position (0..20); not on a stream."
        ),
    )

    @model_validator(mode="after")
    def _one_prompt(self) -> "GenerateRequest":
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise PromptFieldError("prompt", "give prompt or prompt_token_ids (one of them)")
        if self.max_new_tokens == 0 and self.prompt_logprobs is None:
            raise PromptFieldError("max_new_tokens", "max_new_tokens 0 needs prompt_logprobs (it scores the prompt only)")
        if self.stream and self.prompt_logprobs is not None:
            raise PromptFieldError("prompt_logprobs", "prompt_logprobs are returned whole: send stream: false")
        return self

    @property
    def prompt_length(self) -> int:
        """Characters of the prompt, or its token ids (a token is one character or more)."""
        return len(self.prompt) if self.prompt is not None else len(self.prompt_token_ids)

    @field_validator("json_schema")
    @classmethod
    def _schema_fits(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            schema_constraint(value, "json_schema")
        return value

    @field_validator("regex")
    @classmethod
    def _not_with_json_schema(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("json_schema") is not None:
            raise ValueError("give json_schema or regex, not both")
        return value

    @field_validator("max_length")
    @classmethod
    def _not_with_max_new_tokens(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("max_new_tokens") is not None:
            raise ValueError("give max_new_tokens or max_length, not both")
        return value

    def to_generation_params(self, request_id: str) -> GenerationParams:
        """The handle payload. Unset sampling fields stay None: the engine fills them
        from the model's generation_config, then from the service defaults."""
        return GenerationParams(
            prompt=self.prompt or "",
            prompt_token_ids=tuple(self.prompt_token_ids) if self.prompt_token_ids is not None else None,
            echo=self.prompt_logprobs is not None,
            prompt_logprobs=self.prompt_logprobs,
            request_id=request_id,
            max_new_tokens=self.max_new_tokens,
            max_length=self.max_length,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=tuple(self.stop),
            seed=self.seed,
            num_return_sequences=self.num_return_sequences,
            constraint=self._constraint(),
            logprobs=self.logprobs,
        )

    def _constraint(self) -> OutputConstraint | None:
        if self.json_schema is not None:
            return schema_constraint(self.json_schema, "json_schema")
        if self.regex is not None:
            return OutputConstraint("regex", self.regex, "regex")
        return None


FinishReason = Literal["length", "stop", "eos"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = Field(description="Tokens generated across all sequences.")
    total_tokens: int
    # Prompt tokens served from the prefix cache: shown by the OpenAI routes
    # (prompt_tokens_details), not in /generate's contract.
    _cached_tokens: int = PrivateAttr(default=0)


class TokenLogprob(BaseModel):
    token: str
    token_id: int
    logprob: float


class PromptTokenLogprob(BaseModel):
    token: str
    token_id: int
    logprob: float | None = Field(description="None for the first token: nothing precedes it.")
    top_logprobs: list[TokenLogprob]


class GeneratedTokenLogprob(TokenLogprob):
    top_logprobs: list[TokenLogprob] = Field(description="The likeliest tokens at this position, best first.")

    @classmethod
    def of(cls, scored: TokenLogprobs) -> "GeneratedTokenLogprob":
        def plain(choice) -> dict:
            return {"token": choice.token, "token_id": choice.token_id, "logprob": choice.logprob}

        return cls(**plain(scored.chosen), top_logprobs=[plain(choice) for choice in scored.top])


class Generation(BaseModel):
    text: str
    finish_reason: FinishReason
    completion_tokens: int
    logprobs: list[GeneratedTokenLogprob] | None = Field(
        default=None, description="Only when the request asked for logprobs: one entry per generated token."
    )


class GenerateResponse(BaseModel):
    """Body of a 200 from POST /generate; `text` and `finish_reason` are the first
    generation's, `usage` counts all of them."""

    id: str
    model: str
    text: str
    finish_reason: FinishReason
    usage: Usage
    generations: list[Generation]
    latency_ms: float
    prompt_logprobs: list[PromptTokenLogprob] | None = Field(
        default=None, description="Only when the request asked for prompt_logprobs: one entry per prompt token."
    )

    @classmethod
    def from_result(
        cls, response_id: str, result: GenerationResult, latency_ms: float, logprobs: bool = False
    ) -> "GenerateResponse":
        generations = [
            Generation(
                text=s.text, finish_reason=s.finish_reason, completion_tokens=s.completion_tokens,
                logprobs=[GeneratedTokenLogprob.of(scored) for scored in s.logprobs] if logprobs else None,
            )
            for s in result.sequences
        ]
        prompt_logprobs = None
        if result.prompt_logprobs:
            prompt_logprobs = [
                PromptTokenLogprob(
                    token=entry.chosen.token, token_id=entry.chosen.token_id, logprob=entry.chosen.logprob,
                    top_logprobs=[TokenLogprob(token=c.token, token_id=c.token_id, logprob=c.logprob) for c in entry.top],
                )
                for entry in result.prompt_logprobs
            ]
        return cls(
            prompt_logprobs=prompt_logprobs,
            id=response_id,
            model=result.model,
            text=generations[0].text,
            finish_reason=generations[0].finish_reason,
            usage=usage_of(result.prompt_tokens, result.completion_tokens),
            generations=generations,
            latency_ms=round(latency_ms, 1),
        )


def usage_of(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
    usage = Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )
    usage._cached_tokens = cached_tokens
    return usage


class ErrorDetail(BaseModel):
    type: str = Field(description="Error class, e.g. invalid_request_error.")
    message: str = Field(description="What went wrong and, where possible, how to fix it.")
    param: str | None = Field(default=None, description="The request field at fault, if any.")


class ErrorResponse(BaseModel):
    error: ErrorDetail
