"""Writing captured batches on a background thread, so disk I/O overlaps the next forward."""

from __future__ import annotations

import queue
import threading

from ..store import StoreWriter


class AsyncWriter:
    """Hand batches to :meth:`StoreWriter.write` on a background thread.

    An error of the writer thread is raised in the caller's thread at the next :meth:`put` or
    at :meth:`close`; after it, batches still handed over are dropped (never written out of
    order).

    Parameters
    ----------
    writer
        The store's writer.
    depth
        Batches that may wait in the queue (memory: at most ``depth + 1`` batches in flight).
    """

    def __init__(self, writer: StoreWriter, depth: int = 2) -> None:
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="dissect-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.writer.write(*item)
                except BaseException as exc:  # re-raised in the caller's thread
                    self.error = exc

    def put(self, item: tuple) -> None:
        """Queue one batch, ``StoreWriter.write``'s arguments (blocks while the queue is full)."""
        if self.error is not None:
            raise self.error
        self.queue.put(item)

    def close(self) -> None:
        """Drain the queue (every batch handed over is written), then stop."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
