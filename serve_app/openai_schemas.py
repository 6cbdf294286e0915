"""OpenAI-compatible request and response bodies (/v1/completions, /v1/chat/completions,
/v1/models), with OpenAI's field names and defaults.

Parameters OpenAI clients send with neutral values (`best_of` equal to `n`) are
accepted; asking for what this service does not do (logit bias, say) is a 400 that
names the parameter, never a silent ignore.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, StringConstraints, model_validator

from deployments.protocol import (
    MAX_REQUEST_NEW_TOKENS,
    ChatMessage,
    FinishReason,
    GenerationParams,
    OutputConstraint,
    TokenChoice,
    TokenLogprobs,
    ToolCall,
    ToolSpec,
    ToolUse,
)
from serve_app.schemas import (
    MAX_NEW_TOKENS_LIMIT,
    OpenAIPenalty,
    RepetitionPenalty,
    Seed,
    Temperature,
    TopK,
    TopLogprobs,
    TopP,
    Usage,
    schema_constraint,
)

def encodable(text: str) -> str:
    """Refuses lone surrogates: JSON can escape one ("\\ud800"), the tokenizer cannot take
    it. (The native /generate body is strict, and strict strings refuse them already.)"""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text is not valid Unicode ({exc.reason} at position {exc.start})") from None
    return text


Text = Annotated[str, AfterValidator(encodable)]
StopString = Annotated[Text, StringConstraints(min_length=1, max_length=256)]
# Most messages in one chat request: the chat template renders each (in Python), so
# their count, not only their length, costs the model replica time.
MAX_CHAT_MESSAGES = 1024
OpenAIFinishReason = Literal["stop", "length", "tool_calls"]


def openai_finish_reason(reason: FinishReason) -> OpenAIFinishReason:
    """OpenAI says `stop` for both a stop sequence and the model's end of text."""
    return reason if reason in ("length", "tool_calls") else "stop"


class UnsupportedParameterError(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
# Most stop token ids one request may give.
MAX_STOP_TOKEN_IDS = 64
# Every request model is strict, as /generate's is: `"stream": 0` or `"seed": false` is a
# 422 naming the field, never silently read as another type.
REQUEST_CONFIG = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = REQUEST_CONFIG

    include_usage: bool = Field(default=False, description="Send a last chunk with usage.")
    continuous_usage_stats: bool = Field(
        default=False, description="vLLM's: every chunk carries the usage so far."
    )


class JSONSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="Names the format (OpenAI's rule).")
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema", description="The JSON schema the answer follows.")
    strict: bool | None = Field(default=None, description="Accepted; the schema is always enforced.")


class ResponseFormat(BaseModel):
    """`text` (any text), `json_object` (a JSON object) or `json_schema` (JSON valid
    against the given schema); both JSON kinds are enforced token by token."""

    model_config = REQUEST_CONFIG

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise UnsupportedParameterError(
                "response_format", "response_format takes json_schema exactly when its type is json_schema"
            )
        if self.json_schema is not None:
            try:
                schema_constraint(self.json_schema.json_schema, "response_format")
            except ValueError as exc:
                raise UnsupportedParameterError("response_format", f"response_format: {exc}") from None
        return self

    def constraint(self) -> OutputConstraint | None:
        if self.type == "json_object":
            return schema_constraint({"type": "object"}, "response_format")
        if self.json_schema is not None:
            return schema_constraint(self.json_schema.json_schema, "response_format")
        return None


