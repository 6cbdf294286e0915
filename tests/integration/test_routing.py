"""Prefix-aware routing in Serve: two replicas of the tiny model behind the real builder
and the real `openai` client. Every turn of a conversation goes to the replica that
prefilled its earlier turns, so each finds the conversation so far in its prefix cache
(with Serve's default router about half would land on the other replica and find none)."""

import openai
import pytest
from ray import serve

from tests.integration.conftest import deploy, tiny_app_args

BLOCK = 16  # the prefix cache's block (deployments/transformers_engine/prefix_cache.py)


@pytest.fixture(scope="module")
def routed(serve_base_url, tiny_model_dir):
    args = tiny_app_args(tiny_model_dir, num_replicas=2, num_cpus=0.25, max_batch_size=4)
    assert args.models[0].request_router == "prefix_affinity", "the default"
    url = deploy(serve_base_url, args, "routed")
    yield url
    serve.delete("routed")


def test_each_turn_finds_the_conversation_so_far_on_its_replica(routed):
    with openai.OpenAI(base_url=f"{routed}/v1", api_key="unused", max_retries=0) as client:
        for conversation in range(8):
            messages = [{"role": "user", "content": f"Conversation {conversation}: rivers, mountains and towns."}]
            previous_prompt = 0
            for turn in range(3):
                completion = client.chat.completions.create(
                    model="tiny", messages=messages, max_tokens=6, temperature=0
                )
                cached = completion.usage.prompt_tokens_details.cached_tokens
                # At least the whole blocks of the previous turn's prompt (its answer's
                # too, when the template re-renders it as the model wrote it).
                assert cached >= previous_prompt // BLOCK * BLOCK, (conversation, turn, cached, previous_prompt)
                if turn:
                    assert cached > 0
                previous_prompt = completion.usage.prompt_tokens
                messages += [
                    {"role": "assistant", "content": completion.choices[0].message.content},
                    {"role": "user", "content": f"And turn {turn + 1}?"},
                ]
