"""Bridge an engine request handle (blocking, thread-based) into asyncio.

The engine's handle streams text from a blocking iterator. One short-lived thread per
request iterates it and forwards each piece, then the final ``Completion`` (or the error
that ended it), into an ``asyncio.Queue`` through ``loop.call_soon_threadsafe``. A
thread per request, not the default executor, because that executor has only a few
workers on a small machine and every running request would hold one for its whole life.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any, Callable


class HandleStream:
    """``async for piece in HandleStream(handle)``; then ``.completion`` holds the result."""

    def __init__(self, handle: Any, on_finish: Callable[[str], None] | None = None) -> None:
        self.handle = handle
        self.on_finish = on_finish  # called in the thread with the finish reason ("error" if it failed)
        self.completion: Any = None
        self.finished = False
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._pump, daemon=True, name="molmoe-serve-request").start()

    def _put(self, item: tuple[str, Any]) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop closed (server shut down): nobody is listening
            pass

    def _pump(self) -> None:
        try:
            for piece in self.handle.stream():
                self._put(("piece", piece))
            completion = self.handle.result()
            reason = completion.finish_reason
            self._put(("done", completion))
        except BaseException as exc:  # forwarded to the request, which answers with an error
            reason = "error"
            self._put(("error", exc))
        if self.on_finish is not None:
            self.on_finish(reason)

    async def __aiter__(self) -> AsyncIterator[str]:
        while True:
            kind, value = await self._queue.get()
            if kind == "piece":
                yield value
            elif kind == "done":
                self.completion, self.finished = value, True
                return
            else:
                self.finished = True
                raise value

    def cancel(self) -> None:
        """The client is gone: free the request's row (nothing to do once it finished)."""
        if not self.finished:
            self.handle.cancel()
