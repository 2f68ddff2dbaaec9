"""The replica's batch queue: requests for any experts that arrive together, one engine call.

Ray Serve's ``@serve.batch`` splits every batch by multiplexed model id (Ray 2.60), which is
exactly what mixed-subject batches must not do, so a replica batches with this instead: the
first request waits up to ``wait_s`` for more, at most ``max_size`` go into one call, and one
call runs at a time (the others queue here, not on the engine's lock). Ray-free asyncio.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class Batcher:
    def __init__(self, run: Callable[[list[Any]], list[Any]], *, max_size: int, wait_s: float):
        """``run``: a blocking function from a list of jobs to a list of results (or exceptions),
        called in the event loop's default executor."""
        self.run, self.max_size, self.wait_s = run, max_size, wait_s
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, job: Any) -> Any:
        """The job's result; an exception result is raised. Cancelling the caller drops the job
        from a batch that has not started (``job.ticket`` tells a started one)."""
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._loop())
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((job, future))
        result = await future
        if isinstance(result, Exception):
            raise result
        return result

    async def _next_batch(self) -> list[tuple[Any, asyncio.Future]]:
        batch = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while len(batch) < self.max_size:
            left = deadline - asyncio.get_running_loop().time()
            try:
                batch.append(self._queue.get_nowait() if left <= 0 else await asyncio.wait_for(self._queue.get(), left))
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
        return [(job, f) for job, f in batch if not f.done()]  # drop callers that went away

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(None, self.run, [job for job, _ in batch])
            except Exception as e:
                results = [e] * len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
