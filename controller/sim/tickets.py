"""The requests in the pools, by tag: what the run needs when a pool resolves one later."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from controller.model import FloatArray

IntArray = npt.NDArray[np.int64]


class Tickets:
    """Growing columns indexed by tag (the order the requests entered a pool)."""

    def __init__(self) -> None:
        self.count = 0
        self.tenant: IntArray = np.zeros(1024, dtype=np.int64)
        self.good: npt.NDArray[np.bool_] = np.zeros(1024, dtype=bool)
        self.work: FloatArray = np.zeros(1024)
        self.prompt: FloatArray = np.zeros(1024)
        self.output: FloatArray = np.zeros(1024)
        self.time: FloatArray = np.zeros(1024)  # arrival, unix seconds
        self.rid: list[str] = []

    def add(
        self,
        tenant: IntArray,
        good: npt.NDArray[np.bool_],
        prompt: FloatArray,
        output: FloatArray,
        time: FloatArray,
        rids: list[str],
    ) -> IntArray:
        """Tags for these requests, in order."""
        n = len(tenant)
        end = self.count + n
        if end > len(self.tenant):
            size = max(end, 2 * len(self.tenant))
            for name in ("tenant", "good", "work", "prompt", "output", "time"):
                column = getattr(self, name)
                grown = np.zeros(size, dtype=column.dtype)
                grown[: self.count] = column[: self.count]
                setattr(self, name, grown)
        span = slice(self.count, end)
        self.tenant[span], self.good[span] = tenant, good
        self.prompt[span], self.output[span] = prompt, output
        self.work[span], self.time[span] = prompt + output, time
        self.rid.extend(rids)
        tags = np.arange(self.count, end, dtype=np.int64)
        self.count = end
        return tags
