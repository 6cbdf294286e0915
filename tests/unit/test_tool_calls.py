"""Tool calls: the grammar keeps every call well-formed (on the tiny random model, both
KV caches, greedy and sampled), the reader turns streamed text into OpenAI's call pieces
however the text is cut, and tools reach the prompt through the template or the
fallback."""

import asyncio
import dataclasses
import json

import jsonschema
import pytest

from deployments import tool_calls
from deployments.config import ModelConfig
from deployments.model_server import collect_result
from deployments.protocol import (
    MAX_PARALLEL_TOOL_CALLS,
    ChatMessage,
    GenerationParams,
    InvalidRequestError,
    OutputConstraint,
    ToolCall,
    ToolSpec,
    ToolUse,
)
from deployments.transformers_engine import TransformersEngine
from tests.tiny_model import build_tiny_model

# Short strings and enums: a random model, unlike a trained one, never chooses to close
# a string, so bounded values let its calls end.
WEATHER = ToolSpec("get_weather", "The weather in a city.", json.dumps({
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 6}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}))
ADD = ToolSpec("add", "", json.dumps({
    "$defs": {"Small": {"type": "integer", "minimum": -9, "maximum": 9}},
    "type": "object",
    "properties": {"a": {"$ref": "#/$defs/Small"}, "b": {"$ref": "#/$defs/Small"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}))
TOOLS = (WEATHER, ADD)
SCHEMAS = {tool.name: json.loads(tool.parameters) for tool in TOOLS}


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory):
    """The tiny random model with room for the tools' instructions in its prompt."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama-2k"), context_length=2048)


@pytest.fixture(scope="module", params=["dynamic", "slots"])
def engine(long_context_model, request):
    config = ModelConfig(name="tiny", source=str(long_context_model), dtype="float32", kv_cache=request.param)
    engine = TransformersEngine(config, "cpu")
    engine.load()
    yield engine
    engine.close()


def chat(tool_use: ToolUse, **fields) -> GenerationParams:
    messages = (ChatMessage("user", "What is the weather in Paris, and what is 2 + 3?"),)
    return GenerationParams(messages=messages, tool_use=tool_use, max_new_tokens=160, **fields)


def generate(engine, *params: GenerationParams):
    """Each request's result as the model replica makes it (its readers included)."""

    async def one(prepared):
        fmt = tool_calls.FORMATS.get(prepared.tool_format)
        readers = fmt and tool_calls.ToolCallReaders(fmt, prepared.num_return_sequences)

        async def read():
            async for deltas in engine.generate(prepared):
                yield readers.read(deltas) if readers else deltas

        return await collect_result("tiny", prepared, read())

    async def all_of_them():
        return await asyncio.gather(*(one(engine.prepare(p)) for p in params))

    return asyncio.run(all_of_them())


def assert_calls_valid(sequence, allowed=SCHEMAS, most=MAX_PARALLEL_TOOL_CALLS):
    if sequence.finish_reason == "tool_calls":
        assert 1 <= len(sequence.tool_calls) <= most and sequence.text == ""
    for call in sequence.tool_calls:
        assert call.name in allowed and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments), allowed[call.name])


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 7, "num_return_sequences": 2}])
def test_required_and_named_calls_always_parse_and_validate(engine, sampling):
    required, named, single = generate(
        engine,
        chat(ToolUse(TOOLS, "required"), **sampling),
        chat(ToolUse(TOOLS, "function", "add"), **sampling),
        chat(ToolUse(TOOLS, "required", parallel=False), **sampling),
    )
    for sequence in required.sequences:
        assert sequence.finish_reason in ("tool_calls", "length")
        assert_calls_valid(sequence)
    for sequence in named.sequences:
        assert_calls_valid(sequence, allowed={"add": SCHEMAS["add"]})
    for sequence in single.sequences:
        assert_calls_valid(sequence, most=1)
    finished = [s for r in (required, named, single) for s in r.sequences if s.finish_reason == "tool_calls"]
    assert finished, "no request made a whole call: the test shows nothing"


