"""Tool calls: how a model is shown its tools, the grammar that keeps its calls
well-formed, and how its text is read back as OpenAI's tool calls.

A model family writes calls in its own syntax (`FORMATS`): Hermes-style
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Qwen, Hermes, SmolLM3),
Llama 3's bare JSON ``{"name": ..., "parameters": {...}}`` (``; `` between calls), or
Mistral's ``[TOOL_CALLS][{...}, ...]``. With calls possible, every row is constrained by
a grammar (llguidance's Lark syntax, `ToolCallFormat.grammar`): its calls are JSON valid
against the tool's ``parameters``, so `arguments` always parse; with ``auto`` the answer
is either text that never contains the format's call marker, or calls. The reader
(`ToolCallReader`) then turns the text into calls as it streams.

Torch-free and Ray-free: the engine renders and constrains with it, the model replica
reads with it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from deployments.protocol import (
    MAX_PARALLEL_TOOL_CALLS,
    ChatMessage,
    SequenceDelta,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
    ToolUse,
)

# Rust-regex metacharacters, and the slash that delimits a Lark regex.
_REGEX_SPECIAL = set(r"\.+*?()|[]{}^$#&-~/")


@dataclasses.dataclass(frozen=True)
class ToolCallFormat:
    """One family's call syntax: ``start`` call (``separator`` call)* ``end``, each call
    a JSON object with the function's ``name`` and its arguments under
    ``arguments_key``. An answer is calls exactly when it begins with ``marker``."""

    name: str
    marker: str
    start: str
    separator: str
    end: str
    arguments_key: str
    # Whether text may not hold the marker anywhere (a marker inside text would be a
    # call the reader never sees), or only not at its start (Llama's `{`).
    marker_anywhere: bool
    how_to_call: str  # the fallback prompt's instructions (see render_messages)

    def write_calls(self, calls: Sequence[ToolCall]) -> str:
        """Earlier calls as this family writes them (the fallback renders past turns so)."""
        bodies = [
            json.dumps({"name": call.name, self.arguments_key: _arguments_value(call.arguments)}, ensure_ascii=False)
            for call in calls
        ]
        return self.start + self.separator.join(bodies) + self.end

    def grammar(self, tool_use: ToolUse, literal: Callable[[str], str] = json.dumps) -> str:
        """The Lark grammar (llguidance's dialect) of an answer under ``tool_use``.

        Args:
            literal: the Lark expression of a fixed text; the engine's turns a piece that
                is one of the tokenizer's special tokens into that token (``<[id]>``).
        """
        tools = tool_use.tools
        if tool_use.choice == "function":
            tools = tuple(tool for tool in tools if tool.name == tool_use.function_name)
        most = MAX_PARALLEL_TOOL_CALLS if tool_use.parallel else 1
        more = f' ({literal(self.separator)} call){{0,{most - 1}}}' if most > 1 else ""
        lines = [
            f"calls: {literal(self.start)} call{more} {literal(self.end)}".replace(' ""', ""),
            f"call: %json {json.dumps(self.call_schema(tools), ensure_ascii=False)}",
        ]
        if tool_use.choice == "auto":
            marker = "".join("\\" + c if c in _REGEX_SPECIAL else c for c in self.marker)
            banned = f"(?s:.*{marker}.*)" if self.marker_anywhere else f"(?s:{marker}.*)"
            lines = ["start: calls | TEXT", *lines, f"TEXT: /(?s:.+)/ & ~/{banned}/"]
        else:
            lines = ["start: calls", *lines]
        return "\n".join(lines) + "\n"

    def call_schema(self, tools: Sequence[ToolSpec]) -> dict[str, Any]:
        """The JSON schema of one call to any of ``tools``: the name first, then the
        arguments valid against that tool's parameters. Each tool's ``$defs`` move to
        the root under a prefix of their own, so that its ``$ref``s still resolve.
        Arguments the parameters do not name are not generated (``additionalProperties``
        unset counts as false, as OpenAI's strict mode requires): SmolLM2 otherwise
        invented keys, repeated ones among them, in most calls."""
        definitions: dict[str, Any] = {}
        options = []
        for position, tool in enumerate(tools):
            parameters = json.loads(tool.parameters)
            own = {}
            for key in ("$defs", "definitions"):
                if isinstance(parameters.get(key), dict):
                    own.update(parameters.pop(key))
            prefix = f"tool{position}_"
            parameters = _prefixed_refs(parameters, prefix, own)
            parameters.setdefault("additionalProperties", False)
            definitions.update({prefix + key: _prefixed_refs(value, prefix, own) for key, value in own.items()})
            options.append({
                "type": "object",
                "properties": {"name": {"const": tool.name}, self.arguments_key: parameters},
                "required": ["name", self.arguments_key],
                "additionalProperties": False,
            })
        schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
        if definitions:
            schema = {**schema, "$defs": definitions}
        # Compact JSON: no tokens spent on whitespace, and the reader's offsets are plain.
        return {**schema, "x-guidance": {"whitespace_flexible": False}}


def lark_literal(text: str, special_tokens: Mapping[str, int]) -> str:
    """``text`` in Lark, each of ``special_tokens`` (text -> id) in it as that token:
    a string literal would spell a special token out of ordinary tokens, which a model
    never writes."""
    if not special_tokens:
        return json.dumps(text, ensure_ascii=False)
    pattern = "(" + "|".join(map(re.escape, sorted(special_tokens, key=len, reverse=True))) + ")"
    return " ".join(
        f"<[{special_tokens[part]}]>" if part in special_tokens else json.dumps(part, ensure_ascii=False)
        for part in re.split(pattern, text) if part
    )


def _arguments_value(arguments: str) -> Any:
    """A past call's arguments as JSON (a client may have sent text that is not JSON)."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _prefixed_refs(node: Any, prefix: str, names: Mapping[str, Any]) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                for root in ("#/$defs/", "#/definitions/"):
                    if value.startswith(root) and value[len(root):].split("/")[0] in names:
                        value = "#/$defs/" + prefix + value[len(root):]
            out[key] = _prefixed_refs(value, prefix, names)
        return out
    if isinstance(node, list):
        return [_prefixed_refs(item, prefix, names) for item in node]
    return node


_HERMES_HOW = (
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call>"
)
FORMATS: dict[str, ToolCallFormat] = {
    "hermes": ToolCallFormat(
        "hermes", marker="<tool_call>", start="<tool_call>\n", separator="\n</tool_call>\n<tool_call>\n",
        end="\n</tool_call>", arguments_key="arguments", marker_anywhere=True, how_to_call=_HERMES_HOW,
    ),
    "llama3_json": ToolCallFormat(
        "llama3_json", marker="{", start="", separator="; ", end="", arguments_key="parameters",
        marker_anywhere=False,
        how_to_call=(
            "To call a function, respond only with a JSON object of the form "
            "{\"name\": <function-name>, \"parameters\": <args-json-object>}; separate several calls with \"; \"."
        ),
    ),
    "mistral": ToolCallFormat(
        "mistral", marker="[TOOL_CALLS]", start="[TOOL_CALLS][", separator=",", end="]",
        arguments_key="arguments", marker_anywhere=True,
        how_to_call=(
            "To call functions, respond with [TOOL_CALLS] followed by a JSON list of calls: "
            "[TOOL_CALLS][{\"name\": <function-name>, \"arguments\": <args-json-object>}]"
        ),
    ),
}


def format_for_template(template: str | None) -> ToolCallFormat:
    """The call syntax a chat template teaches (`tool_call_format: auto`): Mistral's
    when it writes ``[TOOL_CALLS]``, Llama 3's when it speaks of ``<|python_tag|>`` or
    ``ipython`` turns, else Hermes' (also the fallback's, for templates without tools)."""
    template = template or ""
    if "[TOOL_CALLS]" in template:
        return FORMATS["mistral"]
    if "<tool_call>" not in template and ("<|python_tag|>" in template or "ipython" in template):
        return FORMATS["llama3_json"]
    return FORMATS["hermes"]


def template_takes_tools(template: str | None) -> bool:
    """Whether a chat template reads a ``tools`` variable (transformers passes the
    ``tools=`` of apply_chat_template as one)."""
    if not template:
        return False
    import jinja2
    import jinja2.meta

    try:
        return "tools" in jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateSyntaxError:
        return "tools" in template


def tool_definition(tool: ToolSpec) -> dict[str, Any]:
    """OpenAI's (and chat templates') shape of a tool."""
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    function["parameters"] = json.loads(tool.parameters)
    return {"type": "function", "function": function}


def render_messages(
    messages: Sequence[ChatMessage], tool_use: ToolUse | None, fmt: ToolCallFormat, template_has_tools: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The conversation as apply_chat_template takes it, and its ``tools=`` argument.

    A template that takes tools gets them, and the turns in transformers' shapes
    (assistant ``tool_calls`` with their arguments as objects, ``tool`` turns with
    ``tool_call_id``). For one that does not (the fallback), the tools are described in
    the system turn in Hermes' words with ``fmt``'s call syntax, earlier calls are
    written into their assistant turns in that syntax, and tool results become user
    turns inside ``<tool_response>`` tags (consecutive results in one turn), as Qwen's
    template renders them. With ``tool_choice: none`` the tools are not shown.
    """
    show_tools = tool_use is not None and tool_use.calls_possible
    if template_has_tools:
        turns = []
        for message in messages:
            turn: dict[str, Any] = {"role": message.role, "content": message.content}
            if message.tool_calls:
                turn["tool_calls"] = [
                    {"id": call.id, "type": "function",
                     "function": {"name": call.name, "arguments": _arguments_value(call.arguments)}}
                    for call in message.tool_calls
                ]
            if message.tool_call_id is not None:
                turn["tool_call_id"] = message.tool_call_id
            turns.append(turn)
        return turns, [tool_definition(tool) for tool in tool_use.tools] if show_tools else None
    turns = []
    for message in messages:
        if message.role == "tool":
            result = f"<tool_response>\n{message.content}\n</tool_response>"
            if turns and turns[-1].get("tool_results"):
                turns[-1]["content"] += "\n" + result
            else:
                turns.append({"role": "user", "content": result, "tool_results": True})
        elif message.tool_calls:
            calls = fmt.write_calls(message.tool_calls)
            turns.append({"role": message.role, "content": f"{message.content}\n{calls}" if message.content else calls})
        else:
            turns.append({"role": message.role, "content": message.content})
    for turn in turns:
        turn.pop("tool_results", None)
    if show_tools:
        listed = "\n".join(json.dumps(tool_definition(tool), ensure_ascii=False) for tool in tool_use.tools)
        instructions = (
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{listed}\n"
            f"</tools>\n\n{fmt.how_to_call}"
        )
        if turns and turns[0]["role"] == "system":
            turns[0]["content"] = f"{turns[0]['content']}\n\n{instructions}"
        else:
            turns.insert(0, {"role": "system", "content": instructions})
    return turns, None


def json_value_end(text: str, start: int) -> int | None:
    """Where the JSON object or array that begins at ``start`` ends (the index after
    it), or None while it is incomplete."""
    depth, in_string, escaped = 0, False, False
    for position in range(start, len(text)):
        char = text[position]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return position + 1
    return None


_NAME = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,')


@dataclasses.dataclass
class _Call:
    name: str | None
    arguments: str  # as much as has been generated


def read_calls(fmt: ToolCallFormat, text: str) -> list[_Call]:
    """The calls in ``text`` (which begins with ``fmt.start``, or part of it), the last
    possibly incomplete: its name once generated whole, its arguments so far."""
    if not text.startswith(fmt.start):
        return []
    calls, position = [], len(fmt.start)
    arguments_key = re.compile(r'\s*"' + re.escape(fmt.arguments_key) + r'"\s*:\s*')
    while position < len(text):
        name_match = _NAME.match(text, position)
        if name_match is None:
            calls.append(_Call(None, ""))
            break
        call = _Call(json.loads(name_match.group(1)), "")
        calls.append(call)
        key_match = arguments_key.match(text, name_match.end())
        if key_match is None:
            break
        arguments_end = json_value_end(text, key_match.end())
        call.arguments = text[key_match.end(): arguments_end]
        call_end = None if arguments_end is None else text.find("}", arguments_end)
        if call_end is None or call_end < 0 or not text.startswith(fmt.separator, call_end + 1):
            break
        position = call_end + 1 + len(fmt.separator)
    return calls


def new_call_id() -> str:
    """OpenAI's shape of a call id."""
    return "call_" + secrets.token_hex(12)


class ToolCallReader:
    """Reads one sequence's text as it is generated: text goes on as content; once the
    text begins with the format's marker it is calls, passed on as `ToolCallDelta`s
    (each call's id and name once its name is whole, then fragments of its arguments).
    Text that might still become the marker is held back until it is clear."""

    def __init__(self, fmt: ToolCallFormat) -> None:
        self._format = fmt
        self._held = ""
        self._mode: str | None = None  # None (undecided), "text" or "calls"
        self._sent: list[tuple[str, int]] = []  # per call: its id, argument characters sent

    @property
    def calling(self) -> bool:
        return self._mode == "calls"

    def feed(self, text: str) -> tuple[str, tuple[ToolCallDelta, ...]]:
        """Takes new text; returns the content and the call pieces to pass on."""
        if self._mode == "text":
            return text, ()
        self._held += text
        if self._mode is None:
            if self._held.startswith(self._format.marker):
                self._mode = "calls"
            elif self._format.marker.startswith(self._held):
                return "", ()
            else:
                self._mode = "text"
                content, self._held = self._held, ""
                return content, ()
        return "", self._pieces()

    def finish(self) -> str:
        """Releases held text when the sequence ends (it never became the marker)."""
        if self._mode is None:
            self._mode = "text"
            content, self._held = self._held, ""
            return content
        return ""

    def _pieces(self) -> tuple[ToolCallDelta, ...]:
        pieces = []
        for index, call in enumerate(read_calls(self._format, self._held)):
            if call.name is None:
                break
            if index == len(self._sent):
                self._sent.append((new_call_id(), 0))
                pieces.append(ToolCallDelta(index, id=self._sent[index][0], name=call.name, arguments=call.arguments))
            elif len(call.arguments) > self._sent[index][1]:
                pieces.append(ToolCallDelta(index, arguments=call.arguments[self._sent[index][1]:]))
            self._sent[index] = (self._sent[index][0], len(call.arguments))
        return tuple(pieces)


def join_calls(pieces: Sequence[ToolCallDelta]) -> tuple[ToolCall, ...]:
    """The calls that streamed ``pieces`` make, leaving out one whose arguments do not
    parse (cut off by the token limit): no half call is ever returned whole."""
    calls: dict[int, list[str]] = {}
    for piece in pieces:
        if piece.id is not None:
            calls[piece.index] = [piece.id, piece.name or "", ""]
        calls[piece.index][2] += piece.arguments
    whole = []
    for _, (call_id, name, arguments) in sorted(calls.items()):
        try:
            json.loads(arguments)
        except ValueError:
            continue
        whole.append(ToolCall(call_id, name, arguments))
    return tuple(whole)


class ToolCallReaders:
    """A request's readers, one per returned sequence: rewrites its deltas so that the
    text of calls arrives as `ToolCallDelta`s, and a sequence that ended after calls
    ends with ``tool_calls`` (a call cut off by the token limit still says ``length``)."""

    def __init__(self, fmt: ToolCallFormat, sequences: int) -> None:
        self._readers = [ToolCallReader(fmt) for _ in range(sequences)]

    def read(self, deltas: Sequence[SequenceDelta]) -> list[SequenceDelta]:
        read = []
        for delta in deltas:
            reader = self._readers[delta.index]
            text, pieces = reader.feed(delta.text)
            finish_reason = delta.finish_reason
            if finish_reason is not None:
                text += reader.finish()
                if reader.calling and finish_reason != "length":
                    finish_reason = "tool_calls"
            read.append(dataclasses.replace(delta, text=text, tool_calls=pieces, finish_reason=finish_reason))
        return read
