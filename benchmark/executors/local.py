"""The local executor: runs specs in this process, one after another."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator


class LocalExecutor:
    name = "local"

    def __init__(self, **_: object):
        pass

    def map(self, work: Callable, specs: Iterable) -> Iterator:
        """Yield ``(spec, work(spec))`` in order; exceptions are ``work``'s to handle."""
        for spec in specs:
            yield spec, work(spec)
