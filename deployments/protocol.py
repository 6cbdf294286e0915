"""Payloads that cross the DeploymentHandle between the ingress and the model replicas.

Everything here is small, picklable and free of torch/FastAPI so that both sides can
import it. The HTTP schemas in ``serve_app.schemas`` convert themselves into these.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

FinishReason = Literal["length", "stop", "eos"]

# Most new tokens one sequence may generate, whichever API and field asked (max_new_tokens,
# max_tokens, or an HF-style max_length, which is capped here rather than refused).
MAX_NEW_TOKENS = 4096
# Most new tokens one request may ask for across its prompts and sequences.
MAX_REQUEST_NEW_TOKENS = 4 * MAX_NEW_TOKENS
# New tokens of a request that sets no limit, unless the model's generation_config does.
DEFAULT_MAX_NEW_TOKENS = 64
# Tokens a prompt may have beyond one per UTF-8 byte: special tokens, and the markup a
# chat template puts around each message.
SPECIAL_TOKENS_ALLOWANCE = 16


# Most alternatives a request may ask to see beside each chosen token.
MAX_TOP_LOGPROBS = 20

# One chat turn: (role, content).
ChatMessage = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class OutputConstraint:
    """What a sequence's text must match: a JSON schema (its JSON text) or a regular
    expression. ``param`` is the request field that asked for it, named in errors."""

    kind: Literal["json_schema", "regex"]
    source: str
    param: str


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    """One generation request as the model deployment sees it.

    The input is ``prompt`` as is, or, when ``messages`` is given, the conversation
    rendered by the model's own chat template. Sampling fields are ``None`` when the
    client did not set them. Precedence of defaults, resolved by the engine: the
    request's value, else the model's own ``generation_config``, else the service
    defaults in ``deployments.engine``.
    """

    prompt: str = ""
    messages: tuple[ChatMessage, ...] = ()
    request_id: str = ""
    max_new_tokens: int | None = None
    # The seed's HF-style ``max_length`` (prompt + new tokens); never set with max_new_tokens.
    max_length: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    # OpenAI's, over the tokens generated so far (no model default exists for them).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    num_return_sequences: int = 1
    constraint: OutputConstraint | None = None
    # None: no log probabilities; k: each token's, with the k likeliest tokens' (0..20).
    logprobs: int | None = None
    # A LoRA adapter of the model (the name in its config), or None for the base model.
    adapter: str | None = None

    def new_tokens_bound(self) -> int:
        """Most new tokens each sequence can generate (the model's default counts as
        DEFAULT_MAX_NEW_TOKENS: the ingress cannot know it)."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.max_length is not None:
            return min(self.max_length, MAX_NEW_TOKENS)
        return DEFAULT_MAX_NEW_TOKENS

    def worst_case_tokens(self) -> int:
        """Most tokens (prompt + new) this request can cost, known before tokenizing:
        a BPE token covers at least one byte of text, so a prompt has at most one token
        per UTF-8 byte plus special tokens and chat markup."""
        texts = [self.prompt] if not self.messages else [content for _, content in self.messages]
        prompt = sum(len(text.encode()) + SPECIAL_TOKENS_ALLOWANCE for text in texts)
        return prompt + self.num_return_sequences * self.new_tokens_bound()


@dataclasses.dataclass(frozen=True)
class TokenizeParams:
    """Text to tokenize as the model would see it: ``prompt`` as is, or ``messages``
    rendered by the model's chat template."""

    prompt: str = ""
    messages: tuple[ChatMessage, ...] = ()
    add_special_tokens: bool = True  # the tokenizer's own (BOS) around a prompt
    add_generation_prompt: bool = True  # the template's opening of the assistant's turn


@dataclasses.dataclass(frozen=True)
class TokenizeResult:
    tokens: tuple[int, ...]
    context_length: int


@dataclasses.dataclass(frozen=True)
class TokenChoice:
    """A token and its log probability under the model (log-softmax of its raw scores,
    before penalties, temperature, top-k/top-p and structured-output masks)."""

    token_id: int
    token: str  # its text alone (a piece of a character decodes to U+FFFD)
    logprob: float


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token, and the likeliest tokens at its position (as many as asked)."""

    chosen: TokenChoice
    top: tuple[TokenChoice, ...] = ()


@dataclasses.dataclass(frozen=True)
class SequenceDelta:
    """New output of one returned sequence since the previous step.

    ``finish_reason`` is set on the sequence's last delta; ``completion_tokens`` is the
    running count of tokens generated for this sequence; ``logprobs`` has an entry per
    token generated since the previous delta when the request asked for them (an EOS
    token has none: it adds no text).
    """

    index: int
    text: str
    completion_tokens: int
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprobs, ...] = ()


@dataclasses.dataclass(frozen=True)
class SequenceResult:
    """A finished sequence."""

    index: int
    text: str
    finish_reason: FinishReason
    completion_tokens: int
    logprobs: tuple[TokenLogprobs, ...] = ()


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """A finished request: every sequence plus the prompt's token count."""

    model: str
    prompt_tokens: int
    sequences: tuple[SequenceResult, ...]

    @property
    def completion_tokens(self) -> int:
        return sum(sequence.completion_tokens for sequence in self.sequences)


@dataclasses.dataclass(frozen=True)
class StreamStart:
    """First item of a stream, sent once the request was accepted by the engine."""

    model: str
    prompt_tokens: int


@dataclasses.dataclass(frozen=True)
class ModelStatus:
    """What the ingress needs to know about a loaded model."""

    name: str
    context_length: int
    device: str
    dtype: str


class InvalidRequestError(ValueError):
    """The request cannot be served as asked (e.g. it does not fit the context).

    Raised by the model side, mapped to HTTP 422 by the ingress. Arguments are kept in
    ``args`` so that the exception pickles across the Ray hop.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message, param)
        self.message = message
        self.param = param

    def __str__(self) -> str:
        return self.message
