"""Streaming checkpoint conversion: HF <-> Megatron-core shard files without holding the model.

`python -m harness convert --to mcore --tp T --pp P IN_DIR OUT_DIR` writes
OUT_DIR/pp{p}_tp{t}.safetensors (megatron local-spec names, exactly what
dist.shard produces and safetensors.save_file writes) plus harness_layout.json;
`--to hf` reads them back into config.json + model.safetensors.

Two passes, so peak memory stays near the largest tensor instead of the model:
  1. plan: the same template conversion and dist sharding run on meta tensors
     (shapes and dtypes from the safetensors headers), which gives every output
     file's tensors; each file gets its header and its full size up front;
  2. stream: real tensors are read one at a time (each mapped from the file on
     its own and unmapped when dropped; mapping the whole file would count all
     of it as resident once read), fed to the template's Converter, sharded with
     the dist rules, and each piece is written at its planned offset.
Output files are laid out exactly as safetensors.save_file lays them out (same
tensor order, header and padding), so they are byte-identical to it.

Bad input is a ConvertError: one line naming the file; the CLI prints it and
exits 2. Everything is written into a temporary folder beside OUT_DIR and moved
in at the end, so an error leaves OUT_DIR as it was.

Planning runs cat/stack of meta tensors through MetaPlanning: torch's meta kernels
for them import torch._dynamo on first use (seconds); and config.json is read
directly when it holds every key the template maps (transformers' config classes
take seconds to import), falling back to AutoConfig for its defaults otherwise.
"""
from __future__ import annotations

import errno
import functools
import importlib
import json
import math
import mmap
import os
import shutil
import struct
import sys
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

from . import dist
from .layer_spec import TE_TO_LOCAL
from .mca_config import McaConfigView

