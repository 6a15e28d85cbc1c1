"""Deterministic batches: `Loader(source, ...).batch_at(step)` is a pure function of (seed, step).

Global batch `step` holds the records at global positions `step*B .. step*B + B - 1` of an
endless stream that visits every record once per epoch, in an order drawn per epoch from
`numpy.random.default_rng([seed, epoch])`. A batch may straddle an epoch boundary. Because
nothing depends on what was read before, the checkpointed "iterator position" is the step
itself and resume is exact; every process computes the same global batch and reads only its
own contiguous slice (rows `process_index*B/P .. (process_index+1)*B/P`), so the slices of
all processes concatenate, in process order, to the single-process batch.
"""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Iterator

import numpy as np

from alignax.data.source import Source
from alignax.errors import ConfigError, DataError


class Loader:
    """This process's slice of deterministic global batches from a `Source`."""

    def __init__(
        self,
        source: Source,
        *,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        shuffle: bool = True,
        prefetch: int = 2,
    ):
        if not isinstance(global_batch_size, int | np.integer) or global_batch_size <= 0:
            raise ConfigError(f"global_batch_size: expected a positive int, found {global_batch_size!r}")
        if not isinstance(process_count, int | np.integer) or process_count <= 0:
            raise ConfigError(f"process_count: expected a positive int, found {process_count!r}")
        if not 0 <= process_index < process_count:
            raise ConfigError(
                f"process_index: expected 0 <= process_index < process_count={process_count}, found {process_index}"
            )
        if global_batch_size % process_count:
            raise ConfigError(
                f"global_batch_size={global_batch_size} is not divisible by process_count={process_count};"
                f" every process must get the same number of rows"
            )
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise ConfigError(f"seed: expected a non-negative int, found {seed!r}")
        if prefetch < 0:
            raise ConfigError(f"prefetch: expected >= 0, found {prefetch}")
        if len(source) == 0:
            raise DataError(f"{getattr(source, 'path', source)}: the dataset has no records to batch")
        self.source = source
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = self.global_batch_size // int(process_count)
        self.seed = int(seed)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.shuffle = shuffle
        self.prefetch = int(prefetch)
        self._orders: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Record indices in the order epoch `epoch` visits them (a permutation of range(len(source)))."""
        if not self.shuffle:
            return np.arange(len(self.source))
        if epoch not in self._orders:
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
            while len(self._orders) > 4:  # a batch touches at most a few consecutive epochs
                self._orders.popitem(last=False)
        return self._orders[epoch]

    def indices_at(self, step: int) -> np.ndarray:
        """Record indices of this process's rows of global batch `step`."""
        if step < 0:
            raise ConfigError(f"step: expected >= 0, found {step}")
        start = int(step) * self.global_batch_size + self.process_index * self.local_batch_size
        positions = np.arange(start, start + self.local_batch_size, dtype=np.int64)
        n = len(self.source)
        epochs, offsets = np.divmod(positions, n)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self.epoch_order(int(epoch))[offsets[mask]]
        return out

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `step`: numbers stacked on axis 0, strings as object arrays."""
        indices = self.indices_at(step)
        return stack_records(self.source.get_many(indices), where=f"{getattr(self.source, 'path', '')} step {step}")

    def batches(self, start_step: int = 0) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(step, batch) from `start_step` on, read `prefetch` steps ahead on a background thread."""
        if self.prefetch == 0:
            step = start_step
            while True:
                yield step, self.batch_at(step)
                step += 1
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="alignax-loader")
        pending: collections.deque = collections.deque()
        step = start_step
        try:
            while True:
                while len(pending) <= self.prefetch:
                    pending.append((step, executor.submit(self.batch_at, step)))
                    step += 1
                done_step, future = pending.popleft()
                yield done_step, future.result()
        finally:
            for _, future in pending:
                future.cancel()
            executor.shutdown(wait=True)


def stack_records(records: list[dict[str, object]], where: str = "") -> dict[str, np.ndarray]:
    """Stack a list of records field by field; DataError naming the field when shapes differ."""
    if not records:
        raise DataError(f"{where}: no records to stack")
    batch = {}
    for key in records[0]:
        values = [r[key] for r in records]
        if isinstance(values[0], str | bytes):
            column = np.empty(len(values), dtype=object)
            column[:] = values
            batch[key] = column
            continue
        shapes = {np.shape(v) for v in values}
        if len(shapes) > 1:
            raise DataError(
                f"{where}: field {key!r} has differing shapes {sorted(shapes)} within one batch;"
                f" resize when building the dataset (e.g. image_size=) so records stack"
            )
        batch[key] = np.stack(values)
    return batch
