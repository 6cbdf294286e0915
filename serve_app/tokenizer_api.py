"""POST /tokenize and /detokenize, in vLLM's shapes: what a prompt or a conversation
costs in tokens, and the text of token ids, from the model's own tokenizer and chat
template. They count against a client's request limits, never its token quotas (they
generate nothing)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from pydantic import BaseModel, Field, PrivateAttr, model_validator

from deployments.protocol import TokenizeParams, ToolUse
from serve_app import streaming
from serve_app.access import AccessControl
from serve_app.openai_schemas import (
    MAX_CHAT_MESSAGES, MAX_TOOLS, REQUEST_CONFIG, ChatMessageIn, Text, ToolDefinition, UnsupportedParameterError,
    tool_chars, tool_use_of,
)

if TYPE_CHECKING:
    from serve_app.ingress import Ingress

# Most ids one /detokenize takes (a whole context of the largest models, and then some).
MAX_DETOKENIZE_TOKENS = 1 << 17


class TokenizeRequest(BaseModel):
    """A prompt, or messages rendered by the model's chat template (not both)."""

    model_config = REQUEST_CONFIG

    model: str | None = Field(default=None, description="A served model; unset means the default.")
    prompt: Text | None = Field(default=None, min_length=1, description="Text to tokenize as a prompt.")
    messages: list[ChatMessageIn] | None = Field(
        default=None, min_length=1, max_length=MAX_CHAT_MESSAGES, description="A conversation, as on chat completions."
    )
    add_special_tokens: bool | None = Field(
        default=None,
        description="The tokenizer's special tokens (BOS); default true for a prompt, false for messages (as vLLM).",
    )
    add_generation_prompt: bool = Field(
        default=True, description="With messages: end with the opening of the assistant's turn, as a chat request does."
    )
    tools: list[ToolDefinition] | None = Field(
        default=None, max_length=MAX_TOOLS,
        description="With messages: tools rendered as a chat request with these tools renders them (tool_choice auto).",
    )
    _tool_use: ToolUse | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise UnsupportedParameterError("prompt", "give prompt or messages (one of them)")
        if self.tools and self.messages is None:
            raise UnsupportedParameterError("tools", "tools are rendered with messages; a prompt takes none")
        self._tool_use = tool_use_of(self.tools)
        return self

    @property
    def characters(self) -> tuple[int, str]:
        """The text's length and the field that holds it (for the prompt length limit)."""
        if self.prompt is not None:
            return len(self.prompt), "prompt"
        return sum(message.length for message in self.messages) + tool_chars(self._tool_use), "messages"

    def to_params(self) -> TokenizeParams:
        if self.prompt is not None:
            return TokenizeParams(prompt=self.prompt, add_special_tokens=self.add_special_tokens is not False)
        return TokenizeParams(
            messages=tuple(message.to_message() for message in self.messages),
            add_special_tokens=bool(self.add_special_tokens),
            add_generation_prompt=self.add_generation_prompt,
            tool_use=self._tool_use,
        )


class TokenizeResponse(BaseModel):
    count: int = Field(description="How many tokens.")
    max_model_len: int = Field(description="The model's context: prompt and new tokens together fit in it.")
    tokens: list[int]


class DetokenizeRequest(BaseModel):
    model_config = REQUEST_CONFIG

    model: str | None = Field(default=None, description="A served model; unset means the default.")
    tokens: list[int] = Field(max_length=MAX_DETOKENIZE_TOKENS, description="Token ids of the model's vocabulary.")


class DetokenizeResponse(BaseModel):
    prompt: str = Field(description="The text of the tokens, special tokens included.")


def add_tokenizer_routes(app: FastAPI, ingress: Ingress, access: AccessControl, responses: dict) -> None:
    """Registers /tokenize, /detokenize and /tokenizer_info on ``app``."""

    @app.post("/tokenize", response_model=TokenizeResponse, responses=responses,
              summary="The token ids of a prompt or a conversation.")
    async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
        handle = ingress.begin(request, body.model, *body.characters)
        result = await streaming.ask(
            request, access, handle, lambda: handle.tokenize.remote(body.to_params(), request.state.request_id)
        )
        return TokenizeResponse(count=len(result.tokens), max_model_len=result.context_length, tokens=list(result.tokens))

    @app.get("/tokenizer_info", responses=responses,
             summary="The tokenizer's configuration and chat template (vLLM's shape).")
    async def tokenizer_info(request: Request, model: str | None = None) -> dict:
        handle = ingress.begin(request, model, 0, "model")
        return await streaming.ask(request, access, handle, lambda: handle.tokenizer_info.remote())

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=responses,
              summary="The text of token ids.")
    async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
        handle = ingress.begin(request, body.model, 0, "tokens")
        text = await streaming.ask(
            request, access, handle, lambda: handle.detokenize.remote(tuple(body.tokens), request.state.request_id)
        )
        return DetokenizeResponse(prompt=text)
