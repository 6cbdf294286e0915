"""Prefix-aware routing's decisions (serve_app/routing.py), without a cluster: which key a
request gets, how replicas are ranked for it, and when load overrides the ranking. The
router itself, in Serve with two replicas, is tested in tests/integration/test_routing.py."""

import collections

from deployments.protocol import ChatMessage, GenerationParams
from serve_app.routing import PROMPT_KEY_CHARS, choose, rendezvous_ranking, routing_key

SYSTEM = ChatMessage("system", "You are a support agent. " * 40)


def chat(*contents: str) -> GenerationParams:
    roles = ["user", "assistant"]
    return GenerationParams(messages=(SYSTEM, *(ChatMessage(roles[i % 2], c) for i, c in enumerate(contents))))


def test_every_turn_of_a_conversation_has_the_key_of_its_first():
    first = routing_key(chat("My order 17 is late"))
    assert routing_key(chat("My order 17 is late", "Sorry to hear it", "It was due Monday")) == first
    assert routing_key(chat("My order 18 is late")) != first, "another conversation"
    # Without a system turn, a conversation keys on its first user turn.
    assert routing_key(GenerationParams(messages=(ChatMessage("user", "hi"),))) == routing_key(
        GenerationParams(messages=(ChatMessage("user", "hi"), ChatMessage("assistant", "hello"), ChatMessage("user", "?")))
    )


def test_plain_prompts_key_on_their_start():
    shared = "x" * PROMPT_KEY_CHARS
    assert routing_key(GenerationParams(prompt=shared + "one")) == routing_key(GenerationParams(prompt=shared + "two"))
    assert routing_key(GenerationParams(prompt="one")) != routing_key(GenerationParams(prompt="two"))
    assert routing_key(GenerationParams(prompt_token_ids=(1, 2, 3))) != routing_key(GenerationParams(prompt="1,2,3"))
    assert routing_key("a tokenize call") is None


def test_replicas_are_ranked_alike_everywhere_and_keys_spread_evenly():
    replicas = ["r1a2b3", "q9z8y7", "m4n5o6"]
    keys = [f"conversation {number}".encode() for number in range(3000)]
    firsts = collections.Counter(rendezvous_ranking(key, replicas)[0] for key in keys)
    assert all(900 < count < 1100 for count in firsts.values()), firsts
    assert rendezvous_ranking(keys[0], replicas) == rendezvous_ranking(keys[0], list(reversed(replicas)))
    # A replica leaving moves only its own keys.
    moved = [key for key in keys if rendezvous_ranking(key, replicas)[0] != rendezvous_ranking(key, replicas[:2])[0]]
    assert all(rendezvous_ranking(key, replicas)[0] == replicas[2] for key in moved)


def test_the_first_choice_wins_unless_it_is_much_busier():
    ranking = ["a", "b", "c"]
    assert choose(ranking, {"a": 9, "b": 1, "c": 5}, imbalance_requests=8) == ranking
    assert choose(ranking, {"a": 10, "b": 1, "c": 5}, imbalance_requests=8) == ["b", "c", "a"]
    assert choose(ranking, {"a": None, "b": 0, "c": 0}, imbalance_requests=0) == ranking, "unknown load: no override"
    assert choose(ranking, {"a": 3, "b": None, "c": 0}, imbalance_requests=2) == ["b", "c", "a"], "by load, then rank"
