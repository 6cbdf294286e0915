"""The clients people point at an OpenAI-compatible server, through `serve run
configs/serve.yaml` with the embedded SmolLM2, driven as their documentation shows with
base_url pointed here: tool calling with the `openai` client, LangChain's `bind_tools`
and structured output, and the OpenAI Agents SDK (whatever the model chooses, every
call's arguments parse and validate against its tool's parameters); a serving
benchmark's requests (vLLM's extensions) and probes; a harness's tokenizer lookup."""

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.integration.test_serve_run import served  # noqa: F401 - the module's own `serve run`

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "The city, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
TIME_PARAMETERS = {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
                                      "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone.",
                                      "parameters": TIME_PARAMETERS}},
]
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}
QUESTION = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def client(served):  # noqa: F811
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", timeout=120, max_retries=0)


def assert_valid_calls(message, allowed=SCHEMAS):
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), allowed[call.function.name])


def test_a_named_tool_is_called_with_valid_arguments(client):
    chat = client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=TOOLS, temperature=0, max_tokens=80, parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = chat.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    assert_valid_calls(choice.message, {"get_weather": WEATHER_PARAMETERS})
    assert json.loads(choice.message.tool_calls[0].function.arguments)["city"] == "Paris"
    assert chat.usage.completion_tokens > 0


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 3, "n": 2}])
def test_required_calls_validate_greedy_and_sampled(client, sampling):
    chat = client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="required", max_tokens=120, **sampling
    )
    for choice in chat.choices:
        assert choice.finish_reason in ("tool_calls", "length")
        assert_valid_calls(choice.message)


def test_parallel_calls_are_several_and_each_valid(client):
    chat = client.chat.completions.create(
        model=MODEL, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=150,
        messages=[{"role": "user", "content": "What are the weather and the time in Paris and in Tokyo?"}],
    )
    message = chat.choices[0].message
    assert chat.choices[0].finish_reason == "tool_calls" and len(message.tool_calls) >= 2
    assert_valid_calls(message)
    assert len({call.id for call in message.tool_calls}) == len(message.tool_calls)


def test_auto_gives_text_or_valid_calls_and_none_gives_text(client):
    for seed in range(3):
        chat = client.chat.completions.create(
            model=MODEL, messages=QUESTION, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=60
        )
        message = chat.choices[0].message
        if message.tool_calls:
            assert_valid_calls(message)
        else:
            assert message.content and "<tool_call>" not in message.content
    plain = client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=40
    )
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content


def test_a_two_turn_loop_calls_then_answers_from_the_result(client, served):  # noqa: F811
    """The agent loop: the call, the tool's result sent back (the assistant message as the
    client returned it), then the final answer."""
    messages = list(QUESTION)
    first = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=80, parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    call = first.choices[0].message.tool_calls[0]
    messages.append(first.choices[0].message)
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21})})
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=60)
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.content
    assert final.usage.prompt_tokens > first.usage.prompt_tokens
    # An RL or agent framework (verifiers' shape) tokenizes the same conversation and
    # tools through vLLM's /tokenize, and must get exactly the ids the chat request ran.
    as_json = [m if isinstance(m, dict) else m.model_dump(exclude_none=True) for m in messages]
    tokenized = httpx.post(f"{served.url}/tokenize", json={"model": MODEL, "messages": as_json, "tools": TOOLS},
                           timeout=30).json()
    assert tokenized["count"] == final.usage.prompt_tokens == len(tokenized["tokens"])
    without_tools = httpx.post(f"{served.url}/tokenize", json={"messages": as_json}, timeout=30).json()
    assert without_tools["count"] < tokenized["count"], "the tools' definitions are part of the prompt"
    unopened = httpx.post(f"{served.url}/tokenize", timeout=30, json={
        "messages": as_json, "tools": TOOLS, "add_generation_prompt": False,
    }).json()["tokens"]
    assert tokenized["tokens"][: len(unopened)] == unopened and len(unopened) < tokenized["count"]


