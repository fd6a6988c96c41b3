"""Fair use in the gateway: the gate's round-robin per user, its bound and its maximum wait; the per-user
request and token rate limits; the usage record of a throttled request (a stand-in llama-server)."""

import asyncio
import json

import pytest

from gateway import fairness
from gateway.errors import GatewayError
from gateway.models import UsageRecord
from gateway.slots import Gate
from tests.gateway.fakes import request

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


async def _queue(gate: Gate, user: str, served: list, queue_size: int = 1000, max_wait: float = 0):
    await gate.enter(queue_size, user, max_wait)
    served.append(user)


async def _settle():
    for _ in range(5):
        await asyncio.sleep(0)


# --- the gate ----------------------------------------------------------------------------------------------


def test_a_lone_request_is_served_before_a_flooding_users_queue():
    async def scenario():
        gate, served = Gate(1), []
        await gate.enter(1000, "heavy")  # the heavy user holds the one slot
        heavy = [asyncio.create_task(_queue(gate, "heavy", served)) for _ in range(100)]
        await _settle()
        light = asyncio.create_task(_queue(gate, "light", served))
        await _settle()
        assert gate.waiting == 101 and served == []
        gate.leave()  # the heavy user's request ends: the light one is next, not the heavy user's 100
        await _settle()
        assert served == ["light"]
        for _ in range(3):
            gate.leave()
            await _settle()
        assert served == ["light", "heavy", "heavy", "heavy"]
        for _ in range(97):  # the rest of the heavy queue: the last one keeps the slot
            gate.leave()
        await asyncio.gather(light, *heavy)
        assert gate.waiting == 0 and gate.busy == 1 and not gate.queues

    asyncio.run(scenario())


def test_users_take_turns_each_in_their_own_order():
    async def scenario():
        gate, served = Gate(1), []
        await gate.enter(1000, "c")
        tasks = []
        for user in ["a", "a", "a", "b", "b"]:
            tasks.append(asyncio.create_task(_queue(gate, user, served)))
            await _settle()
        for _ in tasks:
            gate.leave()
            await _settle()
        await asyncio.gather(*tasks)
        assert served == ["a", "b", "a", "b", "a"]

    asyncio.run(scenario())


def test_beyond_the_queue_is_429_queue_full():
    async def scenario():
        gate, served = Gate(1), []
        await gate.enter(1, "a")
        waiting = asyncio.create_task(_queue(gate, "a", served, queue_size=1))
        await _settle()
        with pytest.raises(GatewayError) as refused:
            await gate.enter(1, "b")
        gate.leave()
        await waiting
        return refused.value

    error = asyncio.run(scenario())
    assert error.status == 429 and error.throttled == "queue_full" and error.retry_after == 1


def test_past_the_maximum_wait_is_503_and_the_queue_forgets_the_request():
    async def scenario():
        gate = Gate(1)
        await gate.enter(10, "a")
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(GatewayError) as refused:
            await gate.enter(10, "b", max_wait=0.2)
        waited = loop.time() - began
        assert gate.waiting == 0 and not gate.queues
        gate.leave()  # nobody waits: the slot is free again
        assert gate.busy == 0
        return refused.value, waited

    error, waited = asyncio.run(scenario())
    assert 0.2 <= waited < 1.0
    assert error.status == 503 and error.throttled == "queue_timeout" and error.retry_after == 5
    assert "no slot came free within 0.2s" in error.message


def test_a_waiter_that_leaves_gives_its_turn_to_the_next():
    async def scenario():
        gate, served = Gate(1), []
        await gate.enter(10, "a")
        leaving = asyncio.create_task(_queue(gate, "b", served))
        staying = asyncio.create_task(_queue(gate, "c", served))
        await _settle()
        leaving.cancel()
        await _settle()
        gate.leave()
        await staying
        assert served == ["c"] and gate.busy == 1 and gate.waiting == 0

    asyncio.run(scenario())


# --- rate limits -------------------------------------------------------------------------------------------


def test_the_request_limit_is_429_naming_it_until_its_minute_ends(settings):
    settings.GATEWAY_USER_REQUESTS_PER_MINUTE = 2
    fairness.admit("user:1", now=100.0)
    fairness.admit("user:1", now=110.0)
    fairness.admit("user:2", now=110.0)  # another user counts apart
    with pytest.raises(GatewayError) as refused:
        fairness.admit("user:1", now=130.5)
    error = refused.value
    assert error.status == 429 and error.throttled == "requests_per_minute"
    assert error.retry_after == 30  # the window opened at 100 and ends at 160
    assert "2 requests per minute" in error.message and "resets in 30s" in error.message
    fairness.admit("user:1", now=160.0)  # a new minute


def test_the_token_limit_counts_prompt_and_completion_of_ended_requests(settings):
    settings.GATEWAY_USER_TOKENS_PER_MINUTE = 100
    fairness.admit("user:1", now=0.0)
    fairness.spend("user:1", 60, now=1.0)
    fairness.admit("user:1", now=2.0)  # 60 of 100: still in
    fairness.spend("user:1", 60, now=3.0)
    with pytest.raises(GatewayError) as refused:
        fairness.admit("user:1", now=4.0)
    assert refused.value.throttled == "tokens_per_minute" and refused.value.retry_after == 56
    assert "100 tokens per minute" in refused.value.message
    fairness.admit("user:1", now=60.0)


def test_limits_off_count_nothing(settings):
    settings.GATEWAY_USER_REQUESTS_PER_MINUTE = 0
    settings.GATEWAY_USER_TOKENS_PER_MINUTE = 0
    for _ in range(1000):
        fairness.admit("user:1")
    assert fairness._windows == {}


# --- through the views --------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_throttled_request_is_recorded_with_its_reason(instance, llama, users, bearer, settings, client):
    settings.GATEWAY_USER_REQUESTS_PER_MINUTE = 1
    auth = bearer(users["viewer"])
    first = request("POST", "/v1/chat/completions", CHAT, auth=auth)
    second = request("POST", "/v1/chat/completions", CHAT, auth=auth)
    assert first[0] == 200
    status, response, content = second
    assert status == 429 and 55 <= int(response["Retry-After"]) <= 60
    error = json.loads(content)["error"]
    assert error["code"] == "rate_limit_exceeded" and "1 requests per minute" in error["message"]
    records = sorted(UsageRecord.objects.values_list("status", "throttled", "user__username"))
    assert records == [(200, "", "viewer"), (429, "requests_per_minute", "viewer")]
    client.force_login(users["viewer"])  # the usage page shows who was throttled and why
    text = client.get("/usage/").content.decode()
    assert "<th" in text and "Throttled</th>" in text and "throttled (requests_per_minute)" in text
    viewer_row = text.split("Per user")[1].split("Per model")[0]
    assert "<td>viewer</td><td>2</td><td>" in viewer_row and "<td>1</td><td>1</td>" in viewer_row
