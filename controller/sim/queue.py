"""A pool's waiting queue: request columns in a buffer that appends at the back and pops or
prepends at the front without copying the queue (an overload keeps thousands waiting)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Rows = npt.NDArray[np.float64]
_MARGIN = 256


class Queue:
    """Rows of `fields` values a request, one column each, in queue order."""

    def __init__(self, fields: int) -> None:
        self._buf: Rows = np.empty((fields, 2 * _MARGIN))
        self._head = self._tail = _MARGIN

    @property
    def rows(self) -> Rows:
        """The queue, front first (a view: valid until the next change)."""
        return self._buf[:, self._head : self._tail]

    def __len__(self) -> int:
        return self._tail - self._head

    def push(self, rows: Rows) -> None:
        """Append at the back."""
        n = rows.shape[1]
        if self._tail + n > self._buf.shape[1]:
            self._reset(self.rows, front=_MARGIN, back=n + len(self) + _MARGIN)
        self._buf[:, self._tail : self._tail + n] = rows
        self._tail += n

    def push_front(self, rows: Rows) -> None:
        """Put back at the front, in their order."""
        n = rows.shape[1]
        if self._head < n:
            self._reset(self.rows, front=n + _MARGIN, back=len(self) + _MARGIN)
        self._buf[:, self._head - n : self._head] = rows
        self._head -= n

    def pop(self, count: int) -> None:
        """Drop the first `count`."""
        self._head += count

    def drop(self, gone: npt.NDArray[np.bool_]) -> None:
        """Remove the rows marked (a prefix, usually: the oldest give up first)."""
        marked = np.flatnonzero(gone)
        if not len(marked):
            return
        if marked[-1] + 1 == len(marked):
            self._head += len(marked)
            return
        self._reset(self.rows[:, ~gone], front=_MARGIN, back=_MARGIN)

    def _reset(self, rows: Rows, front: int, back: int) -> None:
        n = rows.shape[1]
        buf = np.empty((rows.shape[0], front + n + back))
        buf[:, front : front + n] = rows
        self._buf, self._head, self._tail = buf, front, front + n
