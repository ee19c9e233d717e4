"""The gateway's per-model waiting queue, with real asyncio tasks."""

from __future__ import annotations

import asyncio

import pytest

from gateway.api.admission import QUEUE_FULL_MESSAGE, QueueFull, QueueTimeout, WaitQueues
from gateway.record import BackendRecord
from gateway.routing.policy import ResidencyPolicy, RouteRequest, Send, Wait, choose
from gateway.routing.snapshot import BackendView, ObservedStats, ResidentModel, Snapshot

LLAMA = "llama3.1:8b"
QWEN = "qwen2.5:7b"


async def _park(queues: WaitQueues, model: str, woken: list[str], name: str, entered: asyncio.Event) -> None:
    async with queues.waiting(model) as ticket:
        entered.set()
        await ticket.wait()
        woken.append(name)


async def _enter_in_order(
    queues: WaitQueues, model: str, names: list[str], woken: list[str]
) -> list[asyncio.Task[None]]:
    tasks = []
    for name in names:
        entered = asyncio.Event()
        tasks.append(asyncio.create_task(_park(queues, model, woken, name, entered)))
        await entered.wait()
    return tasks


async def test_notified_waiters_run_oldest_first() -> None:
    queues = WaitQueues(max_per_model=8)
    woken: list[str] = []
    tasks = await _enter_in_order(queues, LLAMA, ["a", "b", "c", "d"], woken)
    assert queues.depth(LLAMA) == 4
    assert queues.notify(LLAMA) == 4
    await asyncio.gather(*tasks)
    assert woken == ["a", "b", "c", "d"]
    assert queues.depth(LLAMA) == 0 and queues.depths() == {}


async def test_a_full_queue_refuses_with_ollamas_busy_text_and_a_retry_after() -> None:
    queues = WaitQueues(max_per_model=2)
    woken: list[str] = []
    tasks = await _enter_in_order(queues, LLAMA, ["a", "b"], woken)
    with pytest.raises(QueueFull) as refused:
        async with queues.waiting(LLAMA):
            pytest.fail("a third waiter got in")
    assert (
        refused.value.message
        == QUEUE_FULL_MESSAGE
        == "server busy, please try again.  maximum pending requests exceeded"
    )
    assert refused.value.depth == 2 and refused.value.model == LLAMA
    assert 1 <= refused.value.retry_after_s <= 60
    # Another model's queue is separate.
    async with queues.waiting(QWEN) as ticket:
        assert queues.depths() == {LLAMA: 2, QWEN: 1}
        assert ticket.position == 0
    queues.notify()
    await asyncio.gather(*tasks)
    assert queues.depths() == {}


async def test_a_zero_sized_queue_refuses_everyone_and_keeps_no_state() -> None:
    queues = WaitQueues(max_per_model=0)
    with pytest.raises(QueueFull):
        await queues.wait(LLAMA, timeout_s=1.0)
    assert queues.depths() == {}
    with pytest.raises(ValueError):
        WaitQueues(max_per_model=-1)


async def test_a_waiter_times_out_and_leaves_the_queue() -> None:
    queues = WaitQueues(max_per_model=4)
    with pytest.raises(QueueTimeout) as timed_out:
        async with queues.waiting(LLAMA, timeout_s=0.02) as ticket:
            assert queues.depth(LLAMA) == 1
            while True:  # a waiter that keeps finding nothing: only the deadline ends it
                await ticket.wait()
    assert queues.depth(LLAMA) == 0
    assert timed_out.value.model == LLAMA
    assert timed_out.value.message.startswith("server busy, please try again.")
    assert LLAMA in timed_out.value.message
    assert 1 <= timed_out.value.retry_after_s <= 60
    # The one-shot form times out the same way.
    with pytest.raises(QueueTimeout):
        await queues.wait(LLAMA, timeout_s=0.0)
    assert queues.depths() == {}


async def test_a_cancelled_waiter_leaves_at_once_and_hands_on_its_wake_up() -> None:
    queues = WaitQueues(max_per_model=4)
    woken: list[str] = []
    tasks = await _enter_in_order(queues, LLAMA, ["gone", "next", "last"], woken)
    tasks[0].cancel()  # the client hung up
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]
    assert queues.depth(LLAMA) == 2
    # A waiter woken (count=1) and cancelled before it ran passes the wake-up on, so none is lost.
    assert queues.notify(LLAMA, count=1) == 1
    tasks[1].cancel()
    with pytest.raises(asyncio.CancelledError):
        await tasks[1]
    await asyncio.wait_for(tasks[2], timeout=5)
    assert woken == ["last"]
    assert queues.depths() == {}


async def test_notify_wakes_only_the_models_waiters_and_none_wakes_all() -> None:
    queues = WaitQueues(max_per_model=4)
    woken: list[str] = []
    llama = await _enter_in_order(queues, LLAMA, ["llama"], woken)
    qwen = await _enter_in_order(queues, QWEN, ["qwen"], woken)
    assert queues.notify(LLAMA) == 1
    await asyncio.wait_for(llama[0], timeout=5)
    assert woken == ["llama"]
    assert not qwen[0].done() and queues.depths() == {QWEN: 1}
    assert queues.notify("mistral:7b") == 0
    assert queues.notify() == 1
    await asyncio.wait_for(qwen[0], timeout=5)
    assert woken == ["llama", "qwen"]


