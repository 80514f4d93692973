# SPDX-License-Identifier: LGPL-3.0-only
"""One timed job of bench/bench.py, run as its own process by the bench's interpreter.

    python bench/_child.py merge REPORT.json <mergekit-yaml arguments...>
    python bench/_child.py copy  REPORT.json SRC_DIR DST_DIR
    python bench/_child.py read  REPORT.json DIR...
    python bench/_child.py copy-hinted    REPORT.json SRC_DIR DST_DIR
    python bench/_child.py read-sendfile  REPORT.json DIR...

``merge`` imports ``mergekit.scripts.run_yaml`` (which is all the ``mergekit-yaml`` console script
does, so the .pth hook and every import are the same as for the real command), takes a timestamp,
and calls its ``main``; ``copy`` copies a model's ``*.safetensors`` files with ``shutil.copyfile``
and fsyncs each (as a layer_swap merge does); ``read`` reads every ``*.safetensors`` file of the
given models once (what the cold magnitude pass must read). ``copy-hinted`` is ``copy`` with the
writeback hint a layer_swap merge gives each finished shard (``posix_fadvise(DONTNEED)`` before
the fsync); ``read-sendfile`` reads like the merge's readahead thread (``sendfile`` to
``/dev/null``): the fastest ways this machine copies and reads, for comparison. REPORT.json receives the seconds spent
before the job (interpreter start-up is not included: it is before this file runs), the seconds of
the job itself, and VmHWM / RssAnon from /proc/self/status at the end.
"""

import json
import os
import shutil
import sys
import time

t_start = time.perf_counter()
mode, report_path, args = sys.argv[1], sys.argv[2], sys.argv[3:]

if mode == "merge":
    from mergekit.scripts.run_yaml import main

    with open("/proc/self/status") as handle:
        after_imports = {
            line.split(":")[0] + "_after_imports_kB": int(line.split()[1])
            for line in handle
            if line.startswith("RssAnon:")
        }
    t0 = time.perf_counter()
    main(args, standalone_mode=False)
    t1 = time.perf_counter()
elif mode in ("copy", "copy-hinted"):
    after_imports = {}
    src, dst = args
    os.makedirs(dst, exist_ok=True)
    t0 = time.perf_counter()
    for name in sorted(os.listdir(src)):
        if name.endswith(".safetensors"):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
            # a layer_swap merge fsyncs its files before swapping them into place
            # (adapter/output.py), so the copy baseline does too
            with open(os.path.join(dst, name), "rb") as handle:
                if mode == "copy-hinted":
                    os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                os.fsync(handle.fileno())
    t1 = time.perf_counter()
elif mode == "read-sendfile":
    after_imports = {}
    t0 = time.perf_counter()
    null = os.open(os.devnull, os.O_WRONLY)
    for src in args:
        for name in sorted(os.listdir(src)):
            if name.endswith(".safetensors"):
                fd = os.open(os.path.join(src, name), os.O_RDONLY)
                offset, size = 0, os.fstat(fd).st_size
                while offset < size:
                    offset += os.sendfile(null, fd, offset, min(16 << 20, size - offset))
                os.close(fd)
    t1 = time.perf_counter()
elif mode == "read":
    after_imports = {}
    t0 = time.perf_counter()
    buffer = bytearray(16 << 20)
    for src in args:
        for name in sorted(os.listdir(src)):
            if name.endswith(".safetensors"):
                with open(os.path.join(src, name), "rb", buffering=0) as handle:
                    while handle.readinto(buffer):
                        pass
    t1 = time.perf_counter()
else:
    raise SystemExit(f"unknown mode {mode}")

status = {}
with open("/proc/self/status") as handle:
    for line in handle:
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            status[key + "_kB"] = int(value.split()[0])
with open(report_path, "w") as handle:
    json.dump({"imports_s": t0 - t_start, "job_s": t1 - t0, **status, **after_imports}, handle)
