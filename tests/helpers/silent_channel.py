"""An engine channel for AsyncEngine tests that hand engine reports over by hand."""

from __future__ import annotations


class SilentChannel:
    """Never started and never answering: the test calls ``AsyncEngine._apply(report)`` itself."""

    info = None

    def start(self): ...

    def send(self, command): ...

    def receive(self): ...

    def is_alive(self):
        return True

    def join(self, timeout): ...
