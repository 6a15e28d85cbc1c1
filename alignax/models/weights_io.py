"""Reading and writing HF-style weight directories: config.json plus safetensors shards.

Headers are read first so that every key, shape and dtype is checked before any
tensor data is touched. Writes go to a temporary sibling directory that is renamed
into place, so a crash never leaves a half-written export behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from alignax.errors import WeightsError

_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or an HF-style size string ('5GB' is 10**9-based, '5GiB' 2**30)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?I?B)\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r}: expected an int or a string like '5GB' or '500MiB'")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    try:
        with open(path) as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise WeightsError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name: F32, F16, BF16, ...


def _header(path: Path) -> dict[str, TensorInfo]:
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: TensorInfo(path, tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                    for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e


def _shard_name(index: Path, key: object, name: object) -> str:
    """An index entry's shard: a file inside the model directory, never `../x` or an absolute path."""
    if not isinstance(name, str) or not name:
        raise WeightsError(f"{index}: weight_map[{key!r}]={name!r} is not a file name")
    if Path(name).is_absolute() or name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/"):
        raise WeightsError(f"{index}: weight_map[{key!r}]={name!r} points outside {index.parent}; shards must be "
                           "files inside the model directory")
    return name


def _weight_files(directory: Path, stem: str) -> list[Path]:
    index = directory / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{index}: missing or malformed 'weight_map'")
        names = {_shard_name(index, key, name) for key, name in weight_map.items()}
        files = [directory / name for name in sorted(names)]
        for file in files:
            if not file.is_file():
                raise WeightsError(f"{index}: names shard {file.name}, which does not exist in {directory}")
        return files
    single = directory / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    candidates = sorted(p for p in directory.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates
    if not candidates:
        raise WeightsError(f"{directory}: no *.safetensors weights found (expected {stem}.safetensors "
                           f"or {stem}.safetensors.index.json)")
    raise WeightsError(f"{directory}: several *.safetensors files and no {stem}.safetensors.index.json "
                       f"to say which belong together: {[p.name for p in candidates]}")


def read_header(directory: str | os.PathLike, stem: str) -> dict[str, TensorInfo]:
    """Key → (file, shape, dtype) for every tensor in the directory's weights, without loading data."""
    directory = Path(directory)
    infos: dict[str, TensorInfo] = {}
    for file in _weight_files(directory, stem):
        for key, info in _header(file).items():
            if key in infos:
                raise WeightsError(f"{file}: key {key!r} is also stored in {infos[key].file.name}")
            infos[key] = info
    return infos


# safetensors dtype names of floating-point tensors; anything else (I64, BOOL, U8, ...) is not a parameter.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def check_header_dtypes(infos: Mapping[str, TensorInfo], keys: list[str]) -> None:
    """WeightsError naming the file and key of the first non-float tensor among `keys`, before any data is read.

    A parameter loaded from an integer or bool tensor would be cast to float without a word."""
    for key in keys:
        info = infos[key]
        if info.dtype not in FLOAT_DTYPES:
            raise WeightsError(f"{info.file}: tensor {key!r} has dtype {info.dtype}; a parameter must be floating "
                               f"point ({'/'.join(FLOAT_DTYPES)}); refusing to cast it")


def check_array(array: np.ndarray, key: str, source: str | os.PathLike) -> np.ndarray:
    """`array` if it is a finite floating-point tensor; else WeightsError naming `source` and `key`."""
    import jax.numpy as jnp  # jnp knows bfloat16 and float8, numpy does not
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise WeightsError(f"{source}: tensor {key!r} has dtype {array.dtype}; a parameter must be floating point; "
                           "refusing to cast it")
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - np.count_nonzero(finite))
        raise WeightsError(f"{source}: tensor {key!r} holds {bad} NaN/Inf value(s) of {array.size}; the weights "
                           "are corrupt or diverged")
    return array


def load_tensors(infos: Mapping[str, TensorInfo], keys: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (key, array) one at a time, opening each shard once; each is checked finite and floating point."""
    check_header_dtypes(infos, keys)
    by_file: dict[Path, list[str]] = {}
    for key in keys:
        by_file.setdefault(infos[key].file, []).append(key)
    for file, file_keys in by_file.items():
        try:
            with safe_open(str(file), framework="numpy") as f:
                for key in file_keys:
                    yield key, check_array(f.get_tensor(key), key, file)
        except WeightsError:
            raise
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{file}: could not read tensor data ({e}); the file may be truncated") from e


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary directory that replaces `out_dir` only if the block succeeds. The published
    tree gets the permissions of any file the user creates (0755 dirs / 0644 files with umask 022),
    not the owner-only 0700 / 0600 of temporary files (mkdtemp, safetensors' own scratch file)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _normal_permissions(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _umask() -> int:
    try:  # Linux reports it without changing it (os.umask can only be read by setting it)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_permissions(directory: Path) -> None:
    """chmod the tree to 0777 / 0666 (dirs / files) minus the umask. A file with other hard links
    (`export --pipeline --hardlink` links the base pipeline's weights) keeps its mode: a chmod would
    change the linked original too."""
    umask = _umask()
    os.chmod(directory, 0o777 & ~umask)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            path = os.path.join(root, name)
            if os.lstat(path).st_nlink == 1:
                os.chmod(path, 0o666 & ~umask)


def write_tensors(tensors: Mapping[str, np.ndarray], directory: Path, stem: str,
                  max_shard_size: int | str = "5GB") -> list[Path]:
    """Writes safetensors shards, plus an index when there is more than one, in HF naming."""
    limit = parse_size(max_shard_size)
    shards: list[dict[str, np.ndarray]] = [{}]
    shard_bytes = 0
    for key in sorted(tensors):
        array = np.require(tensors[key], requirements="C")  # ascontiguousarray would turn 0-d into (1,)
        if shards[-1] and shard_bytes + array.nbytes > limit:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = array
        shard_bytes += array.nbytes
    if len(shards) == 1:
        names = [f"{stem}.safetensors"]
    else:
        names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=False):
        save_file(shard, str(directory / name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))},
                 "weight_map": {k: name for name, shard in zip(names, shards, strict=False) for k in shard}}
        with open(directory / f"{stem}.safetensors.index.json", "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    return [directory / n for n in names]