class _SamplingRequest(BaseModel):
    """Fields shared by both endpoints."""

    model_config = REQUEST_CONFIG

    model: str | None = Field(default=None, description="A served model; unset means the default.")
    temperature: Temperature | None = Field(default=None, description="0 means greedy.")
    top_p: TopP | None = None
    n: int = Field(default=1, ge=1, le=4, description="Choices to generate.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | list[StopString] | None = Field(default=None, description="Up to 4 stop sequences.")
    seed: Seed | None = None
    presence_penalty: OpenAIPenalty = Field(default=0, description="Lowers tokens already generated, once.")
    frequency_penalty: OpenAIPenalty = Field(default=0, description="Lowers tokens by how often they were generated.")
    logit_bias: dict[str, float] | None = Field(default=None, description="Not supported.")
    user: str | None = Field(default=None, description="Accepted and ignored.")
    # Extensions beside OpenAI's parameters, as vLLM's server offers them.
    top_k: TopK | None = Field(default=None, description="Extension: keep the k likeliest tokens.")
    repetition_penalty: RepetitionPenalty | None = Field(default=None, description="Extension.")
    response_format: ResponseFormat | None = Field(
        default=None, description="text, json_object or json_schema (enforced while generating)."
    )
    ignore_eos: bool = Field(default=False, description="Extension: generate past the model's end of text.")
    min_tokens: int = Field(
        default=0, ge=0, le=MAX_NEW_TOKENS_LIMIT,
        description="Extension: the end of text and stop_token_ids are not generated before this many tokens.",
    )
    stop_token_ids: list[int] | None = Field(
        default=None, max_length=MAX_STOP_TOKEN_IDS, description="Extension: these token ids end the text too."
    )
    skip_special_tokens: bool = Field(default=True, description="Extension: leave special tokens' text out.")
    include_stop_str_in_output: bool = Field(
        default=False, description="Extension: the stop string (or stop token) that ended the text is returned."
    )
    priority: int = Field(
        default=0, ge=-(2**63), le=2**63 - 1,  # vLLM's bounds
        description=(
            "Extension (vLLM's): the request's place in its tenant's line for a row of the batch, lower "
            "first, ties by arrival; it never moves a request ahead of another tenant's."
        ),
    )

    @model_validator(mode="after")
    def _only_supported(self) -> "_SamplingRequest":
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise UnsupportedParameterError("stop", "stop takes at most 4 sequences")
        if self.logit_bias:
            raise UnsupportedParameterError("logit_bias", "logit_bias is not supported")
        if self.stream_options is not None and not self.stream:
            raise UnsupportedParameterError("stream_options", "stream_options needs stream: true")
        return self

    @property
    def continuous_usage(self) -> bool:
        """vLLM's rule: usage on every chunk needs include_usage too."""
        return self.include_usage and self.stream_options.continuous_usage_stats

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _params(self, request_id: str, max_new_tokens: int | None, **input_fields: Any) -> GenerationParams:
        return GenerationParams(
            request_id=request_id,
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=self.stop_sequences,
            seed=self.seed,
            num_return_sequences=self.n,
            constraint=self.response_format.constraint() if self.response_format else None,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            priority=self.priority,
            **input_fields,
        )


class CompletionRequest(_SamplingRequest):
    """Body of POST /v1/completions."""

    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]] = Field(
        description=(
            "A prompt, or up to 4 prompts (choices follow their order); each text, or token ids of the "
            "model's vocabulary (used as they are)."
        )
    )
    max_tokens: int | None = Field(
        default=16, ge=0, le=MAX_NEW_TOKENS_LIMIT,
        description="Most tokens per choice (OpenAI's default, 16); 0 with echo scores the prompt only.",
    )
    echo: bool = Field(default=False, description="Return the prompt before the completion.")
    logprobs: TopLogprobs | None = Field(
        default=None,
        description="Log probabilities of each token and of the N likeliest (0..20); the model's, before sampling.",
    )
    best_of: int | None = Field(default=None, description="Only equal to n.")
    suffix: str | None = Field(default=None, description="Not supported.")

    @model_validator(mode="after")
    def _completion_only_supported(self) -> "CompletionRequest":
        prompts = self.prompts
        if not prompts or len(prompts) > 4 or any(not p for p in prompts):
            raise UnsupportedParameterError(
                "prompt", "prompt must be 1 to 4 prompts, each a non-empty string or a non-empty list of token ids"
            )
        if self.stream and len(prompts) > 1:
            raise UnsupportedParameterError("prompt", "a stream takes one prompt")
        if self.max_tokens == 0 and not self.echo:
            raise UnsupportedParameterError("max_tokens", "max_tokens 0 needs echo: true (it scores the prompt only)")
        if self.best_of is not None and self.best_of != self.n:
            raise UnsupportedParameterError("best_of", "best_of is supported only equal to n")
        if self.suffix:
            raise UnsupportedParameterError("suffix", "suffix is not supported")
        asked = len(prompts) * self.n * self.max_tokens if self.max_tokens else 0
        if asked > MAX_REQUEST_NEW_TOKENS:
            raise UnsupportedParameterError(
                "max_tokens",
                f"{len(prompts)} prompts x n={self.n} x max_tokens={self.max_tokens} asks for {asked} new "
                f"tokens; one request may ask for at most {MAX_REQUEST_NEW_TOKENS}: send fewer prompts or "
                "choices per request, or lower max_tokens",
            )
        return self

    @property
    def prompts(self) -> list[str | tuple[int, ...]]:
        """Each prompt: a text, or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and all(isinstance(token, int) for token in self.prompt):
            return [tuple(self.prompt)]
        return [item if isinstance(item, str) else tuple(item) for item in self.prompt]

    @property
    def prompt_length(self) -> int:
        """Characters of text prompts, or token ids (a token is one character or more)."""
        return sum(len(prompt) for prompt in self.prompts)

    def to_generation_params(self, request_id: str, prompt: str | tuple[int, ...]) -> GenerationParams:
        """The handle payload for one of the prompts (see GenerationParams for defaults).
        With echo and logprobs, the prompt's tokens are scored too."""
        text = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": prompt}
        return self._params(
            request_id, self.max_tokens, logprobs=self.logprobs, echo=self.echo,
            prompt_logprobs=self.logprobs if self.echo else None, **text,
        )


