#!/usr/bin/env python
# SPDX-License-Identifier: LGPL-3.0-only
"""Which input tensors are in the page cache: run after a job of bench.py to see where
bytes read beyond "needed" come from (mincore(2) on each safetensors file).

    python bench/residency.py bench/data/1b/task bench/data/1b/lang [--all]

Prints, per file, resident bytes in the header, per tensor (only partly or fully
resident tensors, unless --all), and in the gaps.
"""

import ctypes
import json
import mmap
import os
import sys

libc = ctypes.CDLL(None, use_errno=True)
PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_pages(path):
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        mm = mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY)  # writable view, no page faults
        try:
            n = (size + PAGE - 1) // PAGE
            vec = (ctypes.c_ubyte * n)()
            buf = (ctypes.c_char * size).from_buffer(mm)
            if libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(size), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            bits = bytes(vec)
            del buf
        finally:
            mm.close()
    return bits


def main():
    show_all = "--all" in sys.argv
    for d in [a for a in sys.argv[1:] if not a.startswith("--")]:
        for f in sorted(os.listdir(d)):
            if not f.endswith(".safetensors"):
                continue
            path = os.path.join(d, f)
            bits = resident_pages(path)
            with open(path, "rb") as handle:
                n = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(n))
            header.pop("__metadata__", None)
            start = 8 + n

            def res(lo, hi, bits=bits):
                return sum(PAGE for p in range(lo // PAGE, (hi + PAGE - 1) // PAGE) if bits[p] & 1)

            total = sum(PAGE for b in bits if b & 1)
            print(f"{path}: {total / 1e6:.1f} MB resident; header {res(0, start) / 1e6:.2f} MB")
            for name, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                lo, hi = (start + o for o in v["data_offsets"])
                r = res(lo, hi)
                if r or show_all:
                    print(f"  {name:50s} {r / 1e6:8.2f} of {(hi - lo) / 1e6:8.2f} MB")


if __name__ == "__main__":
    main()
