"""Read a Hugging Face model directory: config.json, generation_config.json and safetensors weights.

Knows files, not models. Layout accepted:
    config.json                          required
    generation_config.json               optional
    model.safetensors                    one file, or
    model.safetensors.index.json         {"weight_map": {tensor name: shard file}} + the shards it names
    (no index: every *.safetensors file in the directory)

Tensors are read lazily through `safetensors.safe_open` (memory-mapped; never pickle / torch.load).
Every problem a user can cause raises one ModelLoadError naming the file and the cause: JSON nested too
deep (errors.loads_json), config.json / generation_config.json values of the wrong type or range
(loading/validate.py), index entries naming files outside the directory, weights not stored as floats.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from hotexperts.errors import ModelLoadError, read_json_object
from hotexperts.loading import validate
from hotexperts.loading.schema import HF_DTYPES

INDEX_NAME = "model.safetensors.index.json"


class SafetensorsDir:
    """An HF model directory: `config`, `generation_config`, and lazy access to its tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ModelLoadError(f"model directory {self.path} does not exist")
        self.config = read_json_object(self.path / "config.json")
        validate.check_hf_config(self.path / "config.json", self.config)
        self.generation_config = read_json_object(self.path / "generation_config.json", required=False)
        validate.check_generation_config(self.path / "generation_config.json", self.generation_config)
        self._handles: dict[str, object] = {}         # shard file name -> safe_open handle
        self.weight_map = self._weight_map()          # tensor name -> shard file name
        for shard in sorted(set(self.weight_map.values())):
            self._open(shard)
        self._check_index()

    # ---- discovery ----

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_NAME
        if index.is_file():
            wm = read_json_object(index).get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise ModelLoadError(f"{index} has no weight_map")
            for name, f in wm.items():
                self._check_shard_name(index, name, f)
            missing = sorted({f for f in wm.values() if not (self.path / f).is_file()})
            if missing:
                raise ModelLoadError(f"shard(s) named in {INDEX_NAME} are missing from {self.path}: "
                                     + ", ".join(missing))
            return dict(wm)
        files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"no model.safetensors (or {INDEX_NAME}) in {self.path}")
        wm: dict[str, str] = {}
        for f in files:
            for name in self._open(f).keys():
                wm[name] = f
        return wm

    def _check_shard_name(self, index: Path, name: str, f) -> None:
        """An index entry names a file inside the model directory (no absolute path, no '..', no link out)."""
        inside = isinstance(f, str) and f and not Path(f).is_absolute() and ".." not in Path(f).parts
        if inside and (self.path / f).exists():
            inside = (self.path / f).resolve().is_relative_to(self.path.resolve())
        if not inside:
            raise ModelLoadError(f"{index}: weight_map[{name!r}] must be a file name inside {self.path}, "
                                 f"got {f!r}")

    def _open(self, shard: str):
        if shard not in self._handles:
            p = self.path / shard
            try:
                self._handles[shard] = safe_open(str(p), framework="pt", device="cpu")
            except Exception as e:   # safetensors raises its own error types for bad headers
                raise ModelLoadError(f"{p} is truncated or not a valid safetensors file ({e})") from e
            self._check_size(p, self._handles[shard])
        return self._handles[shard]

    @staticmethod
    def _check_size(p: Path, handle) -> None:
        """The header's data offsets must fit in the file (catches files cut inside the data)."""
        with p.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end > p.stat().st_size:
            raise ModelLoadError(f"{p} is truncated: header promises {8 + header_len + end} bytes, "
                                 f"file has {p.stat().st_size}")

    def _check_index(self) -> None:
        keys = {shard: set(h.keys()) for shard, h in self._handles.items()}
        for name, shard in self.weight_map.items():
            if name not in keys[shard]:
                raise ModelLoadError(f"tensor {name!r} is listed in {INDEX_NAME} under {shard}, "
                                     "but that shard lacks it")

    # ---- access ----

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """The tensor on the CPU (memory-mapped read; the caller converts dtype/device). Weights are
        floats: a tensor stored as another dtype (I32, U8, ...) raises ModelLoadError, never a cast."""
        handle = self._handle(name)
        dtype = handle.get_slice(name).get_dtype()
        if dtype not in HF_DTYPES:
            raise ModelLoadError(f"{self.path / self.weight_map[name]}: tensor {name!r} must be stored as "
                                 f"{', '.join(HF_DTYPES)}, got {dtype}")
        try:
            return handle.get_tensor(name)
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"cannot read tensor {name!r} from {self.weight_map[name]}: {e}") from e

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise ModelLoadError(f"tensor {name!r} is missing from {self.path}")
        return self._handles[self.weight_map[name]]

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in shard order, one tensor at a time."""
        for name in sorted(self.weight_map, key=lambda n: (self.weight_map[n], n)):
            yield name, self.get(name)

    def nbytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in set(self.weight_map.values()))
