"""Structured outputs in the engine (llguidance masks per row) on the tiny random model:
whatever a random model samples, a constrained sequence's text matches its schema or
expression; constrained and free rows share a batch on both KV caches; a schema that
cannot be enforced is refused before generation, naming the field and the reason."""

import asyncio
import json
import re
import threading
from typing import Annotated, Literal

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from deployments.protocol import GenerationParams, InvalidRequestError, OutputConstraint
from deployments.transformers_engine.grammars import Grammars, mask_disallowed
from tests.unit.test_transformers_engine import run


class Address(BaseModel):
    model_config = ConfigDict(extra="forbid")

    city: str = Field(max_length=8)
    zip_code: int = Field(ge=10000, le=99999)


class Person(BaseModel):
    """Nested model ($defs), an enum, bounded numbers, an optional field, an array. Strings
    are short and extra keys forbidden: a random model, unlike a trained one, never
    chooses to close a string."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=6)
    role: Literal["admin", "user", "guest"]
    age: int = Field(ge=0, le=120)
    score: float = Field(ge=-1, le=1)
    address: Address
    nicknames: list[Annotated[str, Field(max_length=6)]] = Field(max_length=2)
    manager: bool | None = None


SCHEMAS = {
    "person": Person.model_json_schema(),
    "flat": {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green"]}, "n": {"type": "integer", "minimum": 1, "maximum": 99},
                       "ok": {"type": "boolean"}},
        "required": ["colour", "n", "ok"],
        "additionalProperties": False,
    },
    "array": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 4},
}


def json_schema(name: str) -> OutputConstraint:
    return OutputConstraint("json_schema", json.dumps(SCHEMAS[name]), "json_schema")


def assert_valid(name: str, text: str) -> None:
    value = json.loads(text)
    if name == "person":
        Person.model_validate(value)
    elif name == "flat":
        assert set(value) == {"colour", "n", "ok"} and value["colour"] in ("red", "green")
        assert 1 <= value["n"] <= 99 and isinstance(value["ok"], bool)
    else:
        assert 1 <= len(value) <= 4 and all(isinstance(v, int) and -5 <= v <= 5 for v in value)


def test_constrained_rows_match_their_schema_beside_free_rows(tiny_engine):
    requests = [
        *(GenerationParams(prompt=f"Fill {name}", max_new_tokens=200, temperature=0, constraint=json_schema(name))
          for name in SCHEMAS),
        *(GenerationParams(prompt=f"Sample {name}", max_new_tokens=200, temperature=1.0, seed=7,
                           num_return_sequences=2, constraint=json_schema(name))
          for name in SCHEMAS),
        GenerationParams(prompt="Free text", max_new_tokens=12, temperature=0),
    ]
    results = run(tiny_engine, *requests)
    names = [*SCHEMAS, *SCHEMAS]
    for name, result in zip(names, results, strict=False):
        for text, finish_reason, _ in result.values():
            assert finish_reason == "eos", (name, text[:300])
            assert_valid(name, text)
    free_text, finish_reason, _ = results[-1][0]
    assert finish_reason == "length" and not free_text.lstrip().startswith(("{", "["))
    alone = run(tiny_engine, requests[0])
    assert alone == results[:1], "a constrained greedy row gets the same text alone and in a batch"


def test_a_regular_expression_constrains_the_whole_text(tiny_engine):
    pattern = r"[a-c]{2,5}-[0-9]{3}"
    constraint = OutputConstraint("regex", pattern, "regex")
    results = run(tiny_engine, *(GenerationParams(prompt=f"Code {seed}", max_new_tokens=30, temperature=1.5, seed=seed,
                                             constraint=constraint) for seed in range(4)))
    for [(text, finish_reason, _)] in (result.values() for result in results):
        assert re.fullmatch(pattern, text) and finish_reason == "eos", text


def test_stop_strings_and_length_still_end_a_constrained_row(tiny_engine):
    constraint = json_schema("person")
    [stopped] = run(tiny_engine, GenerationParams(prompt="P", max_new_tokens=120, temperature=0, stop=['"age"'],
                                             constraint=constraint))
    assert stopped[0][1] == "stop" and stopped[0][0].startswith('{"name":')
    [cut] = run(tiny_engine, GenerationParams(prompt="P", max_new_tokens=5, temperature=0, constraint=constraint))
    assert cut[0][1:] == ("length", 5)


@pytest.mark.parametrize(
    "constraint, reason",
    [
        (OutputConstraint("json_schema", '{"type": "nonsense"}', "response_format"), "nonsense"),
        (OutputConstraint("json_schema", '{"not": {"type": "string"}}', "response_format"), "not"),
        (OutputConstraint("json_schema", '{"$ref": "#/$defs/Missing"}', "json_schema"), "Missing"),
        (OutputConstraint("regex", "(", "regex"), "unclosed group"),
    ],
)
def test_a_constraint_that_cannot_be_enforced_is_refused_before_generation(tiny_engine, constraint, reason):
    with pytest.raises(InvalidRequestError) as caught:
        tiny_engine.prepare(GenerationParams(prompt="x", max_new_tokens=4, constraint=constraint))
    assert caught.value.param == constraint.param
    assert caught.value.message.startswith(f"{constraint.param}: this ") and reason in caught.value.message


def test_each_schema_is_compiled_once(tiny_engine):
    grammars: Grammars = tiny_engine._grammars
    constraint = OutputConstraint("json_schema", json.dumps({"type": "boolean"}), "json_schema")
    first = grammars._template(constraint)
    assert grammars._template(constraint) is first
    assert grammars.matcher(constraint) is not grammars.matcher(constraint), "each row gets its own matcher"


def test_a_schema_is_compiled_off_the_scheduler_thread(tiny_engine, monkeypatch):
    """The engine process gets requests `prepare`d in the replica, its own cache cold:
    the compile must not run on the thread that steps every row."""
    grammars: Grammars = tiny_engine._grammars
    constraint = OutputConstraint("json_schema", json.dumps({"type": "array", "maxItems": 3}), "json_schema")
    prepared = tiny_engine.prepare(GenerationParams(prompt="List:", max_new_tokens=5, constraint=constraint))
    grammars._compiled.pop(constraint)  # as in the engine process: compiled in the replica only
    compiled_on = []
    compile_once = grammars._compile
    monkeypatch.setattr(grammars, "_compile", lambda c: (compiled_on.append(threading.current_thread().name),
                                                          compile_once(c))[1])

    async def generate():
        async for _ in tiny_engine.generate(prepared):
            pass

    asyncio.run(generate())
    assert compiled_on and "textgen-scheduler" not in compiled_on


def test_the_mask_keeps_exactly_the_allowed_tokens():
    logits = torch.zeros(2, 40)
    bitmask = torch.tensor([[0b101, 1 << 7], [-1, -1]], dtype=torch.int32)  # row 0: tokens 0, 2 and 39
    masked = mask_disallowed(logits, bitmask)
    assert (masked[0] == 0).nonzero().flatten().tolist() == [0, 2, 39]
    assert bool((masked[1] == 0).all())
