# SPDX-License-Identifier: LGPL-3.0-only
"""Devices torch can honour, checked before a merge (or a command) reads anything.

mergekit 0.1.5 passes ``--cuda`` / ``--device`` straight to torch, which fails deep inside
the merge (``AssertionError: Torch not compiled with CUDA enabled``, or an index error for
a ``cuda:N`` beyond the devices present). ``layer_swap`` merges and this package's own
commands refuse such an option first, in one line; other merge methods keep mergekit's
behaviour.
"""

from __future__ import annotations

from typing import Optional

from mergekit_layerswap.core.errors import OptionError

# device type -> how torch says whether it is present
_BACKENDS = {"mps": lambda torch: torch.backends.mps.is_available()}


def device_problem(name: str) -> Optional[str]:
    """Why torch cannot use device ``name`` here (None when it can)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        return f"{name!r} is not a device torch knows (cpu, cuda, cuda:N, mps, ...)"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "was built without CUDA" if torch.version.cuda is None else "finds no CUDA GPU or driver"
            return f"this torch ({torch.__version__}) {why}"
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            present = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            return f"only {count} CUDA device{'s are' if count > 1 else ' is'} present ({present})"
        return None
    check = _BACKENDS.get(device.type)
    if check is None:
        module = getattr(torch, device.type, None)
        available = getattr(module, "is_available", None)
        check = (lambda torch: bool(available())) if callable(available) else None
    try:
        present = check is not None and bool(check(torch))
    except Exception:  # noqa: BLE001 - a backend that cannot even be asked is not usable
        present = False
    if not present:
        return f"there is no {device.type} device here"
    if device.index is not None:
        count = getattr(getattr(torch, device.type, None), "device_count", lambda: 1)()
        if device.index >= count:
            return f"only {count} {device.type} device{'s are' if count > 1 else ' is'} present"
    return None


def check_device(name: str, option: str) -> None:
    """Refuse ``option`` (as the user spelt it) when torch cannot use device ``name``."""
    problem = device_problem(name)
    if problem is not None:
        raise OptionError(
            f"{option} asks for device {name}, but {problem}; drop {option.split()[0]} to work on the CPU, "
            f"or choose a device this machine has"
        )


def check_merge_options(options) -> None:
    """The device options of a mergekit ``MergeOptions`` (``--cuda``, ``--device``,
    ``--read-to-gpu``, ``--multi-gpu``, ``--gpu-rich``)."""
    device = getattr(options, "device", None) or "cpu"
    if getattr(options, "gpu_rich", False):
        option = "--gpu-rich"
    elif getattr(options, "cuda", False) and device == "cuda":
        option = "--cuda"
    else:
        option = f"--device {device}"
    check_device(device, option)
    if getattr(options, "multi_gpu", False):
        check_device("cuda", "--multi-gpu" if not getattr(options, "gpu_rich", False) else "--gpu-rich")