def test_streamed_calls_arrive_as_openai_deltas(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=150,
        stream=True, stream_options={"include_usage": True},
    )
    calls, finish_reason, usage, fragments = {}, None, None, 0
    for chunk in stream:
        if not chunk.choices:
            usage = chunk.usage
            continue
        delta = chunk.choices[0].delta
        for piece in delta.tool_calls or ():
            if piece.id is not None:
                assert piece.index not in calls and piece.type == "function" and piece.function.name
                calls[piece.index] = {"id": piece.id, "name": piece.function.name, "arguments": ""}
            calls[piece.index]["arguments"] += piece.function.arguments or ""
            fragments += 1
        assert not delta.content
        finish_reason = chunk.choices[0].finish_reason or finish_reason
    assert finish_reason == "tool_calls" and usage.completion_tokens > 0
    assert calls and fragments > len(calls), "arguments should arrive in fragments"
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    whole = client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=150
    )
    assert [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls] == [
        (call["name"], call["arguments"]) for call in calls.values()
    ]


def test_langchain_bind_tools_runs_an_agent_loop(served):  # noqa: F811
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str, unit: str) -> str:
        """Current weather in a city; unit is celsius or fahrenheit."""
        return json.dumps({"city": city, "temperature": 21, "unit": unit})

    llm = ChatOpenAI(base_url=f"{served.url}/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=80)
    forced = llm.bind_tools([get_weather], tool_choice="get_weather")
    messages = [HumanMessage("What is the weather like in Paris today?")]
    answer = forced.invoke(messages)
    assert answer.tool_calls and answer.tool_calls[0]["name"] == "get_weather"
    assert set(answer.tool_calls[0]["args"]) <= {"city", "unit"} and "city" in answer.tool_calls[0]["args"]
    messages.append(answer)
    for call in answer.tool_calls:
        messages.append(ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"]))
    final = llm.bind_tools([get_weather]).invoke(messages)
    assert final.content or final.tool_calls


class Flight(BaseModel):
    """A flight booking."""

    origin: str = Field(description="Departure city")
    destination: str = Field(description="Arrival city")
    passengers: int = Field(ge=1, le=9)


def test_langchain_structured_output_by_function_calling(served):  # noqa: F811
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{served.url}/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=100)
    booking = llm.with_structured_output(Flight, method="function_calling").invoke(
        "Book a flight from Paris to Rome for 2 passengers."
    )
    assert isinstance(booking, Flight) and 1 <= booking.passengers <= 9


def test_openai_agents_sdk_runs_a_tool_and_answers(served):  # noqa: F811
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # its traces would go to OpenAI's servers
    called = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        called.append(city)
        return f"It is 21 degrees and sunny in {city}."

    agent = Agent(
        name="Assistant",
        instructions="Answer with the help of your tools.",
        model=OpenAIChatCompletionsModel(
            model=MODEL, openai_client=openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="unused")
        ),
        model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=80),
        tools=[get_weather],
    )
    result = asyncio.run(Runner.run(agent, "What is the weather like in Paris?", max_turns=4))
    assert called and all(isinstance(city, str) and city for city in called)
    assert isinstance(result.final_output, str) and result.final_output


def test_a_serving_benchmarks_stream_gets_exactly_max_tokens_and_usage_on_every_chunk(client):
    """What guidellm sends: ignore_eos and stream_options.continuous_usage_stats."""
    stream = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=48, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True},
    )
    counts = []
    for chunk in stream:
        assert chunk.usage is not None, "every chunk carries the usage so far"
        counts.append(chunk.usage.completion_tokens)
    assert counts == sorted(counts) and counts[-1] == 48
    unstreamed = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=40,
        temperature=0, extra_body={"ignore_eos": True},
    )
    assert unstreamed.usage.completion_tokens == 40 and unstreamed.choices[0].finish_reason == "length"
    short = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=40,
        temperature=0,
    )
    assert short.usage.completion_tokens < 40, "without ignore_eos the model ends its answer"


def test_vllm_sampling_extensions_and_still_strict_on_unknown_fields(client):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    kept = client.chat.completions.create(
        model=MODEL, messages=question, max_tokens=20, temperature=0,
        extra_body={"stop": ["Paris"], "include_stop_str_in_output": True, "min_tokens": 2},
    )
    assert kept.choices[0].message.content.endswith("Paris")
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=question, extra_body={"guided_choice": ["a"]})
    assert refused.value.body["param"] == "guided_choice" and "unknown field" in refused.value.body["message"]


