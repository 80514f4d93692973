# SPDX-License-Identifier: LGPL-3.0-only
"""Reading ahead and early writeback (issue 14): a background thread warms exactly the
byte ranges a merge or the magnitude pass will read, in their order, a bounded distance
ahead; finished shards go to the kernel's writeback at once. Neither may change a byte of
the output."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time

import pytest
import torch
from helpers import merge, refused, swap_recipe
from safetensors import safe_open

import mergekit_layerswap.adapter.output as output
import mergekit_layerswap.adapter.readahead as readahead
from mergekit_layerswap.adapter.magnitude import row_mav


# ----------------------------------------------------------------- the thread itself
def _files(tmp_path, count, size):
    paths = []
    for i in range(count):
        path = tmp_path / f"f{i}.bin"
        path.write_bytes(os.urandom(size))
        paths.append(str(path))
    return paths


def _settle(ahead, expected, timeout=10.0):
    """Wait until the thread has read ``expected`` bytes, then a little longer, so a
    thread that would read too much has the chance to."""
    deadline = time.monotonic() + timeout
    while ahead.bytes_read < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    return ahead.bytes_read


def test_stays_within_the_window_but_always_reads_the_next_step(tmp_path, monkeypatch):
    monkeypatch.setattr(readahead, "CHUNK_BYTES", 10_000)
    a, b, c = _files(tmp_path, 3, 30_000)
    ranges = [(0, a, 0, 30_000), (1, b, 0, 30_000), (2, c, 0, 30_000)]
    with readahead.Readahead(ranges, window=40_000) as ahead:
        # nothing consumed: step 0 whole (the step being worked on), then 10 kB of step 1
        assert _settle(ahead, 40_000) == 40_000
        ahead.reached(0)  # 10 kB ahead now: 30 kB more fit
        assert _settle(ahead, 70_000) == 70_000
        ahead.reached(2)  # everything passed: the rest is skipped, never read
        time.sleep(0.2)
        assert ahead.bytes_read == 70_000


def test_a_step_larger_than_the_window_is_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(readahead, "CHUNK_BYTES", 4_096)
    (big,) = _files(tmp_path, 1, 100_000)
    with readahead.Readahead([(5, big, 0, 100_000)], window=8_192) as ahead:
        assert _settle(ahead, 100_000) == 100_000


def test_stop_ends_a_waiting_thread_and_zero_turns_it_off(tmp_path, monkeypatch):
    a, b = _files(tmp_path, 2, 50_000)
    ahead = readahead.Readahead([(0, a, 0, 50_000), (1, b, 0, 50_000)], window=1)
    with ahead:
        _settle(ahead, 50_000)
    assert ahead._thread is None and ahead.bytes_read == 50_000  # joined, never read step 1
    monkeypatch.setenv(readahead.WINDOW_ENV, "0")
    with readahead.Readahead([(0, a, 0, 50_000)]) as off:
        assert off._thread is None
    assert off.bytes_read == 0


@pytest.mark.parametrize("value", ["lots", "-5", "nan"])
def test_a_bad_window_is_refused_in_one_line_before_anything_is_written(families, tmp_path, monkeypatch, value):
    family = families("llama")
    # this recipe has a second fault (its base_model is an expert) that later checks would
    # report: the window must be the first thing refused
    recipe = swap_recipe(family, bottom_layers=2, top_layers=2, weighting="magnitude")
    recipe["base_model"] = family.task
    monkeypatch.setenv(readahead.WINDOW_ENV, value)
    refused(tmp_path, recipe, readahead.WINDOW_ENV, "0 to turn")


def test_unreadable_files_are_left_to_the_merge(tmp_path):
    (a,) = _files(tmp_path, 1, 1_000)
    ranges = [(0, str(tmp_path / "missing.bin"), 0, 100), (1, a, 0, 1_000)]
    with readahead.Readahead(ranges, window=1 << 20) as ahead:
        time.sleep(0.2)
    assert ahead.bytes_read == 0  # stopped quietly at the first error: only a hint


def test_the_pread_fallback_reads_the_same_bytes(tmp_path):
    (a,) = _files(tmp_path, 1, 5_000)
    fd = os.open(a, os.O_RDONLY)
    try:
        warmer = readahead._Warmer()
        assert warmer.warm(fd, 1_000, 3_000) == 3_000  # sendfile to /dev/null
        warmer.close()  # as when the kernel refuses sendfile
        assert warmer.warm(fd, 4_000, 3_000) == 1_000  # pread: only 1 kB left in the file
        assert warmer.warm(fd, 5_000, 10) == 0
    finally:
        os.close(fd)


def test_safetensors_offsets_point_at_each_tensors_bytes(tmp_path):
    from safetensors.torch import save_file

    tensors = {"b": torch.arange(7, dtype=torch.int16), "a": torch.randn(3, 5), "c": torch.randn(2).bfloat16()}
    path = str(tmp_path / "x.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    offsets = readahead.SafetensorsOffsets()
    raw = open(path, "rb").read()
    for name, tensor in tensors.items():
        start, count = offsets.locate(path, name)
        assert raw[start : start + count] == tensor.contiguous().view(torch.uint8).numpy().tobytes(), name
    assert offsets.locate(path, "absent") is None
    assert offsets.locate(str(tmp_path / "x.bin"), "a") is None  # not safetensors: nothing to warm


# ------------------------------------------------------------- inside a real merge
class _Recording(readahead.Readahead):
    instances: list = []

    def __init__(self, ranges, window=None):
        super().__init__(ranges, window)
        self.reports = []
        _Recording.instances.append(self)

    def reached(self, step):
        self.reports.append(step)
        super().reached(step)


def _tensor_bytes(path, name):
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        start, end = header[name]["data_offsets"]
        handle.seek(8 + length + start)
        return handle.read(end - start)


def _covered(ranges):
    """{(model directory, tensor name)} the ranges cover, each checked byte for byte."""
    covered = set()
    for _step, path, offset, count in ranges:
        with safe_open(path, "pt") as handle:
            names = [n for n in handle.keys() if len(_tensor_bytes(path, n)) == count]
        with open(path, "rb") as raw:
            raw.seek(offset)
            data = raw.read(count)
        matches = [n for n in names if _tensor_bytes(path, n) == data]
        assert matches, f"range at {offset} of {path} is not a tensor's bytes"
        covered.add((os.path.dirname(path), matches[0]))
    return covered


def _stored(model):
    names = set()
    for file in os.listdir(model):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(model, file), "pt") as handle:
                names.update(handle.keys())
    return names


def test_a_merge_warms_exactly_what_it_reads_in_schedule_order(families, tmp_path, monkeypatch):
    family = families("llama")
    arch = family.arch
    monkeypatch.setattr(readahead, "Readahead", _Recording)
    _Recording.instances.clear()
    recipe = swap_recipe(family, bottom_layers=2, top_layers=1, bottom_transition=1, top_transition=1)
    (tmp_path / "on").mkdir()
    merge(tmp_path / "on", recipe)
    (ahead,) = _Recording.instances
    n = arch.num_layers
    expected = set()  # the test's own reading of the rule: which expert's tensors are needed
    for name in _stored(family.task):
        layer = arch.layer_of(name)
        language = layer is None or layer < 3 or layer >= n - 2  # bottom 2 + 1 transition, top 1 + 1
        task = layer is None or 2 <= layer < n - 1
        if language:
            expected.add((family.lang, name))
        if task:
            expected.add((family.task, name))
    assert _covered(ahead.ranges) == expected
    steps = [r[0] for r in ahead.ranges]
    assert steps == sorted(steps) and max(steps) <= max(ahead.reports)
    assert ahead.reports == sorted(ahead.reports)  # progress only moves forward
    assert ahead.bytes_read > 0


def test_reading_ahead_and_writeback_change_no_output_byte(families, tmp_path, monkeypatch):
    family = families("llama")
    submitted = []

    class Recording(output.Writeback):
        def submit(self, path):
            submitted.append(os.path.basename(path))
            super().submit(path)

    monkeypatch.setattr(output, "Writeback", Recording)
    recipe = swap_recipe(family, bottom_layers=2, top_layers=2, bottom_transition=1, top_transition=1)
    (tmp_path / "on").mkdir()
    (tmp_path / "off").mkdir()
    on = merge(tmp_path / "on", recipe, "--out-shard-size", "20K")
    monkeypatch.setenv(readahead.WINDOW_ENV, "0")
    monkeypatch.setattr(output, "start_writeback", lambda path: None)
    off = merge(tmp_path / "off", recipe, "--out-shard-size", "20K")

    def digest(root):
        return {
            name: hashlib.sha256(open(os.path.join(root, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(root))
            if name.endswith((".safetensors", ".json"))
        }

    shards = len([n for n in os.listdir(on) if n.endswith(".safetensors")])
    assert shards > 2
    assert digest(on) == digest(off)
    # every shard of the first merge was handed to the writeback as it was finished
    assert submitted[:shards] == [f"model-{i}.safetensors" for i in range(1, shards + 1)]


def test_start_writeback_tolerates_a_vanished_file(tmp_path):
    output.start_writeback(str(tmp_path / "gone.safetensors"))  # renamed by finalize meanwhile
    done = output.Writeback()
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 10_000)
    done.submit(str(path))
    done.submit(str(tmp_path / "gone"))
    done.close()
    assert done._thread is None and path.read_bytes() == b"x" * 10_000


# ------------------------------------------------------ the magnitude pass's blocks
def _row_mav_before_buffers(expert, base, block_elements):
    """The pass's computation before its buffers were reused, written out again: fresh
    float32 copies per block of rows (blocks, not the whole tensor: a block of one long
    row is reduced by a differently split sum, so the whole-tensor mean differs in the last
    bit there)."""
    if expert.ndim == 1:
        expert, base = expert.reshape(1, -1), base.reshape(1, -1)
    rows, columns = expert.shape
    step = max(1, block_elements // columns)
    out = torch.empty(rows, dtype=torch.float32)
    for start in range(0, rows, step):
        block = expert[start : start + step].to(torch.float32, copy=True)
        block.sub_(base[start : start + step].float()).abs_()
        out[start : start + step] = block.mean(dim=1)
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_row_mav_with_reused_buffers_gives_the_same_bits(dtype):
    generator = torch.Generator().manual_seed(7)
    buffers: list = []
    # a large tensor first, then smaller and wider ones reuse (and regrow) the same buffers;
    # (40, 300_000) ends in a block of a single row
    for shape in [(3000, 1500), (7, 5), (4099,), (33, 257), (40, 300_000)]:
        base = torch.randn(shape, generator=generator).to(dtype)
        expert = (base.double() + 1e-3 * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)
        expected = _row_mav_before_buffers(expert, base, 1 << 20)
        got = row_mav(expert, base, block_elements=1 << 20, buffers=buffers)
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), shape
