"""Hugging Face checkpoints: loading and compatibility checks.

Loading never unpickles: safetensors (single or sharded with its index) first, and
``.bin`` files only through ``torch.load(weights_only=True)``. Hub ids are resolved with
``huggingface_hub.snapshot_download`` where a network exists.
"""

from __future__ import annotations

import json
import pickle
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError as SafetensorsError
from safetensors.torch import load_file

from mergesearch.errors import CheckpointError
from mergesearch.merging.architecture import NUM_LAYER_KEYS

# safetensors' dtype names (its header's "dtype" field) as torch dtypes.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes lie in a safetensors file: read on demand with `read_into`."""

    path: Path
    offset: int  # from the start of the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def read_into(self, out: torch.Tensor) -> torch.Tensor:
        """Read the tensor into ``out`` (contiguous, this dtype and size, on the CPU), by a
        plain read of its byte range: the OS page cache, not this process, holds the file."""
        if out.dtype != self.dtype or out.numel() * out.element_size() != self.nbytes:
            raise ValueError(f"read_into: {out.dtype} x {out.numel()} does not hold {self.dtype} {self.shape}")
        view = out.reshape(-1).view(torch.uint8).numpy()
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset)
            done = 0
            while done < self.nbytes:  # a read may return less than asked
                n = f.readinto(view[done:])
                if not n:
                    raise CheckpointError(f"{self.path}: truncated (tensor of {self.nbytes} bytes at {self.offset})")
                done += n
        return out


