"""Payloads that cross the DeploymentHandle between the ingress and the model replicas.

Everything here is small, picklable and free of torch/FastAPI so that both sides can
import it. The HTTP schemas in ``serve_app.schemas`` convert themselves into these.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

# "tool_calls": the sequence ended after one or more tool calls (chat with tools only).
FinishReason = Literal["length", "stop", "eos", "tool_calls"]

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
# Bytes a request's tools may add to its prompt beyond their own text: the instructions
# around them and each tool's JSON wrapping (deployments.tool_calls renders them).
TOOLS_PROMPT_ALLOWANCE = 1024
TOOL_WRAPPING_ALLOWANCE = 64


# Most alternatives a request may ask to see beside each chosen token.
MAX_TOP_LOGPROBS = 20

# Most tool calls one answer may make when parallel calls are allowed: a small model may
# otherwise repeat a call until its token limit.
MAX_PARALLEL_TOOL_CALLS = 8


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A function call: by the model in an answer, or an earlier turn's in a conversation.
    ``arguments`` is JSON text (OpenAI's shape)."""

    id: str
    name: str
    arguments: str


@dataclasses.dataclass(frozen=True)
class ChatMessage:
    """One chat turn. An assistant turn may carry the tool calls it made (its content
    then may be empty); a ``tool`` turn is a call's result, naming the call it answers."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


@dataclasses.dataclass(frozen=True)
class ToolSpec:
    """A function the model may call; ``parameters`` is its arguments' JSON schema (as
    JSON text, key order kept: it is the order the arguments are generated in)."""

    name: str
    description: str
    parameters: str


@dataclasses.dataclass(frozen=True)
class ToolUse:
    """The tools of a chat request and how they may be used.

    ``choice``: ``none`` (the tools are not shown to the model, no call is made),
    ``auto`` (text or calls, the model decides), ``required`` (one call or more), or
    ``function`` (exactly the tool ``function_name``). ``parallel``: more than one call
    allowed (up to MAX_PARALLEL_TOOL_CALLS)."""

    tools: tuple[ToolSpec, ...]
    choice: Literal["none", "auto", "required", "function"] = "auto"
    function_name: str | None = None
    parallel: bool = True

    @property
    def calls_possible(self) -> bool:
        return bool(self.tools) and self.choice != "none"


@dataclasses.dataclass(frozen=True)
class OutputConstraint:
    """What a sequence's text must match: a JSON schema (its JSON text), a regular
    expression, or a grammar in llguidance's Lark syntax (tool calls). ``param`` is the
    request field that asked for it, named in errors."""

    kind: Literal["json_schema", "regex", "lark"]
    source: str
    param: str


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    """One generation request as the model deployment sees it.

    The input is ``prompt`` as is, ``prompt_token_ids`` (token ids of the model's
    vocabulary, used as they are), or, when ``messages`` is given, the conversation
    rendered by the model's own chat template. Sampling fields are ``None`` when the
    client did not set them. Precedence of defaults, resolved by the engine: the
    request's value, else the model's own ``generation_config``, else the service
    defaults in ``deployments.engine``.
    """

    prompt: str = ""
    messages: tuple[ChatMessage, ...] = ()
    prompt_token_ids: tuple[int, ...] | None = None
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
    # Who the request is for (an API key's name, or the client), and its weight: rows of
    # the batch go to tenants in proportion to their weights (set by the ingress).
    tenant: str = ""
    tenant_weight: float = 1.0
    # vLLM's: the request's place in its tenant's line, lower first (ties by arrival).
    priority: int = 0
    # Chat only: the tools the model may call (OpenAI's tools and tool_choice).
    tool_use: ToolUse | None = None
    # vLLM's extensions: generate past the model's end of text; allow it (and
    # stop_token_ids) only after min_tokens; end at any of stop_token_ids; keep special
    # tokens' text; return the stop string (or stop token) that ended the text.
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Return the prompt (its text, and with prompt_logprobs each of its tokens' log
    # probability with that many alternatives): OpenAI's echo. With echo,
    # max_new_tokens may be 0: the prompt is scored, nothing is generated.
    echo: bool = False
    prompt_logprobs: int | None = None

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
        if self.prompt_token_ids is not None:
            return len(self.prompt_token_ids) + self.num_return_sequences * self.new_tokens_bound()
        texts = [self.prompt] if not self.messages else [message_text(message) for message in self.messages]
        if self.tool_use is not None and self.tool_use.calls_possible:
            # The tools' definitions are rendered into the prompt too.
            texts += [tool.name + tool.description + tool.parameters for tool in self.tool_use.tools]
        prompt = sum(len(text.encode()) + SPECIAL_TOKENS_ALLOWANCE for text in texts)
        if self.tool_use is not None and self.tool_use.calls_possible:
            prompt += TOOLS_PROMPT_ALLOWANCE + TOOL_WRAPPING_ALLOWANCE * len(self.tool_use.tools)
        return prompt + self.num_return_sequences * self.new_tokens_bound()


def message_text(message: ChatMessage) -> str:
    """Everything of a turn that becomes prompt text (its calls included)."""
    return message.content + "".join(call.name + call.arguments for call in message.tool_calls)


@dataclasses.dataclass(frozen=True)
class TokenizeParams:
    """Text to tokenize as the model would see it: ``prompt`` as is, or ``messages``
    rendered by the model's chat template."""

    prompt: str = ""
    messages: tuple[ChatMessage, ...] = ()
    add_special_tokens: bool = True  # the tokenizer's own (BOS) around a prompt
    add_generation_prompt: bool = True  # the template's opening of the assistant's turn
    tool_use: ToolUse | None = None  # tools rendered with the messages (see ToolUse)


