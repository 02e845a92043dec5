"""Drives a turn engine as a script: `<<` the command it must yield, `>>` the event it gets.

In the manner of mitmproxy's own layer playbooks: no socket, no clock, no
store. `<<` takes a command to compare with `==`, or a command class when
only its kind matters (`last` then holds the command for closer looks).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from responses_ws_bridge.core.forward_commands import ForwardCommand
from responses_ws_bridge.core.turn_commands import Command
from responses_ws_bridge.core.ws_client_commands import WsClientCommand

AnyCommand = Command | ForwardCommand | WsClientCommand


class Playbook:
    def __init__(self, run: Generator[Any, Any, None]) -> None:
        self._run = run
        self._pending: AnyCommand | None = next(run)
        self.last: Any = None
        self.done = False

    def __lshift__(self, expected: AnyCommand | type) -> Playbook:
        command = self._pending
        assert command is not None, f"the engine ended; expected {expected!r}"
        if isinstance(expected, type):
            assert isinstance(command, expected), f"expected a {expected.__name__}, got {command!r}"
        else:
            assert command == expected, f"expected {expected!r}, got {command!r}"
        self.last = command
        return self

    def __rshift__(self, event: object) -> Playbook:
        assert self._pending is not None, "the engine ended; nothing to answer"
        try:
            self._pending = self._run.send(event)
        except StopIteration:
            self._pending = None
            self.done = True
        return self

    def next_command(self) -> AnyCommand | None:
        return self._pending

    def answer(self, kind: type, event: object = None) -> Any:
        """`<< kind` then `>> event`; returns the command answered."""
        self << kind
        command = self.last
        self >> event
        return command

    def skip_until(self, kind: type, *, answer: object = None, limit: int = 50) -> Any:
        """Answers every command before the first `kind` with `answer`; returns that command."""
        for _ in range(limit):
            command = self._pending
            assert command is not None, f"the engine ended before a {kind.__name__}"
            if isinstance(command, kind):
                self.last = command
                return command
            self >> answer
        raise AssertionError(f"no {kind.__name__} within {limit} commands")