LAYOUT_FILE = "harness_layout.json"
LAYOUT_FORMAT = "harness-mcore-layout/1"
HF_WEIGHTS = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "C64": "complex64",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "U64": "uint64", "U32": "uint32", "U16": "uint16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
}
TORCH_DTYPES = {k: getattr(torch, v) for k, v in _DTYPE_NAMES.items() if hasattr(torch, v)}
SAFETENSORS_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}
# The order in which safetensors' serializer lays tensors out: by dtype like this, then by name.
SAVE_ORDER = ["U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
              "F8_E5M2FNUZ", "F8_E4M3FNUZ", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"]
_IO_CHUNK = 1 << 30  # bytes per read/write syscall


class ConvertError(Exception):
    """Unusable input: one line, naming the file."""

    def __init__(self, path: str | Path, message: str):
        self.path = str(path)
        self.message = " ".join(str(message).split())
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return f"{self.path}: {self.message}"


# ---------------------------------------------------------------- planning on meta tensors
class MetaPlanning(TorchFunctionMode):
    """cat and stack of meta tensors, computed here.

    torch's meta kernels for them are Python functions whose first call imports torch._dynamo,
    seconds that a conversion would pay for nothing. Anything unusual (an out= tensor, mismatched
    shapes, non-meta inputs) falls through to torch, which then does or explains it as usual.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.cat, torch.concat, torch.concatenate, torch.stack):
            planned = _meta_join(func is torch.stack, args, kwargs)
            if planned is not None:
                return planned
        return func(*args, **kwargs)


def _meta_join(stack: bool, args, kwargs) -> torch.Tensor | None:
    if "out" in kwargs or len(args) > 2 or set(kwargs) - {"tensors", "dim", "axis"}:
        return None
    tensors = args[0] if args else kwargs.get("tensors")
    dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
    if not isinstance(tensors, (list, tuple)) or not tensors or not isinstance(dim, int):
        return None
    if not all(isinstance(t, torch.Tensor) and t.is_meta for t in tensors):
        return None
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
    if stack:
        shape = tuple(tensors[0].shape)
        if any(tuple(t.shape) != shape for t in tensors) or not -len(shape) - 1 <= dim <= len(shape):
            return None
        d = dim % (len(shape) + 1)
        return torch.empty(shape[:d] + (len(tensors),) + shape[d:], dtype=dtype, device="meta")
    kept = [t for t in tensors if tuple(t.shape) != (0,)]  # torch skips legacy empty 1-D tensors
    if not kept:
        return torch.empty((0,), dtype=dtype, device="meta")
    shape = list(kept[0].shape)
    if not shape or not -len(shape) <= dim < len(shape):
        return None
    d = dim % len(shape)
    for t in kept[1:]:
        other = list(t.shape)
        if len(other) != len(shape) or other[:d] + other[d + 1:] != shape[:d] + shape[d + 1:]:
            return None
    shape[d] = sum(t.shape[d] for t in kept)
    return torch.empty(shape, dtype=dtype, device="meta")


# ---------------------------------------------------------------- safetensors files
@dataclass
class Entry:
    name: str
    dtype: str  # safetensors dtype string ("BF16")
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    def meta(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.torch_dtype, device="meta")


@dataclass
class SafetensorsFile:
    path: Path
    entries: list[Entry]  # in file (offset) order
    metadata: dict[str, str] | None

    @classmethod
    def open(cls, path: Path) -> "SafetensorsFile":
        """Validates the file with safetensors itself (header only, cheap), then reads the header."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...
            raise ConvertError(path, f"not a valid safetensors file: {exc}") from None
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        metadata = header.pop("__metadata__", None)
        entries = []
        for name, info in header.items():
            if info["dtype"] not in TORCH_DTYPES:
                raise ConvertError(path, f"{name}: dtype {info['dtype']} is not supported by this torch")
            begin, end = info["data_offsets"]
            entries.append(Entry(name, info["dtype"], tuple(info["shape"]), 8 + size + begin, 8 + size + end))
        entries.sort(key=lambda e: (e.start, e.end))
        return cls(path, entries, metadata)


def read_tensor(fd: int, entry: Entry) -> tuple[torch.Tensor, bool]:
    """One tensor, and whether it is mapped from the file (copy-on-write; unmapped when freed).

    Only this tensor's pages are mapped, so resident memory stays at the tensors alive, and
    nothing is copied that the conversion does not copy itself. A tensor whose bytes are not
    aligned for its dtype, or a file that cannot be mapped, is read into its own memory.
    """
    nbytes = entry.end - entry.start
    dtype = entry.torch_dtype
    size = torch.empty((), dtype=dtype).element_size()
    if nbytes and entry.start % size == 0:
        base = entry.start - entry.start % mmap.ALLOCATIONGRANULARITY
        try:
            mapped = mmap.mmap(fd, entry.end - base, access=mmap.ACCESS_COPY, offset=base)
        except (OSError, ValueError):
            mapped = None
        if mapped is not None:
            flat = torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=entry.start - base)
            return flat.view(dtype).reshape(entry.shape), True  # keeps `mapped` alive until the tensor dies
    tensor = torch.empty(entry.shape, dtype=dtype)
    buf = _byte_view(tensor)
    done = 0
    while done < nbytes:
        n = os.preadv(fd, [buf[done:done + _IO_CHUNK]], entry.start + done)
        if n <= 0:
            raise OSError(f"unexpected end of file reading {entry.name}")
        done += n
    return tensor, False


class SourceReader:
    """Reads input tensors and remembers which still are the file's bytes, untouched.

    A piece to write that is a contiguous view of such a tensor (a renamed tensor, a pipeline
    stage's share of a tp=1 checkpoint) is then copied file to file by the kernel
    (copy_file_range) instead of through memory. Views share their base's version counter,
    so any in-place change to the tensor disqualifies it.
    """

    def __init__(self, paths):
        self.fds = {path: os.open(path, os.O_RDONLY) for path in paths}
        self._mapped: dict[int, tuple] = {}  # id(tensor) -> (weakref, first byte, end, fd, offset, version)

    def read(self, path, entry: Entry) -> torch.Tensor:
        fd = self.fds[path]
        tensor, mapped = read_tensor(fd, entry)
        if mapped:
            ptr = tensor.data_ptr()
            self._mapped[id(tensor)] = (weakref.ref(tensor), ptr, ptr + entry.end - entry.start, fd, entry.start,
                                        tensor._version)
        return tensor

    def origin(self, piece: torch.Tensor) -> tuple[int, int] | None:
        """(fd, file offset) holding exactly this piece's bytes, if any."""
        if not piece.is_contiguous() or piece.numel() == 0:
            return None
        ptr = piece.data_ptr()
        end = ptr + piece.numel() * piece.element_size()
        for key, (ref, first, last, fd, offset, version) in list(self._mapped.items()):
            base = ref()
            if base is None:
                del self._mapped[key]
            elif first <= ptr and end <= last and base._version == version == piece._version:
                return fd, offset + (ptr - first)
        return None

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}
        self._mapped.clear()


