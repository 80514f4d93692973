# SPDX-License-Identifier: LGPL-3.0-only
"""Read a merge's input bytes a bounded distance ahead of it, on a background thread.

mergekit's loader maps each safetensors shard and reads a tensor only when the merge first
touches it, so the merge thread stops for the disk at every tensor and the disk idles while
the merge computes or writes. A thread that pulls the byte ranges the merge will need, in
the order it will need them, into the page cache lets the two overlap (measured in
docs/performance.md). It only warms the page cache: the merge still reads every value
through mergekit's loader, so outputs cannot change.

The thread copies nothing into the process: ``sendfile`` to ``/dev/null`` makes the kernel
read the pages (plain ``pread`` into one reused buffer where that is refused). It stays at
most ``window`` bytes ahead of the consumer, so the pages it warms are not evicted before
use on a small machine, and anything it cannot read is left to the merge (which then reports
the error itself). ``MERGEKIT_LAYERSWAP_READAHEAD_MB`` sets the window; 0 turns it off.
"""

from __future__ import annotations

import bisect
import collections
import logging
import math
import os
import threading
from typing import Dict, Iterable, List, Optional, Tuple

from mergekit_layerswap.adapter.file_checks import read_safetensors_layout
from mergekit_layerswap.core.errors import LayerSwapError, OptionError

LOG = logging.getLogger(__name__)
WINDOW_ENV = "MERGEKIT_LAYERSWAP_READAHEAD_MB"
DEFAULT_WINDOW_MB = 1024
CHUNK_BYTES = 16 << 20

# (step, file path, byte offset, byte count): the consumer needs the range at ``step``
Range = Tuple[int, str, int, int]


def window_bytes() -> int:
    """The window from ``MERGEKIT_LAYERSWAP_READAHEAD_MB`` (default 1024 MB; 0 = off)."""
    value = os.environ.get(WINDOW_ENV, "").strip()
    if not value:
        return DEFAULT_WINDOW_MB << 20
    try:
        megabytes = float(value)
    except ValueError:
        megabytes = math.nan
    if not math.isfinite(megabytes) or megabytes < 0:
        raise OptionError(
            f"{WINDOW_ENV}={value!r} is not a number of megabytes; set it to a size such as "
            f"{DEFAULT_WINDOW_MB}, or 0 to turn reading ahead off"
        )
    return int(megabytes * (1 << 20))


class Readahead:
    """Warms ``ranges`` in step order, never more than ``window`` bytes beyond the last step
    the consumer reported with ``reached`` (except the next step's own ranges, so one tensor
    larger than the window is still read ahead of the blend that needs it); ranges of steps
    the consumer has already passed are skipped. A context manager: leaving it stops the
    thread."""

    def __init__(self, ranges: Iterable[Range], window: Optional[int] = None):
        self.ranges: List[Range] = sorted(ranges, key=lambda r: r[0])
        self._steps = sorted({r[0] for r in self.ranges})
        self.window = window_bytes() if window is None else window
        self.bytes_read = 0
        self._reached = -1
        self._ahead = 0  # bytes warmed for steps the consumer has not reached
        self._warmed: collections.deque = collections.deque()  # (step, bytes)
        self._stopped = False
        self._condition = threading.Condition()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "Readahead":
        if self.window > 0 and self.ranges:
            self._thread = threading.Thread(target=self._run, name="layerswap-readahead", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def reached(self, step: int) -> None:
        """The consumer has finished every step up to and including ``step``."""
        with self._condition:
            if step <= self._reached:
                return
            self._reached = step
            while self._warmed and self._warmed[0][0] <= step:
                self._ahead -= self._warmed.popleft()[1]
            self._condition.notify_all()

    def stop(self) -> None:
        with self._condition:
            self._stopped = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # ------------------------------------------------------------------ thread
    def _wait_for_room(self, step: int) -> bool:
        """Block until ``step`` may be warmed; False when it should be skipped or we stop."""
        with self._condition:
            while not self._stopped and step > self._reached and self._ahead >= self.window:
                if step == self._steps[bisect.bisect_right(self._steps, self._reached)]:
                    break  # the step the consumer works on now
                self._condition.wait()
            return not self._stopped and step > self._reached

    def _run(self) -> None:
        files: Dict[str, int] = {}
        warmer = _Warmer()
        try:
            for step, path, offset, length in self.ranges:
                end = offset + length
                while offset < end:
                    if not self._wait_for_room(step):
                        if self._stopped:
                            return
                        break  # the consumer passed this step already
                    fd = files.get(path)
                    if fd is None:
                        fd = files[path] = os.open(path, os.O_RDONLY)
                    count = warmer.warm(fd, offset, min(CHUNK_BYTES, end - offset))
                    if count <= 0:
                        break  # end of file: the merge will report a short file itself
                    offset += count
                    with self._condition:
                        self.bytes_read += count
                        if step > self._reached:
                            self._ahead += count
                            self._warmed.append((step, count))
        except OSError as error:  # only a hint: the merge reads (and reports) for itself
            LOG.debug("readahead stopped: %s", error)
        finally:
            for fd in files.values():
                os.close(fd)
            warmer.close()


class _Warmer:
    """Brings file bytes into the page cache: ``sendfile`` to ``/dev/null`` (no copy into
    this process), or ``pread`` into one reused buffer where the kernel refuses that."""

    def __init__(self) -> None:
        self._null: Optional[int] = os.open(os.devnull, os.O_WRONLY)
        self._buffer: Optional[bytearray] = None

    def warm(self, fd: int, offset: int, count: int) -> int:
        """The bytes warmed at ``offset`` (0 at the end of the file)."""
        if self._null is not None:
            try:
                return os.sendfile(self._null, fd, offset, count)
            except OSError:
                self.close()
        if self._buffer is None:
            self._buffer = bytearray(CHUNK_BYTES)
        return os.preadv(fd, [memoryview(self._buffer)[:count]], offset)

    def close(self) -> None:
        if self._null is not None:
            os.close(self._null)
            self._null = None


class SafetensorsOffsets:
    """Where each tensor's bytes lie in a safetensors shard (headers read once per file)."""

    def __init__(self) -> None:
        self._files: Dict[str, Optional[Tuple[int, dict]]] = {}

    def locate(self, path: str, name: str) -> Optional[Tuple[int, int]]:
        """(file offset, byte count) of tensor ``name`` in ``path``, or None (not safetensors,
        unreadable, or no such tensor: nothing to warm)."""
        if path not in self._files:
            self._files[path] = _read_header(path)
        entry = self._files[path]
        if entry is None:
            return None
        data_start, header = entry
        item = header.get(name)
        if not isinstance(item, dict):
            return None
        start, end = item["data_offsets"]
        return data_start + start, end - start


def _read_header(path: str) -> Optional[Tuple[int, dict]]:
    if not path.endswith(".safetensors"):
        return None
    try:
        return read_safetensors_layout(path)
    except LayerSwapError:
        return None  # the merge's own checks and loader report a bad file


def tensor_range(offsets: SafetensorsOffsets, index, names: Iterable[str]) -> Optional[Tuple[str, int, int]]:
    """(path, offset, bytes) of the first of ``names`` a mergekit ``ShardedTensorIndex`` stores."""
    for name in names:
        shard = index.tensor_paths.get(name)
        if shard is None:
            continue
        path = os.path.join(index.base_path, shard)
        where = offsets.locate(path, name)
        return (path, *where) if where else None
    return None
