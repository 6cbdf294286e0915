"""The waiting lines' order (FairQueue), step by step: shares of tokens by weight, a
quiet tenant ahead of a noisy backlog, no saved credit, priority within a tenant only,
first come first served when not fair. Only orders and counts, no clock."""

import collections

import pytest

from deployments.transformers_engine import fair_queue
from deployments.transformers_engine.fair_queue import FairQueue


def take_next(queue: FairQueue, skip=()) -> str:
    line, item = queue.peek(skip)
    assert queue.take(line) == item
    return item


def test_saturating_tenants_get_tokens_in_proportion_to_their_weights():
    queue = FairQueue()
    for n in range(100):
        queue.push(f"light{n}", "light", cost=10, weight=1)
        queue.push(f"heavy{n}", "heavy", cost=10, weight=3)
    taken = collections.Counter(take_next(queue).rstrip("0123456789") for _ in range(40))
    assert taken == {"light": 10, "heavy": 30}


def test_the_service_counted_is_tokens_not_requests():
    queue = FairQueue()
    for _ in range(50):
        queue.push(("long", 100), "long", cost=100)
        queue.push(("short", 10), "short", cost=10)
    tokens = collections.Counter()
    for _ in range(33):
        kind, cost = take_next(queue)
        tokens[kind] += cost
    assert tokens == {"long": 300, "short": 300}  # 3 long requests for 30 short ones


def test_a_quiet_tenants_request_goes_ahead_of_a_noisy_backlog():
    queue = FairQueue()
    for n in range(48):
        queue.push(f"noisy{n}", "noisy", cost=128)
    assert take_next(queue) == "noisy0"
    queue.push("quiet0", "quiet", cost=32)
    assert take_next(queue) == "quiet0"  # first come, first served would make it wait for 47


def test_a_tenant_alone_gets_every_request_taken_in_arrival_order():
    queue = FairQueue()
    for n in range(5):
        queue.push(n, "alone", cost=100 - n)
    assert [take_next(queue) for _ in range(5)] == [0, 1, 2, 3, 4]
    assert queue.peek() is None and len(queue) == 0


def test_a_tenant_that_was_idle_gets_no_saved_credit():
    queue = FairQueue()
    for n in range(20):  # "busy" is served alone for a while
        queue.push(f"busy{n}", "busy", cost=10)
    for _ in range(10):
        take_next(queue)
    for n in range(10):
        queue.push(f"back{n}", "back", cost=10)
    order = [take_next(queue)[:4] for _ in range(10)]
    assert order.count("back") == 5, order  # level with "busy" from now on, not 10 turns in a row


def test_a_returning_tenant_pays_for_what_it_took_while_others_waited():
    queue = FairQueue()
    queue.push("big", "a", cost=1000)
    for n in range(5):
        queue.push(f"b{n}", "b", cost=10)
    assert [take_next(queue), take_next(queue)] == ["b0", "big"]  # tied at 0: the smaller first
    queue.push("a-again", "a", cost=10)  # its tag is 1000: it cannot skip that debt by pausing
    assert [take_next(queue) for _ in range(5)] == ["b1", "b2", "b3", "b4", "a-again"]


def test_debts_end_when_the_engine_idles():
    queue = FairQueue()
    queue.push("big", "a", cost=1000)
    assert take_next(queue) == "big"  # alone: it took what nobody else wanted
    queue.forget_debts()  # and it finished before others came
    queue.push("a-next", "a", cost=10)
    queue.push("b0", "b", cost=10)
    queue.push("b1", "b", cost=10)
    assert [take_next(queue) for _ in range(3)] == ["a-next", "b0", "b1"]


def test_priority_orders_a_tenants_own_line_but_never_passes_another_tenant():
    queue = FairQueue()
    queue.push("a-late", "a", cost=10, priority=5)
    queue.push("b0", "b", cost=10)
    queue.push("a-urgent", "a", cost=10, priority=-1)
    queue.push("a-normal", "a", cost=10)
    queue.push("b1", "b", cost=10)
    assert [take_next(queue) for _ in range(5)] == ["a-urgent", "b0", "a-normal", "b1", "a-late"]


def test_first_come_first_served_ignores_tenants_and_weights_but_keeps_priority():
    queue = FairQueue(fair=False)
    for n in range(4):
        queue.push(f"noisy{n}", "noisy", cost=128, weight=0.1)
    queue.push("quiet", "quiet", cost=1, weight=10)
    queue.push("urgent", "other", cost=1, priority=-1)
    assert [take_next(queue) for _ in range(6)] == ["urgent", "noisy0", "noisy1", "noisy2", "noisy3", "quiet"]


def test_skipped_lines_keep_their_place():
    queue = FairQueue()
    queue.push("a0", "a", cost=10)
    queue.push("a1", "a", cost=10)
    queue.push("b0", "b", cost=10)
    assert take_next(queue, skip={"a"}) == "b0"
    assert queue.peek(skip={"a"}) is None
    assert [take_next(queue) for _ in range(2)] == ["a0", "a1"]


def test_items_put_back_go_first_in_their_order_and_are_not_charged_twice():
    queue = FairQueue()
    for name in ("a0", "a1"):
        queue.push(name, "a", cost=10)
    for name in ("b0", "b1"):
        queue.push(name, "b", cost=10)
    taken = [take_next(queue), take_next(queue)]
    assert taken == ["a0", "b0"]
    queue.put_back_first([("a", "a0"), ("b", "b0")])
    assert len(queue) == 4 and sorted(queue) == ["a0", "a1", "b0", "b1"]
    assert take_next(queue, skip={"a"}) == "b0"  # a skipped line's item put back waits too
    assert [take_next(queue) for _ in range(3)] == ["a0", "a1", "b1"]


def test_one_shot_tenants_are_forgotten_but_the_largest_debts_are_not(monkeypatch):
    monkeypatch.setattr(fair_queue, "REMEMBERED_TENANTS", 4)
    queue = FairQueue()
    for n in range(100):  # a tenant that keeps requests waiting all along
        queue.push(f"steady{n}", "steady", cost=1)
    queue.push("debt", "debtor", cost=50)
    assert [take_next(queue), take_next(queue)] == ["steady0", "debt"]
    for n in range(20):  # one-shot tenants (many client addresses), each served once
        queue.push(f"once{n}", f"t{n}", cost=1)
        assert take_next(queue) == f"once{n}"  # owed nothing yet: ahead of steady
        assert len(queue._tenants) <= 4 + 1
    queue.push("again", "debtor", cost=1)
    taken = [take_next(queue) for _ in range(60)]
    assert taken.index("again") == 49, taken  # remembered: steady catches up to its 50 first


@pytest.mark.parametrize("fair", [True, False])
def test_nothing_is_lost_or_taken_twice(fair):
    queue = FairQueue(fair=fair)
    pushed = [(f"{tenant}{n}", tenant) for n in range(30) for tenant in ("a", "b", "c")]
    for n, (item, tenant) in enumerate(pushed):
        queue.push(item, tenant, cost=1 + n % 7, weight=1 + n % 3, priority=n % 2)
    taken = []
    while len(queue):
        taken.append(take_next(queue))
    assert sorted(taken) == sorted(item for item, _ in pushed)