def safetensors_locations(path: Path) -> dict[str, TensorLocation]:
    """Every tensor of one safetensors file, from its header (8 bytes of length, then JSON)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e.__class__.__name__})") from None
    out = {}
    for name in sorted(header):  # the order `load_file` gives
        info = header[name]
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has dtype {info.get('dtype')!r}, not supported")
        start, stop = info["data_offsets"]
        out[name] = TensorLocation(path, 8 + length + start, stop - start, dtype, tuple(info["shape"]))
    return out


def resolve(model: str) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (safetensors preferred)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{model}: not a model folder")
        return path
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise CheckpointError(f"{model}: model folder not found")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # offline, unknown repo, ...
        raise CheckpointError(f"{model}: not a local folder and not downloadable ({e.__class__.__name__})") from None


@dataclass
class Checkpoint:
    """A model folder: its config, tensors (loaded lazily) and vocabulary."""

    name: str
    path: Path

    @classmethod
    def open(cls, model: str) -> Checkpoint:
        return cls(model, resolve(model))

    @cached_property
    def config(self) -> dict:
        f = self.path / "config.json"
        try:
            return json.loads(f.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{f}: missing (not a Hugging Face model folder)") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{f}: not valid JSON ({e})") from None

    @property
    def num_layers(self) -> int:
        cfg = self.config.get("text_config", self.config)
        for key in NUM_LAYER_KEYS:
            if key in cfg:
                return int(cfg[key])
        raise CheckpointError(f"{self.path / 'config.json'}: no layer count ({'/'.join(NUM_LAYER_KEYS)})")

    @property
    def architecture(self) -> tuple[str, tuple[str, ...]]:
        return self.config.get("model_type", "?"), tuple(self.config.get("architectures") or ())

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", True))

    def weight_files(self) -> list[Path]:
        for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                                   ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            index = self.path / index_name
            if index.exists():
                try:
                    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                except (json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(f"{index}: corrupt shard index ({e})") from None
                missing = [s for s in shards if not (self.path / s).exists()]
                if missing:
                    raise CheckpointError(f"{self.path / missing[0]}: shard listed in {index_name} is missing")
                return [self.path / s for s in shards]
            if (self.path / single).exists():
                return [self.path / single]
        raise CheckpointError(f"{self.path}: no model.safetensors or pytorch_model.bin found")

    def load_tensors(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for f in self.weight_files():
            try:
                if f.suffix == ".safetensors":
                    part = load_file(f, device=str(device))
                else:
                    part = torch.load(f, map_location=device, weights_only=True)
            except (SafetensorsError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
                raise CheckpointError(f"{f}: cannot read weights ({str(e).splitlines()[0]})") from None
            tensors.update(part)
        return tensors

    @cached_property
    def locations(self) -> dict[str, TensorLocation] | None:
        """Where each tensor lies in the folder's safetensors files, for reading one at a
        time; None for ``.bin`` checkpoints (pickled: loaded whole)."""
        files = self.weight_files()
        if any(f.suffix != ".safetensors" for f in files):
            return None
        out: dict[str, TensorLocation] = {}
        for f in files:
            out.update(safetensors_locations(f))
        return out

    @cached_property
    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes from the file headers, without reading the weights."""
        from safetensors import safe_open

        shapes: dict[str, tuple[int, ...]] = {}
        for f in self.weight_files():
            if f.suffix != ".safetensors":
                return {k: tuple(v.shape) for k, v in self.load_tensors().items()}
            try:
                with safe_open(f, framework="pt") as h:
                    for k in h.keys():
                        shapes[k] = tuple(h.get_slice(k).get_shape())
            except (SafetensorsError, OSError) as e:
                raise CheckpointError(f"{f}: corrupt safetensors file ({str(e).splitlines()[0]})") from None
        return shapes

    @cached_property
    def vocab(self) -> dict[str, int] | None:
        """The tokenizer's vocabulary, or None when the folder has no tokenizer."""
        if not any((self.path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")):
            return None
        if custom_tokenizer(self.path):
            # Its class is Python code in the folder, never run here: the vocabulary is
            # read from tokenizer.json where there is one, else it is not compared.
            f = self.path / "tokenizer.json"
            if not f.exists():
                return None
            from tokenizers import Tokenizer

            try:
                return Tokenizer.from_file(str(f)).get_vocab(with_added_tokens=True)
            except Exception as e:
                raise CheckpointError(f"{f}: cannot load tokenizer ({_first_line(e)})") from None
        from transformers import AutoTokenizer

        try:
            # Never custom code (nor transformers' interactive prompt for it).
            return AutoTokenizer.from_pretrained(self.path, trust_remote_code=False).get_vocab()
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot load tokenizer ({e.__class__.__name__}: "
                                  f"{_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    """An error's message cut to one line (the CLI prints one line per error)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


def check_custom_code(ckpt: Checkpoint, trust_remote_code: bool) -> None:
    """A model whose architecture or tokenizer transformers only knows from code in its
    folder (``auto_map`` in config.json or tokenizer_config.json, for a ``model_type`` or
    ``tokenizer_class`` transformers lacks) is refused unless the user allowed custom
    code. A known ``model_type`` is loaded with transformers' own class, and the folder's
    code never runs."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if trust_remote_code:
        return
    cfg = ckpt.config
    if cfg.get("auto_map") and cfg.get("model_type") not in CONFIG_MAPPING:
        raise CheckpointError(
            f"{ckpt.name}: its architecture ({cfg.get('model_type')!r}) is defined by Python code in the "
            "model folder (config.json auto_map); set models.trust_remote_code: true to run it")
    code = custom_tokenizer(ckpt.path)
    if code:
        raise CheckpointError(
            f"{ckpt.name}: its tokenizer ({code}) is defined by Python code in the model folder "
            "(tokenizer_config.json auto_map); set models.trust_remote_code: true to run it")


def custom_tokenizer(path: Path) -> str | None:
    """The folder's own tokenizer code (``module.Class``) that transformers would have to
    run to load its tokenizer: an ``AutoTokenizer`` entry in ``auto_map`` of
    tokenizer_config.json or config.json, for a ``tokenizer_class`` transformers lacks."""
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    entries = []
    for name in ("tokenizer_config.json", "config.json"):
        try:
            data = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        ref = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else None
        refs = [r for r in (ref if isinstance(ref, list) else [ref]) if isinstance(r, str) and r]
        if refs:
            entries.append((refs, data.get("tokenizer_class")))
    for refs, cls in entries:
        known = isinstance(cls, str) and (tokenizer_class_from_name(cls.removesuffix("Fast"))
                                          or tokenizer_class_from_name(cls.removesuffix("Fast") + "Fast"))
        if not known:
            return refs[-1]
    return None


def check_compatible(base: Checkpoint, sources: list[Checkpoint]) -> None:
    """Refuse, with the first mismatching model, tensor or file named, any source that does
    not share the base's architecture, layer count, tensor names and shapes, and vocabulary."""
    shapes = base.tensor_shapes
    for src in sources:
        if src.architecture != base.architecture:
            raise CheckpointError(
                f"{src.name}: architecture {src.architecture[0]} {list(src.architecture[1])} "
                f"differs from the base's {base.architecture[0]} {list(base.architecture[1])}"
            )
        if src.num_layers != base.num_layers:
            raise CheckpointError(f"{src.name}: {src.num_layers} layers, the base has {base.num_layers}")
        other = src.tensor_shapes
        for name, shape in shapes.items():
            if name not in other:
                raise CheckpointError(f"{src.name}: tensor {name} is missing (present in the base)")
            if other[name] != shape:
                raise CheckpointError(
                    f"{src.name}: tensor {name} has shape {list(other[name])}, the base has {list(shape)}"
                )
        extra = sorted(set(other) - set(shapes))
        if extra:
            raise CheckpointError(f"{src.name}: tensor {extra[0]} is not in the base")
        if base.vocab is not None and src.vocab is not None and src.vocab != base.vocab:
            diff = sorted(set(src.vocab.items()) ^ set(base.vocab.items()))[0][0]
            raise CheckpointError(f"{src.name}: tokenizer vocabulary differs from the base's (token {diff!r})")