def test_auto_is_text_without_a_call_marker_or_valid_calls(engine):
    results = generate(
        engine,
        *(chat(ToolUse(TOOLS, "auto"), temperature=1.0, seed=seed, num_return_sequences=2) for seed in range(3)),
    )
    for result in results:
        for sequence in result.sequences:
            if sequence.tool_calls or sequence.finish_reason == "tool_calls":
                assert_calls_valid(sequence)
            else:
                assert "<tool_call>" not in sequence.text and sequence.text


def test_constrained_tool_rows_share_the_batch_with_free_rows(engine):
    free, called = generate(
        engine,
        GenerationParams(prompt="Once upon a time", max_new_tokens=12, temperature=0.0),
        chat(ToolUse(TOOLS, "function", "get_weather"), temperature=0.0),
    )
    assert free.sequences[0].completion_tokens == 12 and not free.sequences[0].tool_calls
    assert_calls_valid(called.sequences[0], allowed={"get_weather": SCHEMAS["get_weather"]})


def test_tool_choice_none_shows_no_tools_and_reads_no_calls(engine):
    prepared = engine.prepare(chat(ToolUse(TOOLS, "none"), temperature=0.0))
    assert prepared.constraint is None and prepared.tool_format is None
    assert "get_weather" not in engine.detokenize(prepared.prompt_token_ids)


def test_a_tool_schema_that_cannot_be_enforced_is_refused_naming_it(engine):
    unenforceable = ToolSpec("odd", "", json.dumps({"type": "object", "properties": {"x": {"not": {"type": "string"}}}}))
    with pytest.raises(InvalidRequestError) as refused:
        engine.prepare(chat(ToolUse((WEATHER, unenforceable), "auto")))
    assert refused.value.param == "tools[1].function.parameters"


def test_fallback_prompt_shows_tools_past_calls_and_results(engine):
    messages = (
        ChatMessage("user", "Weather in Paris?"),
        ChatMessage("assistant", "", (ToolCall("call_1", "get_weather", '{"city": "Paris", "unit": "celsius"}'),)),
        ChatMessage("tool", "21 degrees", tool_call_id="call_1"),
    )
    prepared = engine.prepare(GenerationParams(messages=messages, tool_use=ToolUse(TOOLS, "auto"), max_new_tokens=4))
    prompt = engine.detokenize(prepared.prompt_token_ids)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in prompt
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"' in prompt
    assert "<|im_start|>user\n<tool_response>\n21 degrees\n</tool_response><|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