@dataclasses.dataclass(frozen=True)
class TokenizeResult:
    tokens: tuple[int, ...]
    context_length: int


@dataclasses.dataclass(frozen=True)
class TokenChoice:
    """A token and its log probability under the model (log-softmax of its raw scores,
    before penalties, temperature, top-k/top-p and structured-output masks); None for
    a prompt's first token, which nothing precedes."""

    token_id: int
    token: str  # its text alone (a piece of a character decodes to U+FFFD)
    logprob: float | None


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token, and the likeliest tokens at its position (as many as asked)."""

    chosen: TokenChoice
    top: tuple[TokenChoice, ...] = ()


@dataclasses.dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a tool call being generated (OpenAI's streamed shape): its first piece
    has the call's ``id`` and ``name``, the next ones fragments of its ``arguments`` (JSON
    text; joined, they parse). ``index`` counts the sequence's calls from 0."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclasses.dataclass(frozen=True)
class SequenceDelta:
    """New output of one returned sequence since the previous step.

    ``finish_reason`` is set on the sequence's last delta; ``completion_tokens`` is the
    running count of tokens generated for this sequence; ``logprobs`` has an entry per
    token generated since the previous delta when the request asked for them (an EOS
    token has none: it adds no text). With tools, the text of tool calls arrives as
    ``tool_calls`` pieces instead of ``text`` (deployments.tool_calls).
    """

    index: int
    text: str
    completion_tokens: int
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprobs, ...] = ()
    tool_calls: tuple[ToolCallDelta, ...] = ()
    # With prompt_logprobs, on sequence 0's first delta: each prompt token with its log
    # probability given those before it (the first token's is None).
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()
    # On sequence 0's first delta: prompt tokens whose KV came from the prefix cache.
    cached_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class SequenceResult:
    """A finished sequence."""

    index: int
    text: str
    finish_reason: FinishReason
    completion_tokens: int
    logprobs: tuple[TokenLogprobs, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """A finished request: every sequence plus the prompt's token count."""

    model: str
    prompt_tokens: int
    sequences: tuple[SequenceResult, ...]
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()  # see SequenceDelta
    cached_tokens: int = 0  # see SequenceDelta
    prompt_text: str | None = None  # with echo of a token-id prompt: the model's text of it

    @property
    def completion_tokens(self) -> int:
        return sum(sequence.completion_tokens for sequence in self.sequences)


@dataclasses.dataclass(frozen=True)
class StreamStart:
    """First item of a stream, sent once the request was accepted by the engine."""

    model: str
    prompt_tokens: int
    prompt_text: str | None = None  # with echo, the text of a prompt given as token ids


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


class EngineExitedError(RuntimeError):
    """The replica's engine process is gone, so the request was never served there.

    The replica exits right after (see `ModelServer`); the ingress treats this as a
    failed replica and retries the request elsewhere, as for a replica that died.
    """

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code

    def __str__(self) -> str:
        return f"the engine process exited with code {self.code}"


class AdapterLoadError(RuntimeError):
    """A LoRA adapter's weights could not be loaded into the model. Only the request
    that needed it fails (a 500 naming the adapter); the batch goes on, and the adapter
    it would have replaced still serves."""

    def __init__(self, adapter: str, reason: str) -> None:
        super().__init__(adapter, reason)
        self.adapter, self.reason = adapter, reason

    def __str__(self) -> str:
        return f"adapter {self.adapter} could not be loaded: {self.reason}"
