"""LoRA adapters in the engine against PEFT itself, on the tiny model: tiny random
adapters made with PEFT (so their outputs differ from the base model's), each request's
greedy tokens equal to a PEFT model that has only its adapter, also when rows of several
adapters and none share a batch, on both KV caches; a cap of one adapter held at a time."""

import asyncio
import json
import shutil

import pytest
import torch

from deployments.config import ModelConfig
from deployments.protocol import AdapterLoadError, GenerationParams, InvalidRequestError
from deployments.transformers_engine import TransformersEngine
from deployments.transformers_engine.lora import AdapterConfig
from tests.unit.test_transformers_engine import run

PROMPTS = ["Once upon a time", "The weather today", "Numbers:"]
NEW_TOKENS = 10


def make_adapter(base_dir, folder, seed: int, rank: int, targets: list[str], **options):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False, **options)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # PEFT's random init is small: make the adapters matter
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(20)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "terse": make_adapter(tiny_model_dir, root / "terse", seed=1, rank=4, targets=["q_proj", "v_proj"]),
        "chatty": make_adapter(tiny_model_dir, root / "chatty", seed=2, rank=8,
                               targets=["o_proj", "down_proj", "up_proj"], use_rslora=True),
    }


def peft_greedy(tiny_model_dir, adapter_dir, prompt: str) -> str:
    """What a plain PEFT model with only this adapter (or none) generates greedily."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def load(tiny_model_dir, adapter_dirs, kv_cache: str, max_adapters: int = 4) -> TransformersEngine:
    engine = TransformersEngine(
        ModelConfig(name="tiny", source=str(tiny_model_dir), dtype="float32", kv_cache=kv_cache,
                    adapters={name: str(folder) for name, folder in adapter_dirs.items()}, max_adapters=max_adapters),
        "cpu",
    )
    engine.load()
    return engine


@pytest.mark.parametrize("kv_cache", ["dynamic", "slots"])
def test_each_row_gets_what_peft_gives_with_only_its_adapter_in_a_mixed_batch(tiny_model_dir, adapter_dirs, kv_cache):
    expected = {
        (adapter, prompt): peft_greedy(tiny_model_dir, adapter_dirs.get(adapter), prompt)
        for adapter in (None, "terse", "chatty") for prompt in PROMPTS
    }
    assert len({expected[(adapter, PROMPTS[0])] for adapter in (None, "terse", "chatty")}) == 3, "adapters matter"
    engine = load(tiny_model_dir, adapter_dirs, kv_cache)
    try:
        keys = list(expected)
        results = run(engine, *(GenerationParams(prompt=prompt, max_new_tokens=NEW_TOKENS, temperature=0, adapter=adapter)
                                for adapter, prompt in keys))
        alone = run(engine, GenerationParams(prompt=PROMPTS[0], max_new_tokens=NEW_TOKENS, temperature=0, adapter="terse"))
    finally:
        engine.close()
    assert {key: result[0][0] for key, result in zip(keys, results, strict=True)} == expected
    assert alone[0][0][0] == expected[("terse", PROMPTS[0])]


def test_one_adapter_slot_serves_two_adapters_in_turn(tiny_model_dir, adapter_dirs):
    engine = load(tiny_model_dir, adapter_dirs, "dynamic", max_adapters=1)
    try:
        results = run(engine, *(GenerationParams(prompt=PROMPTS[0], max_new_tokens=NEW_TOKENS, temperature=0, adapter=a)
                                for a in ("terse", "chatty", "terse", None)))
        held = engine._adapters.loaded
    finally:
        engine.close()
    texts = [result[0][0] for result in results]
    assert texts[0] == texts[2] == peft_greedy(tiny_model_dir, adapter_dirs["terse"], PROMPTS[0])
    assert texts[1] == peft_greedy(tiny_model_dir, adapter_dirs["chatty"], PROMPTS[0])
    assert texts[3] == peft_greedy(tiny_model_dir, None, PROMPTS[0])
    assert len(held) == 1, "the cap holds"


def test_an_unknown_adapter_is_refused_naming_the_known_ones(tiny_model_dir, adapter_dirs):
    engine = load(tiny_model_dir, adapter_dirs, "dynamic")
    try:
        with pytest.raises(InvalidRequestError) as caught:
            engine.prepare(GenerationParams(prompt="x", adapter="nope"))
    finally:
        engine.close()
    assert caught.value.param == "model" and "'nope'" in caught.value.message and "terse, chatty" in caught.value.message


def copied(adapter_dir, folder):
    shutil.copytree(adapter_dir, folder)
    return folder


def test_an_adapter_whose_weights_do_not_fit_the_model_refuses_to_start_naming_it(tiny_model_dir, adapter_dirs,
                                                                                   tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copied(adapter_dirs["terse"], tmp_path / "misshapen")
    weights = load_file(folder / "adapter_model.safetensors")
    key = next(key for key in weights if "lora_A" in key)
    weights[key] = weights[key][:3]  # rank 3 where its config says 4
    save_file(weights, folder / "adapter_model.safetensors")
    with pytest.raises(ValueError) as caught:
        load(tiny_model_dir, {"terse": adapter_dirs["terse"], "misshapen": folder}, "dynamic")
    assert "adapter misshapen" in str(caught.value) and key in str(caught.value) and "[3, " in str(caught.value)


def test_an_adapter_that_fails_to_load_fails_only_its_own_request(tiny_model_dir, adapter_dirs, tmp_path):
    """Its weights went bad after start (here: overwritten). With one slot, loading it
    would have replaced terse: terse still serves, the base model's row in the same
    batch finishes, and only the request for it fails, naming it."""
    broken = copied(adapter_dirs["chatty"], tmp_path / "broken")
    engine = load(tiny_model_dir, {"terse": adapter_dirs["terse"], "broken": broken}, "dynamic", max_adapters=1)
    try:
        [warm] = run(engine, GenerationParams(prompt=PROMPTS[0], max_new_tokens=NEW_TOKENS, temperature=0, adapter="terse"))
        (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")

        async def one(params):
            texts = []
            async for deltas in engine.generate(engine.prepare(params)):
                texts += [delta.text for delta in deltas]
            return "".join(texts)

        async def together():
            return await asyncio.gather(*(one(params) for params in (
                GenerationParams(prompt=PROMPTS[1], max_new_tokens=NEW_TOKENS, temperature=0),
                GenerationParams(prompt=PROMPTS[0], max_new_tokens=NEW_TOKENS, temperature=0, adapter="broken"),
                GenerationParams(prompt=PROMPTS[0], max_new_tokens=NEW_TOKENS, temperature=0, adapter="terse"),
            )), return_exceptions=True)

        base, failed, terse = asyncio.run(together())
        assert engine._adapters.loaded == ["terse"] and engine._scheduler.broken is None
    finally:
        engine.close()
    assert isinstance(failed, AdapterLoadError) and str(failed).startswith("adapter broken could not be loaded: ")
    assert base == peft_greedy(tiny_model_dir, None, PROMPTS[1])
    assert terse == warm[0][0] == peft_greedy(tiny_model_dir, adapter_dirs["terse"], PROMPTS[0])


def test_adapters_that_are_not_plain_lora_are_refused_with_the_reason(tiny_model_dir, tmp_path):
    folder = make_adapter(tiny_model_dir, tmp_path / "dora", seed=3, rank=4, targets=["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match="use_dora"):
        AdapterConfig.read(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["use_dora"] is True


def test_a_hub_adapter_comes_from_the_hf_cache(adapter_dirs, tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub's own cache (offline here: the machine
    reaches no hub, so the cache is laid out as a download leaves it)."""
    import shutil

    from huggingface_hub import constants

    from deployments.model_source import ModelSourceError, resolve_adapter_source

    repo = tmp_path / "hub" / "models--acme--terse-lora"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(adapter_dirs["terse"], repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    folder = resolve_adapter_source("acme/terse-lora")
    assert folder == repo / "snapshots" / commit
    assert AdapterConfig.read(folder) == AdapterConfig.read(adapter_dirs["terse"])
    assert resolve_adapter_source(str(adapter_dirs["chatty"])) == adapter_dirs["chatty"]
    with pytest.raises(ModelSourceError, match="neither an existing folder nor a hub id"):
        resolve_adapter_source("/no/such/adapter")