class TextPart(BaseModel):
    model_config = REQUEST_CONFIG

    type: Literal["text"]
    text: Text


# Most tools one request may list (OpenAI's limit).
MAX_TOOLS = 128
ToolName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class FunctionDefinition(BaseModel):
    model_config = REQUEST_CONFIG

    name: ToolName = Field(description="The function's name: letters, digits, _ and -, at most 64.")
    description: str | None = Field(default=None, description="What it does (shown to the model).")
    parameters: dict[str, Any] | None = Field(
        default=None, description="Its arguments as a JSON schema of an object; unset: no arguments."
    )
    strict: bool | None = Field(default=None, description="Accepted; the arguments always follow the schema.")


class ToolDefinition(BaseModel):
    model_config = REQUEST_CONFIG

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = REQUEST_CONFIG

    name: str


class NamedToolChoice(BaseModel):
    """`{"type": "function", "function": {"name": ...}}`: call exactly this tool."""

    model_config = REQUEST_CONFIG

    type: Literal["function"]
    function: NamedFunction


class FunctionCallIn(BaseModel):
    model_config = REQUEST_CONFIG

    name: str
    arguments: Text = Field(description="The call's arguments as JSON text.")


class ToolCallIn(BaseModel):
    """A call an earlier assistant turn made."""

    model_config = REQUEST_CONFIG

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(BaseModel):
    model_config = REQUEST_CONFIG

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = Field(default=None, description="An assistant turn's calls.")
    tool_call_id: str | None = Field(default=None, description="A tool turn: the call it answers.")
    # What the openai client sends back when an answer's message is appended as it came.
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: None = None
    function_call: None = None

    @model_validator(mode="after")
    def _turn_shape(self) -> "ChatMessageIn":
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant turn carries tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool turn (and only a tool turn) names the call it answers in tool_call_id")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant turn with tool_calls may omit it)")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    @property
    def chat_role(self) -> str:
        """The role as chat templates know it (OpenAI's `developer` is the older `system`)."""
        return "system" if self.role == "developer" else self.role

    def to_message(self) -> ChatMessage:
        calls = tuple(ToolCall(call.id, call.function.name, call.function.arguments) for call in self.tool_calls or ())
        return ChatMessage(self.chat_role, self.text, calls, self.tool_call_id)

    @property
    def length(self) -> int:
        """Characters of prompt text this turn brings (its calls included)."""
        return len(self.text) + sum(len(call.function.name) + len(call.function.arguments) for call in self.tool_calls or ())