# A template that takes tools, as Qwen's does (shortened): the tools and calls reach it.
TOOLS_TEMPLATE = (
    "{% if tools %}TOOLS:{% for tool in tools %}{{ tool.function.name }};{% endfor %}\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for call in m.tool_calls or [] %}CALL {{ call.function.name }} {{ call.function.arguments | tojson }}{% endfor %}"
    "{% if m.tool_call_id %} (for {{ m.tool_call_id }}){% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_that_takes_tools_renders_them_itself():
    assert tool_calls.template_takes_tools(TOOLS_TEMPLATE)
    assert not tool_calls.template_takes_tools("{% for m in messages %}{{ m.content }}{% endfor %}")
    messages = (
        ChatMessage("user", "Weather?"),
        ChatMessage("assistant", "", (ToolCall("call_1", "get_weather", '{"city": "Rome"}'),)),
        ChatMessage("tool", "30", tool_call_id="call_1"),
    )
    turns, tools = tool_calls.render_messages(messages, ToolUse(TOOLS), tool_calls.FORMATS["hermes"], True)
    assert [tool["function"]["name"] for tool in tools] == ["get_weather", "add"]
    assert turns[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Rome"}
    assert turns[2] == {"role": "tool", "content": "30", "tool_call_id": "call_1"}
    import jinja2

    rendered = jinja2.Environment().from_string(TOOLS_TEMPLATE).render(
        messages=turns, tools=tools, add_generation_prompt=True
    )
    assert rendered.startswith("TOOLS:get_weather;add;\n") and 'CALL get_weather {"city": "Rome"}' in rendered
    assert "(for call_1)" in rendered


@pytest.mark.parametrize(
    "template, expected",
    [(None, "hermes"), ("... <tool_call> ...", "hermes"), ("[TOOL_CALLS] ...", "mistral"),
     ("<|python_tag|> ipython", "llama3_json")],
)
def test_the_call_format_follows_the_template(template, expected):
    assert tool_calls.format_for_template(template).name == expected


CALLS = (ToolCall("a", "get_weather", '{"city":"Paris","unit":"celsius"}'), ToolCall("b", "add", '{"a":2,"b":3}'))


@pytest.mark.parametrize("name", sorted(tool_calls.FORMATS))
@pytest.mark.parametrize("cut", [1, 3, 7, 1000])
def test_the_reader_gives_the_same_calls_however_the_text_is_cut(name, cut):
    fmt = tool_calls.FORMATS[name]
    text = fmt.write_calls(CALLS).replace(", ", ",").replace(": ", ":").replace(";", "; ").replace(";  ", "; ")
    reader, pieces, content = tool_calls.ToolCallReader(fmt), [], ""
    for start in range(0, len(text), cut):
        more_text, more = reader.feed(text[start:start + cut])
        content += more_text
        pieces += more
    content += reader.finish()
    assert content == "" and reader.calling
    assert [(call.name, call.arguments) for call in tool_calls.join_calls(pieces)] == [
        (call.name, call.arguments) for call in CALLS
    ]
    firsts = [piece for piece in pieces if piece.id is not None]
    assert [piece.index for piece in firsts] == [0, 1] and all(piece.name for piece in firsts)


def test_the_reader_passes_text_on_and_holds_back_only_a_possible_marker():
    reader = tool_calls.ToolCallReader(tool_calls.FORMATS["hermes"])
    assert reader.feed("<tool") == ("", ())
    assert reader.feed("s are fun") == ("<tools are fun", ())
    assert reader.feed(" <tool_call>") == (" <tool_call>", ())  # text stays text
    held = tool_calls.ToolCallReader(tool_calls.FORMATS["hermes"])
    assert held.feed("<tool_c") == ("", ()) and held.finish() == "<tool_c"


def test_a_call_cut_off_by_the_token_limit_is_left_out():
    fmt = tool_calls.FORMATS["hermes"]
    readers = tool_calls.ToolCallReaders(fmt, 1)
    from deployments.protocol import SequenceDelta

    whole = fmt.write_calls(CALLS[:1]).replace(", ", ",").replace(": ", ":")
    [first] = readers.read([SequenceDelta(0, whole + '\n</tool_call>\n<tool_call>\n{"name":"add","arguments":{"a":', 40)])
    [last] = readers.read([SequenceDelta(0, "", 41, "length")])
    assert last.finish_reason == "length"
    calls = tool_calls.join_calls(first.tool_calls + last.tool_calls)
    assert [call.name for call in calls] == ["get_weather"]


def test_a_marker_that_is_a_special_token_is_generated_as_that_token(engine):
    assert tool_calls.lark_literal("a<|im_start|>b", {"<|im_start|>": 1}) == '"a" <[1]> "b"'
    assert tool_calls.lark_literal("<tool_call>\n", {}) == '"<tool_call>\\n"'
    mistral = dataclasses.replace(tool_calls.FORMATS["mistral"], start="<|im_start|>[")  # as if a special token
    grammar = mistral.grammar(ToolUse(TOOLS, "required"), engine._lark_literal)
    assert "<[1]>" in grammar
    matcher = engine._grammars.matcher(OutputConstraint("lark", grammar, "tools"))
    call = '[{"name":"add","arguments":{"a":1,"b":2}}]'
    assert matcher.try_consume_tokens([1, *engine._tokenizer(call, add_special_tokens=False)["input_ids"]]) > 1