async def test_count_limited_notify_wakes_the_oldest_not_yet_woken() -> None:
    queues = WaitQueues(max_per_model=4)
    woken: list[str] = []
    tasks = await _enter_in_order(queues, LLAMA, ["a", "b", "c"], woken)
    assert queues.notify(LLAMA, count=1) == 1
    assert queues.notify(LLAMA, count=1) == 1  # "a" is already woken: "b" is next
    await asyncio.gather(*tasks[:2])
    assert woken == ["a", "b"] and not tasks[2].done()
    queues.notify(LLAMA)
    await tasks[2]


async def test_a_notification_during_a_recheck_is_not_lost() -> None:
    queues = WaitQueues(max_per_model=4)
    async with queues.waiting(LLAMA, timeout_s=5.0) as ticket:
        queues.notify(LLAMA)  # arrives while the holder is not waiting (re-running choose())
        assert ticket.notified
        await ticket.wait()  # returns at once, consuming it
        assert not ticket.notified
        remaining = ticket.remaining_s
        assert remaining is not None and 0 < remaining <= 5.0


async def test_recheck_wakes_a_waiter_without_a_notification_until_its_deadline() -> None:
    queues = WaitQueues(max_per_model=4, recheck_s=0.01)
    rechecks = 0
    with pytest.raises(QueueTimeout):
        async with queues.waiting(LLAMA, timeout_s=0.2) as ticket:
            while True:
                await ticket.wait()  # returns on its own every recheck_s, keeping the ticket's place
                rechecks += 1
                assert queues.depth(LLAMA) == 1 and ticket.position == 0
    assert rechecks >= 1
    assert queues.depths() == {}
    with pytest.raises(ValueError):
        WaitQueues(max_per_model=4, recheck_s=0)


async def test_retry_after_follows_how_long_served_waiters_waited() -> None:
    queues = WaitQueues(max_per_model=4)
    assert queues.retry_after_s(LLAMA) == 1
    queues._record_wait(LLAMA, 7.2)
    assert queues.retry_after_s(LLAMA) == 8
    for _ in range(50):
        queues._record_wait(LLAMA, 3600.0)
    assert queues.retry_after_s(LLAMA) == 60
    assert queues.retry_after_s(QWEN) == 1


async def test_waiters_take_freed_slots_in_arrival_order_through_choose() -> None:
    """The gateway's loop: choose() says Wait while the one slot is taken; each finished request
    notifies; the waiters re-run choose() oldest first and each gets the slot in turn."""
    queues = WaitQueues(max_per_model=16)
    in_flight: dict[str, int] = {}
    started: list[int] = []
    stats = ObservedStats(tokens_per_s=50.0, load_s=2.0, service_s=120.0, samples=10)
    resident = ResidentModel(LLAMA, 4_900_000_000, 9_000_000_000, 8192, None)
    record = BackendRecord(id="g0", url="http://127.0.0.1:11500", vram_total_bytes=24 * 1024**3)
    policy = ResidencyPolicy(max_wait_s=10.0)
    running = {n: asyncio.Event() for n in range(5)}
    finish = {n: asyncio.Event() for n in range(5)}

    def snapshot() -> Snapshot:
        g0 = BackendView(
            record=record,
            healthy=True,
            installed=frozenset({LLAMA}),
            resident=(resident,),
            in_flight=dict(in_flight),
            queued=queues.depths(),
            free_vram_bytes=15 * 1024**3,
            observed={LLAMA: stats},
        )
        return Snapshot((g0,), {}, 0.0)

    async def request(n: int, entered: asyncio.Event) -> None:
        decision = choose(RouteRequest(LLAMA), snapshot(), policy)
        if isinstance(decision, Wait):
            async with queues.waiting(LLAMA, timeout_s=30.0) as ticket:
                entered.set()
                while isinstance(decision, Wait):
                    await ticket.wait()
                    decision = choose(RouteRequest(LLAMA), snapshot(), policy)
        entered.set()
        assert isinstance(decision, Send) and decision.backend_id == "g0"
        in_flight[LLAMA] = in_flight.get(LLAMA, 0) + 1
        started.append(n)
        running[n].set()
        await finish[n].wait()
        in_flight[LLAMA] -= 1
        queues.notify(LLAMA)

    tasks = []
    for n in range(5):
        entered = asyncio.Event()
        tasks.append(asyncio.create_task(request(n, entered)))
        await entered.wait()
    assert started == [0] and queues.depth(LLAMA) == 4
    for n in range(5):
        await asyncio.wait_for(running[n].wait(), timeout=5)
        assert started == list(range(n + 1))  # nobody jumped the queue
        finish[n].set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
    assert started == [0, 1, 2, 3, 4]
    assert queues.depths() == {}