class ChatCompletionRequest(_SamplingRequest):
    """Body of POST /v1/chat/completions; the model's own chat template renders it."""

    messages: list[ChatMessageIn] = Field(
        min_length=1,
        max_length=MAX_CHAT_MESSAGES,
        description=f"The conversation, 1 to {MAX_CHAT_MESSAGES} messages.",
    )
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS_LIMIT, description="Older name of max_completion_tokens.")
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    logprobs: bool = Field(default=False, description="Log probabilities of each content token (the model's).")
    top_logprobs: TopLogprobs | None = Field(
        default=None, description="With logprobs: the N likeliest tokens at each position too (0..20)."
    )
    tools: list[ToolDefinition] | None = Field(
        default=None, max_length=MAX_TOOLS, description="Functions the model may call."
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None, description="none, auto (the default with tools), required, or a named function."
    )
    parallel_tool_calls: bool | None = Field(default=None, description="More than one call per answer (default true).")
    _tool_use: ToolUse | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _chat_only_supported(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise UnsupportedParameterError("top_logprobs", "top_logprobs needs logprobs: true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise UnsupportedParameterError("max_tokens", "give max_completion_tokens or max_tokens, not both")
        self._check_tools()
        return self

    def _check_tools(self) -> None:
        self._tool_use = tool_use_of(self.tools, self.tool_choice, self.parallel_tool_calls)
        if self.tool_use is not None and self.tool_use.calls_possible and self.response_format \
                and self.response_format.constraint():
            raise UnsupportedParameterError(
                "response_format", "response_format with tools needs tool_choice: none (a call is JSON already)"
            )

    @property
    def prompt_chars(self) -> int:
        """Characters of prompt text: the turns and the tools' definitions."""
        return sum(message.length for message in self.messages) + tool_chars(self.tool_use)

    @property
    def tool_use(self) -> ToolUse | None:
        """The tools as the model deployment takes them (None without tools)."""
        return self._tool_use

    def to_generation_params(self, request_id: str) -> GenerationParams:
        """The handle payload; unset max tokens take the model's or service default."""
        messages = tuple(message.to_message() for message in self.messages)
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._params(
            request_id, self.max_completion_tokens or self.max_tokens, messages=messages, logprobs=logprobs,
            tool_use=self.tool_use,
        )


def tool_use_of(
    tools: list[ToolDefinition] | None,
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None,
    parallel_tool_calls: bool | None = None,
) -> ToolUse | None:
    """Validates a request's tools and returns them as the handle payload's ToolUse
    (each schema turned into JSON text once), or None without tools.

    Raises:
        UnsupportedParameterError: naming the tool's field and why.
    """
    names = [tool.function.name for tool in tools or ()]
    specs = []
    for position, tool in enumerate(tools or ()):
        param = f"tools[{position}].function"
        if names.index(tool.function.name) != position:
            raise UnsupportedParameterError(f"{param}.name", f"two tools are named {tool.function.name!r}")
        parameters = tool.function.parameters
        if parameters is not None and parameters.get("type", "object") != "object":
            raise UnsupportedParameterError(
                f"{param}.parameters", "parameters must be the JSON schema of an object (type: object)"
            )
        try:
            schema = schema_constraint(_arguments_schema(tool), f"{param}.parameters").source
        except ValueError as exc:
            raise UnsupportedParameterError(f"{param}.parameters", str(exc)) from None
        specs.append(ToolSpec(tool.function.name, tool.function.description or "", schema))
    if isinstance(tool_choice, NamedToolChoice) and tool_choice.function.name not in names:
        raise UnsupportedParameterError(
            "tool_choice", f"tool_choice names {tool_choice.function.name!r}, which is not in tools"
        )
    if tool_choice not in (None, "none") and not tools:
        raise UnsupportedParameterError("tool_choice", "tool_choice needs tools")
    if not specs:
        return None
    choice, name = tool_choice or "auto", None
    if isinstance(choice, NamedToolChoice):
        choice, name = "function", choice.function.name
    return ToolUse(tuple(specs), choice, name, parallel_tool_calls is not False)


def _arguments_schema(tool: ToolDefinition) -> dict[str, Any]:
    """A tool's arguments' schema: an object (of no properties when none are given)."""
    parameters = tool.function.parameters
    if parameters is None:
        return {"type": "object", "properties": {}, "additionalProperties": False}
    return parameters if "type" in parameters else {"type": "object", **parameters}


def tool_chars(tool_use: ToolUse | None) -> int:
    """Characters of the tools' definitions (they are prompt text too)."""
    return sum(len(tool.parameters) + len(tool.description) for tool in tool_use.tools) if tool_use else 0


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(
        default=0, description="Prompt tokens whose keys and values came from the model replica's prefix cache."
    )


class OpenAIUsage(Usage):
    """OpenAI's usage, with the prompt's details (said, not left out)."""

    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)

    @classmethod
    def of(cls, usage: Usage) -> "OpenAIUsage":
        return cls(**usage.model_dump(), prompt_tokens_details=PromptTokensDetails(cached_tokens=usage._cached_tokens))


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="None for a prompt's first token (echo).")
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int] = Field(description="Where each token starts in the choice's text.")

    @classmethod
    def of(cls, scored: tuple[TokenLogprobs, ...], offset: int = 0) -> "CompletionLogprobs":
        """``offset``: where the first token starts (text already sent, on a stream).
        With echo, ``scored`` begins with the prompt's tokens, the first without a
        log probability (as OpenAI and vLLM answer: null, and null alternatives)."""
        offsets = []
        for entry in scored:
            offsets.append(offset)
            offset += len(entry.chosen.token)
        return cls(
            tokens=[entry.chosen.token for entry in scored],
            token_logprobs=[entry.chosen.logprob for entry in scored],
            top_logprobs=[
                None if entry.chosen.logprob is None else {choice.token: choice.logprob for choice in entry.top}
                for entry in scored
            ],
            text_offset=offsets,
        )


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: OpenAIFinishReason | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: OpenAIUsage | None = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str = Field(description="JSON text valid against the tool's parameters.")


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut

    @classmethod
    def of(cls, call: ToolCall) -> "ToolCallOut":
        return cls(id=call.id, function=FunctionCallOut(name=call.name, arguments=call.arguments))


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="The answer's text; null when it made tool calls.")
    tool_calls: list[ToolCallOut] | None = None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] = Field(description="The token's text as UTF-8 (a piece of a character is U+FFFD's bytes).")

    @classmethod
    def of(cls, choice: TokenChoice) -> "ChatTokenLogprob":
        return cls(token=choice.token, logprob=choice.logprob, bytes=list(choice.token.encode()))


class ChatContentLogprob(ChatTokenLogprob):
    top_logprobs: list[ChatTokenLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatContentLogprob]
    refusal: None = None

    @classmethod
    def of(cls, scored: tuple[TokenLogprobs, ...]) -> "ChatLogprobs":
        return cls(content=[
            ChatContentLogprob(**ChatTokenLogprob.of(entry.chosen).model_dump(),
                               top_logprobs=[ChatTokenLogprob.of(choice) for choice in entry.top])
            for entry in scored
        ])


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: OpenAIFinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: OpenAIUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ray-textgen"
    parent: str | None = Field(default=None, description="For a LoRA adapter, the model it adapts.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
