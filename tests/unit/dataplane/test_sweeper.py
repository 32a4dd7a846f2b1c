"""The sweeper's held writes: out once the loop's callbacks of the moment have run, in the order asked for."""

from __future__ import annotations

import asyncio

import pytest

from gateway.dataplane.sweeper import Sweeper


class Written:
    """A connection as the sweeper sees it: what it was given to send, in order, into one shared list."""

    def __init__(self, name: str, sent: list[tuple[str, bytes]], *, fails: bool = False) -> None:
        self.name = name
        self.sent = sent
        self.fails = fails
        self.aborted = False

    def send_held(self, data: bytes) -> None:
        if self.fails:
            raise RuntimeError("a bug in a connection's send_held")
        self.sent.append((self.name, data))

    def abort(self) -> None:
        self.aborted = True


@pytest.mark.parametrize("early", [False, True], ids=["at-the-next-turn", "released-early"])
async def test_held_writes_go_out_in_order_once_and_not_within_the_turn(early: bool) -> None:
    sweeper = Sweeper(asyncio.get_running_loop())
    sent: list[tuple[str, bytes]] = []
    a, b = Written("a", sent), Written("b", sent)
    sweeper.hold(a, b"1")
    sweeper.hold(b, b"2")
    sweeper.hold(a, b"3")
    assert sent == []  # nothing within the turn that held them
    if early:
        sweeper.release()  # (another operation on one of the connections: everything held goes first)
        assert sent == [("a", b"1"), ("b", b"2"), ("a", b"3")]
    for _ in range(3):
        await asyncio.sleep(0)
    assert sent == [("a", b"1"), ("b", b"2"), ("a", b"3")]  # each once, in order
    sweeper.hold(b, b"4")  # a new turn's writes are held and sent again
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert sent[3:] == [("b", b"4")]
    sweeper.close()


async def test_a_held_write_that_fails_cuts_off_its_connection_and_not_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sweeper = Sweeper(asyncio.get_running_loop())
    sent: list[tuple[str, bytes]] = []
    broken, fine = Written("broken", sent, fails=True), Written("fine", sent)
    sweeper.hold(broken, b"1")
    sweeper.hold(fine, b"2")
    sweeper.release()
    assert (sent, broken.aborted, fine.aborted) == ([("fine", b"2")], True, False)
    assert "held_write_failed" in caplog.text
    sweeper.close()