def _byte_view(tensor: torch.Tensor) -> memoryview:
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(bytearray())
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def header_bytes(entries: dict[str, tuple[str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """safetensors header for {name: (dtype, shape)} laid out as save_file does; offsets relative to the data."""
    order = sorted(entries, key=lambda n: (SAVE_ORDER.index(entries[n][0]), n))
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offsets, pos = {}, 0
    for name in order:
        dtype, shape = entries[name]
        nbytes = math.prod(shape) * torch.empty((), dtype=TORCH_DTYPES[dtype]).element_size()
        offsets[name] = (pos, pos + nbytes)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets


class StreamWriter:
    """A safetensors file whose header and size are fixed up front; tensors arrive in any order."""

    def __init__(self, path: Path, entries: dict[str, tuple[str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, label: str | Path | None = None):
        self.path = path
        self.label = label or path  # the name errors give (the final one, not the temporary file's)
        self.entries = entries
        head, offsets = header_bytes(entries, metadata)
        self.offsets = {name: (len(head) + a, len(head) + b) for name, (a, b) in offsets.items()}
        self.missing = set(entries)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        total = len(head) + sum(b - a for a, b in offsets.values())
        try:  # reserve the blocks now: a full disk fails here, and the writes are faster
            os.posix_fallocate(self.fd, 0, total)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            os.ftruncate(self.fd, total)
        self._pwrite(memoryview(head), 0)

    def write(self, name: str, tensor: torch.Tensor, origin: tuple[int, int] | None = None) -> None:
        """Writes the tensor's bytes; `origin` (fd, offset) says a file already holds exactly those bytes."""
        if name not in self.entries:
            raise ConvertError(self.label, f"{name} was not planned for this file")
        if name not in self.missing:
            raise ConvertError(self.label, f"{name} written twice")
        dtype, shape = self.entries[name]
        if SAFETENSORS_DTYPES.get(tensor.dtype) != dtype or tuple(tensor.shape) != tuple(shape):
            raise ConvertError(self.label, f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, "
                                          f"planned {dtype} {tuple(shape)}")
        start, end = self.offsets[name]
        if not (origin and self._copy(origin, start, end - start)):
            self._pwrite(_byte_view(tensor.contiguous()), start)
        self.missing.discard(name)

    _copy_works = hasattr(os, "copy_file_range")

    def _copy(self, origin: tuple[int, int], offset: int, nbytes: int) -> bool:
        fd, src = origin
        done = 0
        try:
            while done < nbytes and StreamWriter._copy_works:
                n = os.copy_file_range(fd, self.fd, min(nbytes - done, _IO_CHUNK), src + done, offset + done)
                if n <= 0:
                    return False
                done += n
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                raise
            StreamWriter._copy_works = False  # not on this kernel or file system: write from memory
        return done == nbytes

    def _pwrite(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            done += os.pwrite(self.fd, buf[done:done + _IO_CHUNK], offset + done)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---------------------------------------------------------------- inputs
def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConvertError(path, f"missing ({what})")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(path, f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConvertError(path, "not a JSON object")
    return data


def hf_tensor_names(in_dir: str | Path) -> list[str]:
    """Every tensor name of a checkpoint (its index's shards, else every *.safetensors), read from the headers."""
    return sorted(e.name for f in hf_weight_files(Path(in_dir)) for e in f.entries)


def hf_weight_files(in_dir: Path) -> list[SafetensorsFile]:
    """The checkpoint's safetensors files: the index's when there is one, else every *.safetensors."""
    index = in_dir / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConvertError(index, "has no weight_map")
        names = sorted(set(weight_map.values()))
        for name in names:
            if not (in_dir / name).is_file():
                raise ConvertError(index, f"weight_map names shard {name}, which is missing ({in_dir / name})")
        paths = [in_dir / n for n in names]
    else:
        paths = sorted(in_dir.glob("*.safetensors"))
    if not paths:
        raise ConvertError(in_dir, "no *.safetensors weights")
    files = [SafetensorsFile.open(p) for p in paths]
    seen: dict[str, Path] = {}
    for f in files:
        for e in f.entries:
            if e.name in seen:
                raise ConvertError(f.path, f"{e.name} is also in {seen[e.name]}")
            seen[e.name] = f.path
    if index.is_file():
        for tensor, name in sorted(weight_map.items()):
            if seen.get(tensor) != in_dir / name:
                raise ConvertError(index, f"weight_map puts {tensor} in {name}, which does not hold it")
    return files


def import_plugins(entries: list[str]) -> None:
    """--plugin FILE_OR_MODULE: imported with the spec plugins' logic (a file plugin outside any spec)."""
    if not entries:
        return
    from ..errors import SpecError
    from ..spec_plugins import import_plugin

    for index, entry in enumerate(entries):
        shim = SimpleNamespace(source=entry, resolve_relative=lambda e: Path(e).expanduser().resolve())
        try:
            import_plugin(shim, index, entry)
        except SpecError as exc:
            raise ConvertError(entry, exc.message) from None


def resolve_template(name: Any, where: Path):
    """A registered template; a built-in one (harness.templates.<name>) is imported on demand."""
    from .template import templates

    if not isinstance(name, str) or not name:
        raise ConvertError(where, "no model_type to pick a converter template from (pass --template)")
    if name not in templates and name.isidentifier():
        module = f"harness.templates.{name}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise ConvertError(where, f"template module {module} raised ModuleNotFoundError: {exc}") from None
        except Exception as exc:  # noqa: BLE001
            raise ConvertError(where, f"template module {module} raised {type(exc).__name__}: {exc}") from None
    if name not in templates:
        known = ", ".join(sorted(templates)) or "none"
        raise ConvertError(where, f"no converter template {name!r} registered (known: {known}); "
                                  f"register one with register_template in a --plugin")
    return templates[name]


def hf_config_for(config_dir: Path, raw: dict[str, Any], template):
    """The HF config the template reads.

    config.json itself when it has a value for every key the template maps (what a transformers
    save_pretrained writes); otherwise transformers' config class, whose defaults fill the gaps
    exactly as the Megatron backend sees them. Importing transformers' config classes costs
    seconds, which a conversion that needs nothing from it should not pay.
    """
    kwargs, absent = template.mca_config_kwargs(raw)
    if not absent and all(kwargs.get(template.config_hf_to_mca[k]) is not None for k in template.config_hf_to_mca):
        return raw
    try:
        from transformers import AutoConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:
        return raw
    if raw.get("model_type") not in CONFIG_MAPPING:
        return raw
    try:
        return AutoConfig.from_pretrained(str(config_dir))
    except Exception as exc:  # noqa: BLE001
        raise ConvertError(config_dir / "config.json", f"transformers cannot read it: {type(exc).__name__}: {exc}") from None


def check_parallel(view: McaConfigView, tp: int, pp: int, where: Path, ep: int = 1) -> int:
    if tp < 1 or pp < 1 or ep < 1:
        raise ConvertError(where, f"--tp {tp}, --pp {pp} and --ep {ep} must be at least 1")
    experts = view.get("num_moe_experts")
    if ep > 1 and (not isinstance(experts, int) or experts % ep):
        raise ConvertError(where, f"num_moe_experts {experts} is not divisible by --ep {ep}")
    num_layers = view.get("num_layers")
    if not isinstance(num_layers, int):
        raise ConvertError(where, f"the template gives no integer num_layers ({num_layers!r})")
    if num_layers % pp:
        raise ConvertError(where, f"{num_layers} layers are not divisible by --pp {pp}")
    for key in ("num_attention_heads", "num_query_groups"):
        value = view.get(key)
        if isinstance(value, int) and value % tp:
            raise ConvertError(where, f"{key} {value} is not divisible by --tp {tp}")
    return num_layers


# ---------------------------------------------------------------- output folder
class OutputDir:
    """Files go into a temporary folder beside OUT_DIR and are moved in only when all are complete."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        if out_dir.exists() and not out_dir.is_dir():
            raise ConvertError(out_dir, "exists and is not a directory")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.converting-", dir=out_dir.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)

    def path(self, name: str) -> Path:
        return self.tmp / name

    def commit(self) -> None:
        if not self.out_dir.exists():
            try:
                os.rename(self.tmp, self.out_dir)
                return
            except OSError:
                if not self.out_dir.is_dir():
                    raise
        for item in sorted(self.tmp.iterdir()):
            os.replace(item, self.out_dir / item.name)
        self.tmp.rmdir()

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- HF -> Megatron-core
def _shard_one(name: str, tensor: torch.Tensor, layout: dist.Layout) -> Iterator[tuple[tuple[int, int, int], str, torch.Tensor]]:
    """dist.shard of a single tensor: ((pp, tp, ep), local name, piece) for every file it lands in."""
    for key, part in dist.shard({name: tensor}, layout).items():
        for local, piece in part.items():
            yield key, local, piece


def _te_suffixes(names) -> dict[str, str]:
    """local-spec suffix -> the template's (TE-style) suffix, for the names the template produced that way."""
    out = {}
    for name in names:
        for te_suffix, local_suffix in TE_TO_LOCAL.items():
            if name.endswith(te_suffix):
                out[local_suffix] = te_suffix
    return out


def _first_problem(report, locate: dict[str, Path], fallback: Path) -> ConvertError:
    problems = report.problems()
    first = problems[0]
    tensor = first.split(":", 1)[0]
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return ConvertError(locate.get(tensor, fallback), f"{first}{more}")


def _write_shards(outputs: dict[str, torch.Tensor], layout: dist.Layout,
                  writers: dict[tuple[int, int, int], StreamWriter], reader: SourceReader) -> None:
    """Shards converted tensors and writes every piece (a function, so that nothing outlives the call)."""
    for mca_name, tensor in outputs.items():
        for key, local, piece in _shard_one(mca_name, tensor, layout):
            writers[key].write(local, piece, reader.origin(piece))


def hf_to_shard_files(in_dir: Path, template, view: McaConfigView, tp: int, pp: int, out_dir: Path, ep: int = 1):
    """The Megatron backend's conversion: an HF checkpoint (its index's shards, else every *.safetensors)
    to out_dir/{dist.rank_tag}.safetensors for every (pp, tp, ep), tensor by tensor as to_mcore streams
    (the same files dist.shard + save_file give), sharded as the template's dist config declares. Unlike to_mcore it does not stop at conversion problems: the checks
    judge them from the report. Returns (planned Megatron tensors by name, on meta: names, shapes and
    dtypes only; the report; the layout). Bad input is a ConvertError."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    files = hf_weight_files(in_dir)
    converter = template.converter(view, to_mca=True)
    planned: dict[str, torch.Tensor] = {}
    try:
        with MetaPlanning():  # pass 1: what every shard file holds
            for f in files:
                for e in f.entries:
                    planned.update(converter.add(e.name, e.meta()))
    except Exception:  # noqa: BLE001 - a user's op that cannot run on meta tensors: plan on real ones, streamed
        converter, planned = template.converter(view, to_mca=True), {}
        reader = SourceReader([f.path for f in files])
        try:
            for f in files:
                for e in f.entries:
                    for mca_name, tensor in converter.add(e.name, reader.read(f.path, e)).items():
                        planned[mca_name] = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        finally:
            reader.close()
    layout = dist.layout_for(view, converter.finish(), tp, pp, ep, template.dist_config)
    outputs: dict[tuple[int, int, int], dict[str, tuple[str, tuple[int, ...]]]] = {key: {} for key in layout.keys()}
    try:
        with MetaPlanning():
            for mca_name, meta in planned.items():
                for key, local, piece in _shard_one(mca_name, meta, layout):
                    outputs[key][local] = (SAFETENSORS_DTYPES[piece.dtype], tuple(piece.shape))
    except ValueError as exc:  # an undeclared tensor, a size that does not split: named, one line
        raise ConvertError(in_dir, f"cannot shard for tp {tp} pp {pp} ep {ep}: {exc}") from None
    writers = {key: StreamWriter(out_dir / f"{layout.tag(key)}.safetensors", entries)
               for key, entries in outputs.items()}
    converter = template.converter(view, to_mca=True)
    reader = SourceReader([f.path for f in files])
    try:  # pass 2: real tensors, one at a time; a piece is written and dropped
        for f in files:
            for e in f.entries:
                for mca_name, tensor in converter.add(e.name, reader.read(f.path, e)).items():
                    for key, local, piece in _shard_one(mca_name, tensor, layout):
                        if local in writers[key].missing:  # a duplicate output is a reported problem already
                            writers[key].write(local, piece, reader.origin(piece))
    finally:
        reader.close()
        for writer in writers.values():
            writer.close()
    return planned, converter.finish(), layout


def to_mcore(in_dir: Path, out_dir: Path, tp: int = 1, pp: int = 1, template_name: str | None = None,
             plugins: list[str] = (), ep: int = 1) -> Path:
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise ConvertError(in_dir, "not a directory")
    config_path = in_dir / "config.json"
    raw_config = read_json(config_path, "HF config")
    import_plugins(list(plugins))
    name = template_name or raw_config.get("model_type")
    template = resolve_template(name, config_path)
    hf_config = hf_config_for(in_dir, raw_config, template)
    view = template.mca_config(hf_config)
    num_layers = check_parallel(view, tp, pp, config_path, ep)
    files = hf_weight_files(in_dir)
    locate = {e.name: f.path for f in files for e in f.entries}

    # pass 1: plan on meta tensors
    converter = template.converter(view, to_mca=True)
    planned: dict[str, torch.Tensor] = {}
    with MetaPlanning():
        for f in files:
            for e in f.entries:
                try:
                    planned.update(converter.add(e.name, e.meta()))
                except Exception as exc:  # noqa: BLE001 - an op that cannot take this tensor
                    raise ConvertError(f.path, f"{e.name}: {type(exc).__name__}: {exc}") from None
    report = converter.finish()
    if report.problems():
        raise _first_problem(report, locate, config_path)
    tied = bool(view.get("tie_embeddings_and_output_weights"))
    layout = dist.layout_for(view, report, tp, pp, ep, template.dist_config)
    outputs: dict[tuple[int, int, int], dict[str, tuple[str, tuple[int, ...]]]] = {key: {} for key in layout.keys()}
    for mca_name, meta in planned.items():
        try:
            with MetaPlanning():
                pieces = list(_shard_one(mca_name, meta, layout))
        except ValueError as exc:
            raise ConvertError(config_path, f"cannot shard for --tp {tp} --pp {pp} --ep {ep}: {exc}") from None
        for key, local, piece in pieces:
            if local in outputs[key]:
                raise ConvertError(locate.get(mca_name, config_path),
                                   f"two tensors land on {local} in {layout.tag(key)}")
            outputs[key][local] = (SAFETENSORS_DTYPES[piece.dtype], tuple(piece.shape))
    suffixes = _te_suffixes(planned)
    del planned

    # pass 2: stream real tensors
    out = OutputDir(out_dir)
    writers: dict[tuple[int, int, int], StreamWriter] = {}
    try:
        for key, entries in outputs.items():
            file_name = f"{layout.tag(key)}.safetensors"
            writers[key] = StreamWriter(out.path(file_name), entries, label=out_dir / file_name)
        converter = template.converter(view, to_mca=True)
        reader = SourceReader([f.path for f in files])
        try:
            for f in files:
                for e in f.entries:
                    _write_shards(converter.add(e.name, reader.read(f.path, e)), layout, writers, reader)
        finally:
            reader.close()
        converter.finish()
        for writer in writers.values():
            writer.close()
            if writer.missing:
                raise ConvertError(writer.label, f"never written: {', '.join(sorted(writer.missing))}")
        _write_json(out.path(LAYOUT_FILE), {
            "format": LAYOUT_FORMAT,
            "tp": tp, "pp": pp, "ep": ep, "etp": layout.etp, "num_experts": layout.num_experts,
            "num_layers": num_layers, "tied": tied,
            "stacked": layout.stacked,
            "template": name,
            "plugins": [str(Path(p).resolve()) if p.endswith(".py") or "/" in p else p for p in plugins],
            "mca_name_suffixes": suffixes,
            "files": sorted(f"{layout.tag(key)}.safetensors" for key in outputs),
            "hf_metadata": files[0].metadata,
            "hf_config": raw_config,
        })
        out.commit()
    except BaseException:
        for writer in writers.values():
            writer.close()
        out.discard()
        raise
    return out_dir



# ---------------------------------------------------------------- Megatron-core -> HF
def _gather_one(stage: int, local: str, pieces: dict[tuple[int, int], torch.Tensor],
                layout: dist.Layout) -> dict[str, torch.Tensor]:
    """dist.gather of one local tensor from its (tp, ep) pieces: {whole name: tensor} (an expert's local name gives
    one global expert per EP rank), or {} for Megatron's copy of a tied embedding.

    dist.gather skips comparing meta (planning) copies of a duplicated tensor; a single name cannot hold every
    expert, so the complete-experts check is left to the whole file set (every rank file exists, same names).
    """
    shards = {key: ({local: pieces[key[1:]]} if key[0] == stage else {}) for key in layout.keys()}
    return dist.gather(shards, layout, complete_experts=False)


def _layout_from(info: dict[str, Any], path: Path) -> dist.Layout:
    for key, kind in (("tp", int), ("pp", int), ("num_layers", int), ("tied", bool), ("stacked", dict),
                      ("hf_config", dict)):
        if not isinstance(info.get(key), kind):
            raise ConvertError(path, f"{key} is missing or not a {kind.__name__}")
    ep, experts = info.get("ep", 1), info.get("num_experts")  # absent: written before expert parallelism
    if not isinstance(ep, int) or (experts is not None and not isinstance(experts, int)):
        raise ConvertError(path, f"ep {ep!r} and num_experts {experts!r} must be integers")
    if info["tp"] < 1 or info["pp"] < 1 or ep < 1:
        raise ConvertError(path, f"tp {info['tp']}, pp {info['pp']} and ep {ep} must be at least 1")
    try:
        layout = dist.Layout(info["tp"], info["pp"], info["num_layers"], info["tied"], dict(info["stacked"]), ep,
                             experts)
    except ValueError as exc:
        raise ConvertError(path, str(exc)) from None
    written = info.get("etp", 1)  # absent: written when experts were never TP-split
    if experts and written != layout.etp:
        raise ConvertError(path, f"etp {written!r}: its experts are split over {written} TP ranks, this harness "
                                 f"splits them over {layout.etp} at tp {layout.tp} ep {ep} (convert it again)")
    return layout


def to_hf(in_dir: Path, out_dir: Path, template_name: str | None = None, plugins: list[str] = (),
          tp: int | None = None, pp: int | None = None) -> Path:
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise ConvertError(in_dir, "not a directory")
    layout_path = in_dir / LAYOUT_FILE
    info = read_json(layout_path, "written by `python -m harness convert --to mcore`")
    layout = _layout_from(info, layout_path)
    for flag, given, actual in (("--tp", tp, layout.tp), ("--pp", pp, layout.pp)):
        if given is not None and given != actual:
            raise ConvertError(layout_path, f"{flag} {given} does not match the checkpoint's {actual}")
    raw_config = info["hf_config"]
    import_plugins(list(plugins))
    try:
        template = resolve_template(template_name or info.get("template") or raw_config.get("model_type"), layout_path)
    except ConvertError as exc:
        hint = f" (it was converted with --plugin {' --plugin '.join(info['plugins'])})" if info.get("plugins") else ""
        raise ConvertError(exc.path, exc.message + hint) from None
    layout.dist_config = template.dist_config
    files: dict[tuple[int, int, int], SafetensorsFile] = {}
    for key in layout.keys():
        path = in_dir / f"{layout.tag(key)}.safetensors"
        if not path.is_file():
            ep = f" ep={layout.ep}" if layout.ep > 1 else ""
            raise ConvertError(path, f"missing ({LAYOUT_FILE} says tp={layout.tp} pp={layout.pp}{ep})")
        files[key] = SafetensorsFile.open(path)
    by_name = {key: {e.name: e for e in f.entries} for key, f in files.items()}
    for key, names in by_name.items():
        extra = set(names) ^ set(by_name[(key[0], 0, 0)])
        if extra:  # each EP rank holds its experts under the same local ids
            raise ConvertError(files[key].path, f"holds a different set of tensors than "
                                                f"{layout.tag((key[0], 0, 0))} (e.g. {sorted(extra)[0]})")
    ranks = [key[1:] for key in layout.keys() if key[0] == 0]  # (tp, ep) of a stage's files
    suffixes = info.get("mca_name_suffixes") or {}

    def template_name_of(name: str) -> str:
        for local_suffix, te_suffix in suffixes.items():
            if name.endswith(local_suffix):
                return name[: -len(local_suffix)] + te_suffix
        return name

    out = OutputDir(out_dir)
    writer = None
    try:
        _write_json(out.path("config.json"), raw_config)
        view = template.mca_config(hf_config_for(out.tmp, raw_config, template))

        # pass 1: plan on meta tensors
        converter = template.converter(view, to_mca=False)
        planned: dict[str, torch.Tensor] = {}
        locate: dict[str, Path] = {}
        for p in range(layout.pp):
            for e in files[(p, 0, 0)].entries:
                pieces = {r: by_name[(p, *r)][e.name].meta() for r in ranks}
                try:
                    with MetaPlanning():
                        whole = _gather_one(p, e.name, pieces, layout)
                        for name, tensor in whole.items():
                            locate[template_name_of(name)] = files[(p, 0, 0)].path
                            planned.update(converter.add(template_name_of(name), tensor))
                except Exception as exc:  # noqa: BLE001
                    raise ConvertError(files[(p, 0, 0)].path, f"{e.name}: {type(exc).__name__}: {exc}") from None
        report = converter.finish()
        if report.problems():
            raise _first_problem(report, locate, layout_path)
        entries = {name: (SAFETENSORS_DTYPES[t.dtype], tuple(t.shape)) for name, t in planned.items()}
        del planned

        # pass 2: stream real tensors
        writer = StreamWriter(out.path(HF_WEIGHTS), entries, info.get("hf_metadata"), label=out_dir / HF_WEIGHTS)
        converter = template.converter(view, to_mca=False)
        reader = SourceReader([f.path for f in files.values()])
        try:
            for p in range(layout.pp):
                for e in files[(p, 0, 0)].entries:
                    pieces = {r: reader.read(files[(p, *r)].path, by_name[(p, *r)][e.name]) for r in ranks}
                    try:
                        whole = _gather_one(p, e.name, pieces, layout)
                    except ValueError as exc:
                        raise ConvertError(files[(p, 0, 0)].path, str(exc)) from None
                    del pieces
                    for name, tensor in whole.items():
                        for hf_name, hf_tensor in converter.add(template_name_of(name), tensor).items():
                            writer.write(hf_name, hf_tensor, reader.origin(hf_tensor))
                        del tensor
                    del whole
        finally:
            reader.close()
        converter.finish()
        writer.close()
        if writer.missing:
            raise ConvertError(writer.label, f"never written: {', '.join(sorted(writer.missing))}")
        out.commit()
    except BaseException:
        if writer is not None:
            writer.close()
        out.discard()
        raise
    return out_dir


# ---------------------------------------------------------------- command line
def run(args) -> int:
    try:
        if args.to == "mcore":
            tp = 1 if args.tp is None else args.tp
            pp = 1 if args.pp is None else args.pp
            ep = getattr(args, "ep", None) or 1
            to_mcore(args.in_dir, args.out_dir, tp, pp, args.template, args.plugin, ep)
            print(f"wrote {args.out_dir} (tp={tp}, pp={pp}" + (f", ep={ep})" if ep > 1 else ")"))
        else:
            to_hf(args.in_dir, args.out_dir, args.template, args.plugin, args.tp, args.pp)
            print(f"wrote {args.out_dir}")
    except ConvertError as exc:
        print(exc.one_line(), file=sys.stderr)
        return 2
    except OSError as exc:  # unreadable input, full disk, no permission
        where = exc.filename or args.out_dir
        print(f"{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0