def test_vllm_priority_is_taken_on_both_routes_and_checked(client):
    """vLLM's per-request priority (lower first within the tenant's line; the order
    itself is shown on the engine, tests/unit/test_fair_share.py)."""
    question = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model=MODEL, messages=question, max_tokens=4, extra_body={"priority": -5})
    completion = client.completions.create(model=MODEL, prompt="Paris is", max_tokens=4, extra_body={"priority": 3})
    assert chat.usage.completion_tokens > 0 and completion.usage.completion_tokens > 0
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt="Paris is", max_tokens=4, extra_body={"priority": "high"})
    assert refused.value.body["param"] == "priority"


def test_probes_version_and_tokenizer_info(served):  # noqa: F811
    for method, path in (("GET", "/health"), ("GET", "/ping"), ("POST", "/ping")):
        response = httpx.request(method, f"{served.url}{path}", timeout=30)
        assert response.status_code == 200 and response.content == b""
    assert httpx.get(f"{served.url}/version", timeout=30).json()["version"]
    info = httpx.get(f"{served.url}/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == "<|im_end|>" and "<|im_start|>" in info["chat_template"]
    assert info["tokenizer_class"] and info["model_max_length"] == 8192


@pytest.fixture(scope="module")
def reference_model():
    """The embedded model in this process, float32: what a forward pass over the whole
    text says."""
    import torch
    from transformers import AutoModelForCausalLM

    from deployments.transformers_engine import prepare_embedded_model

    model = AutoModelForCausalLM.from_pretrained(prepare_embedded_model(), dtype=torch.float32)
    return model.eval()


def test_an_evaluation_harness_scores_token_id_prompts(client, served, reference_model):  # noqa: F811
    """lm-evaluation-harness's loglikelihood request: token ids, echo, logprobs 1, and
    max_tokens 0 or 1; the scores are the model's own."""
    import torch

    ids = httpx.post(f"{served.url}/tokenize", json={"prompt": "The capital of France is Paris"}, timeout=30).json()
    ids = ids["tokens"]
    with torch.inference_mode():
        expected = reference_model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    dtype = httpx.get(f"{served.url}/readyz", timeout=30).json()["models"][MODEL]["dtype"]
    tolerance = 2e-3 if dtype == "float32" else 0.15  # bfloat16 (AMX) rounds its weights
    for max_tokens in (0, 1):
        scored = client.completions.create(model=MODEL, prompt=ids, echo=True, logprobs=1, max_tokens=max_tokens,
                                           temperature=0)
        choice = scored.choices[0]
        assert choice.text.startswith("The capital of France is Paris")
        logprobs = choice.logprobs
        assert len(logprobs.tokens) == len(ids) + max_tokens and logprobs.token_logprobs[0] is None
        assert logprobs.top_logprobs[0] is None and all(len(top) == 1 for top in logprobs.top_logprobs[1:])
        for position in range(1, len(ids)):
            assert logprobs.token_logprobs[position] == pytest.approx(
                expected[position - 1, ids[position]].item(), abs=tolerance
            )
        assert scored.usage.prompt_tokens == len(ids) and scored.usage.completion_tokens == max_tokens
    batch = client.completions.create(model=MODEL, prompt=[ids[:3], ids], echo=True, logprobs=0, max_tokens=0)
    assert [len(c.logprobs.tokens) for c in batch.choices] == [3, len(ids)]
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt=[1, 2, 10**7], max_tokens=1)
    assert refused.value.body["param"] == "prompt[2]"
    native = httpx.post(f"{served.url}/generate", json={"prompt_token_ids": ids, "prompt_logprobs": 0,
                                                        "max_new_tokens": 0}, timeout=60).json()
    assert [entry["token_id"] for entry in native["prompt_logprobs"]] == ids
    assert native["prompt_logprobs"][1]["logprob"] == pytest.approx(logprobs.token_logprobs[1], abs=1e-5)
