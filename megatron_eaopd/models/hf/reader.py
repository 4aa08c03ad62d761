"""Read blocks of tensors from a Hugging Face weights folder without loading whole files.

`HFWeights(hf_dir)` indexes the folder up front and checks it, so a broken download fails before
anything is built or any process group started:

- sharded safetensors (`model.safetensors.index.json` + the shards it names) or one
  `model.safetensors`; every shard must exist and hold the tensors the index assigns to it, and
  its size must equal what its header promises (a truncated download is named);
- pickled `pytorch_model.bin` (or its index) is refused unless `trust_pickle=True` (unpickling a
  file runs code; even torch's weights_only loader should only see files you trust), and so is
  torch's legacy non-zip format, which cannot be memory-mapped.

`read(key, slices)` opens the shard with safetensors' `safe_open` and reads only that block via
`get_slice`, then closes the file, so the pages mapped for one read are released before the next:
a rank's memory holds its own parameters plus one block at a time. No communication.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile

import torch

from megatron_eaopd.models.hf.config import MissingHFFile

__all__ = ["HFWeights", "PickledWeights"]

SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
PICKLE_INDEX, PICKLE_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"


class PickledWeights(ValueError):
    """A folder with pickled weights only, read without ``trust_pickle``."""


def _safetensors_header(path: str) -> dict:
    """The JSON header of a safetensors file; ValueError naming the file when it is truncated."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"safetensors shard {path!r} is truncated ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise ValueError(
                f"safetensors shard {path!r} is truncated: its header needs {8 + n} bytes, the "
                f"file has {size}"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"safetensors shard {path!r} has a corrupt header ({exc})") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end != size:
        raise ValueError(
            f"safetensors shard {path!r} is truncated or corrupt: its header describes "
            f"{8 + n + end} bytes, the file has {size}. Download it again."
        )
    return header


class HFWeights:
    """The tensors of an HF folder: key -> file, shapes, block reads.

    Args:
        hf_dir: the model folder.
        trust_pickle: allow pytorch_model.bin files (loaded with torch.load(weights_only=True,
            mmap=True)); refused otherwise.
    Raises:
        MissingHFFile (a FileNotFoundError and a ValueError): no weights, or a shard named by the
            index is missing.
        ValueError: a truncated or corrupt shard, a tensor the index puts in a shard that does not
            hold it, both one model.safetensors and an index (ambiguous), pickled weights
            without trust_pickle (``PickledWeights``), or in torch's legacy non-zip format.
    """

    def __init__(self, hf_dir: str, *, trust_pickle: bool = False):
        self.hf_dir = hf_dir
        self.pickled = False
        self._files: dict[str, str] = {}  # key -> file path
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._pickle_cache: dict[str, dict] = {}
        index = os.path.join(hf_dir, SAFE_INDEX)
        single = os.path.join(hf_dir, SAFE_SINGLE)
        if os.path.isfile(index) and os.path.isfile(single):
            raise ValueError(
                f"{hf_dir!r} holds both {SAFE_SINGLE} and {SAFE_INDEX} (e.g. a stale file from "
                f"another revision downloaded into the same folder): which weights are meant is "
                f"ambiguous (transformers reads {SAFE_SINGLE}); remove the stale one"
            )
        if os.path.isfile(index):
            self._index_safetensors(index)
        elif os.path.isfile(single):
            self._add_safetensors(single, None)
        elif os.path.isfile(os.path.join(hf_dir, PICKLE_INDEX)) or os.path.isfile(
            os.path.join(hf_dir, PICKLE_SINGLE)
        ):
            if not trust_pickle:
                raise PickledWeights(
                    f"{hf_dir!r} holds pickled weights (pytorch_model.bin) and no safetensors. "
                    f"Loading a pickle runs code from the file: convert it to safetensors, or pass "
                    f"trust_pickle=True (--trust-pickle) if you trust its source."
                )
            self._index_pickle()
        else:
            raise MissingHFFile(
                f"{hf_dir!r} has no weights: expected {SAFE_INDEX} with its shards, or "
                f"{SAFE_SINGLE}"
            )

    def _index_safetensors(self, index_path: str) -> None:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path!r} has no weight_map")
        by_file: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            by_file.setdefault(name, []).append(key)
        missing = [n for n in sorted(by_file) if not os.path.isfile(os.path.join(self.hf_dir, n))]
        if missing:
            raise MissingHFFile(
                f"safetensors shard(s) {missing} named by {index_path!r} are missing: download "
                f"the complete model"
            )
        for name, keys in sorted(by_file.items()):
            self._add_safetensors(os.path.join(self.hf_dir, name), keys)

    def _add_safetensors(self, path: str, keys: list[str] | None) -> None:
        header = _safetensors_header(path)
        absent = [k for k in keys or [] if k not in header]
        if absent:
            raise ValueError(
                f"safetensors shard {path!r} lacks {len(absent)} tensor(s) its index assigns to "
                f"it (e.g. {absent[0]!r})"
            )
        for key in keys if keys is not None else header:
            self._files[key] = path
            self._shapes[key] = tuple(header[key]["shape"])

    def _index_pickle(self) -> None:
        self.pickled = True
        index = os.path.join(self.hf_dir, PICKLE_INDEX)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = [PICKLE_SINGLE]
        for name in files:
            path = os.path.join(self.hf_dir, name)
            if not os.path.isfile(path):
                raise MissingHFFile(f"pickled shard {path!r} is missing")
            for key, tensor in self._pickle(path).items():
                self._files[key] = path
                self._shapes[key] = tuple(tensor.shape)

    def _pickle(self, path: str) -> dict:
        if path not in self._pickle_cache:
            if not zipfile.is_zipfile(path):  # torch.load cannot memory-map it: it would raise
                raise ValueError(
                    f"{path!r} is in torch's legacy (non-zip) pickle format, which cannot be "
                    f"memory-mapped (every process would hold the whole file): convert it to "
                    f"safetensors, or re-save it with torch.save's default (zip) format, e.g. "
                    f"torch.save(torch.load(path, weights_only=True), path)"
                )
            self._pickle_cache[path] = torch.load(
                path, map_location="cpu", mmap=True, weights_only=True
            )
        return self._pickle_cache[path]

    def keys(self) -> list[str]:
        return list(self._files)

    def shape(self, key: str) -> tuple[int, ...]:
        self._require(key)
        return self._shapes[key]

    def _require(self, key: str) -> None:
        if key not in self._files:
            raise KeyError(f"{self.hf_dir!r} has no tensor {key!r}")

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        """ValueError naming the first tensors that are missing or have another shape."""
        missing = [k for k in expected if k not in self._files]
        if missing:
            raise ValueError(
                f"{self.hf_dir!r} lacks {len(missing)} tensor(s) its config.json implies, "
                f"e.g. {missing[:3]}"
            )
        wrong = [(k, self._shapes[k], s) for k, s in expected.items() if self._shapes[k] != s]
        if wrong:
            k, got, want = wrong[0]
            raise ValueError(
                f"{self.hf_dir!r}: tensor {k!r} has shape {got}, config.json implies {want} "
                f"({len(wrong)} mismatching tensor(s))"
            )

    def read(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        """The block `index` of tensor `key` (a new tensor in the file's dtype)."""
        self._require(key)
        path = self._files[key]
        if self.pickled:
            return self._pickle(path)[key][index].clone()
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return f.get_slice(key)[index]
