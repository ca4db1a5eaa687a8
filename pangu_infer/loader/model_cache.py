"""A per-file cache of a converted GGUF model: the next start maps it instead of converting.

Converting a GGUF file (Q4 blocks -> int4 codes, re-laid out for the CPU int4 kernel; Q8_0 ->
int8 rows) costs seconds on every start, far more than reading the result. After the first load
the model's tensors, exactly as the engine holds them, go to one safetensors file in
`$XDG_CACHE_HOME/pangu-infer/models/` (`~/.cache/...`); the next start with the same key builds
the model on the meta device, swaps in the same module classes and maps the file's tensors
(read-only pages, shared with the page cache; nothing is converted or copied).

Key: the GGUF file's real path, size and mtime; a hash of this package's source (any code change
invalidates every cache); torch's version; the CPU model and thread count; the dtype, device and
quantization asked for; and the `PANGU_INFER_*` settings. The per-machine kernel choices
(pangu_infer.machine: kernels.json), which decide how weights are laid out, are not in the key:
the file keeps the choices its process had made when it was written, and is used only while the
tuning file still holds those values (a choice measured again with another answer, or the tuning
file deleted, converts again). A measurement added for other shapes, by another model or another
process, leaves it valid.

Safety:
- written to a temporary file and renamed into place: a reader never sees a partial file; the
  temporary file of a process killed mid-write is removed by a later write;
- checked before it is kept: the file is loaded back at once and must reproduce every module
  class, plain attribute, tensor (bitwise, with its strides) and shared tensor of the model that
  was just converted; a model that does not round-trip is not cached;
- a model above BACKGROUND_BYTES is snapshotted at load (its module tree and tensor references)
  and written and checked in a thread after the load returns; a load of the same file in this
  process waits for it, and the process waits for it at exit, saying so (Ctrl-C: nothing kept);
- written with O_DIRECT from one aligned buffer, and checked by reading it the same way, where
  the file system allows: the page cache's write path cost 2.8 s of CPU per GB on the VMs of
  benchmarks/RESULTS.md (a 7B's first load: 35 s, 20 of them writing and checking the file);
- a file that cannot be read back (truncated, another key, bad header) is ignored with one
  warning line, and the normal load rewrites it;
- files written for another version of the same GGUF path (another size or mtime, engine source
  or torch) are removed when a new one is written; the caches of one version under other settings
  (threads, dtype) stay;
- `PANGU_INFER_MODEL_CACHE=0` (or the CLI's `--no-model-cache`) turns the cache off;
  `PANGU_INFER_MODEL_CACHE_DIR` names another folder.

The file is plain safetensors (any safetensors reader opens it): one `__metadata__` entry holds
the key and the module tree, the `__extras__.json` tensor the config and tokenizer spec; every tensor starts on 64 bytes (the int8 CPU kernel reads its weight
with aligned loads), the gaps filled by small `__pad__.N` tensors.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy
import torch
from torch import nn

from pangu_infer.machine import cache_root, changed_choices, choices_made, engine_settings, source_hash

FORMAT = "pangu-infer-model-cache/2"
EXTRAS = "__extras__.json"  # the U8 tensor holding the extras (config, tokenizer spec) as JSON
ALIGN = 64
ENV_OFF = "PANGU_INFER_MODEL_CACHE"
ENV_DIR = "PANGU_INFER_MODEL_CACHE_DIR"
# Keep at least this much disk free after writing a cache file.
DISK_MARGIN = 1 << 30

_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_BY_NAME = {v: k for k, v in _DTYPES.items()}
# nn.Module's own bookkeeping: never part of a module's recorded attributes.
_MODULE_INTERNALS = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "training"}


class StaleChoices(Exception):
    """A cache file whose kernel choices are no longer this machine's: a miss, not a bad file."""


class CacheError(ValueError):
    """A cache file that cannot be used (the caller warns and loads normally)."""


def enabled() -> bool:
    return os.environ.get(ENV_OFF, "1").strip().lower() not in ("0", "off", "false", "no")


def cache_dir() -> Path:
    chosen = os.environ.get(ENV_DIR)
    if chosen:
        return Path(chosen)
    return cache_root() / "models"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_key(path: str, dtype: torch.dtype, device: torch.device, quantization: Any) -> dict:
    st = os.stat(path)
    return {
        "format": FORMAT,
        "file": os.path.realpath(path),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "source": source_hash(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
        "dtype": str(dtype),
        "device": str(device),
        "quantization": repr(quantization),
        "settings": engine_settings(ENV_OFF, ENV_DIR),
    }


def cache_file(key: dict) -> Path:
    """<file stem>-<hash of its path>-<version>-<hash of the whole key>.safetensors, the version a
    hash of the file's size and mtime, this engine's source and torch's version: the caches of one
    version under several settings (threads, dtype) live side by side, and a new version (the file
    changed, the engine or torch was upgraded) replaces them all."""
    stem = Path(key["file"]).stem[:60]
    where = hashlib.blake2b(key["file"].encode(), digest_size=4).hexdigest()
    version = f"{key['size']}:{key['mtime_ns']}:{key['source']}:{key['torch']}"
    version = hashlib.blake2b(version.encode(), digest_size=4).hexdigest()
    what = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=8).hexdigest()
    return cache_dir() / f"{stem}-{where}-{version}-{what}.safetensors"


def _stale(target: Path) -> list[Path]:
    """Cache files of other versions of the same GGUF path (the file, the engine or torch changed)."""
    stem, where, version, _ = target.name.rsplit("-", 3)
    return [
        old
        for old in target.parent.glob(f"{glob_escape(stem)}-{where}-*.safetensors")
        if old.name.rsplit("-", 3)[2] != version
    ]


def glob_escape(text: str) -> str:
    import glob

    return glob.escape(text)


def warn(msg: str) -> None:
    print(f"pangu-infer: model cache: {msg}", file=sys.stderr)


# -------------------------------------------------------------------------------- snapshot


def _encode(value: Any) -> tuple[bool, Any]:
    """(True, JSON value) for the plain attribute values a module can be rebuilt from."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True, value
    if isinstance(value, torch.dtype):
        return True, {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return True, {"device": str(value)}
    if isinstance(value, (list, tuple)):
        out = []
        for v in value:
            ok, e = _encode(v)
            if not ok:
                return False, None
            out.append(e)
        return True, {"tuple": out} if isinstance(value, tuple) else {"list": out}
    return False, None


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "dtype" in value:
            return getattr(torch, value["dtype"])
        if "device" in value:
            return torch.device(value["device"])
        if "tuple" in value:
            return tuple(_decode(v) for v in value["tuple"])
        if "list" in value:
            return [_decode(v) for v in value["list"]]
        raise CacheError(f"unknown attribute encoding {value!r}")
    return value


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _class(name: str) -> type:
    import importlib

    module, _, qual = name.partition(":")
    if not module.startswith(("pangu_infer.", "torch.nn.")):
        raise CacheError(f"module class {name!r} is not this engine's or torch.nn's")
    obj: Any = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise CacheError(f"{name!r} is not an nn.Module class")
    return obj


def describe(model: nn.Module) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The module tree (class, plain attributes, where each tensor goes) and the tensors by name.

    Raises CacheError when a module holds something this format cannot rebuild."""
    modules: list[dict] = []
    tensors: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        attrs: dict[str, Any] = {}
        opaque: list[str] = []
        slots: list[list] = []  # [attribute, kind, tensor name or None, requires_grad]
        for name, value in module.__dict__.items():
            if name in _MODULE_INTERNALS or name.startswith("_"):
                continue
            if isinstance(value, torch.Tensor):
                slots.append([name, "attr", value, False])
                continue
            ok, enc = _encode(value)
            if ok:
                attrs[name] = enc
            else:
                opaque.append(name)
        for name, p in module._parameters.items():
            slots.append([name, "param", p, bool(p is not None and p.requires_grad)])
        for name, b in module._buffers.items():
            kind = "buffer" if name not in module._non_persistent_buffers_set else "buffer_np"
            slots.append([name, kind, b, False])
        for slot in slots:
            t = slot[2]
            if t is None:
                continue
            if t.device.type != "cpu" or t.is_meta or t.layout != torch.strided or t.dtype not in _DTYPES:
                raise CacheError(f"{path or 'model'}.{slot[0]}: a {t.device.type} {t.layout} {t.dtype} tensor")
            tname = f"{path}.{slot[0]}" if path else slot[0]
            tensors[tname] = t
            slot[2] = tname
        modules.append(
            {
                "path": path,
                "class": _class_name(type(module)),
                "attrs": attrs,
                "opaque": sorted(opaque),
                "slots": slots,
                "children": list(module._modules),
            }
        )
    return modules, tensors


@dataclass
class Snapshot:
    """A model as its load left it: the module tree and tensors of describe() (references: a write
    in the background reads them later; the runner replaces modules after load, it does not change
    their tensors), the types of the attributes the format cannot hold, in named_modules' order,
    and the kernel choices made so far (they decided the layout)."""

    modules: list[dict]
    tensors: dict[str, torch.Tensor]
    opaque: list[tuple[str, str, str]]
    choices: dict = field(default_factory=dict)


def snapshot(model: nn.Module) -> Snapshot:
    """The model's Snapshot; CacheError when it holds something this format cannot rebuild."""
    modules, tensors = describe(model)
    opaque = [
        (path, name, _class_name(type(value)))
        for path, module in model.named_modules(remove_duplicate=False)
        for name, value in module.__dict__.items()
        if name not in _MODULE_INTERNALS and not name.startswith("_") and not isinstance(value, torch.Tensor)
        and not _encode(value)[0]
    ]
    return Snapshot(modules, tensors, opaque, choices_made())


# ------------------------------------------------------------------------------------ writing


def _layout(tensors: dict[str, torch.Tensor]) -> tuple[dict, list[tuple[int, torch.Tensor]], dict[str, str]]:
    """Header entries, (offset, tensor) to write, and aliases (name -> name of the same view)."""
    header: dict[str, Any] = {}
    writes: list[tuple[int, torch.Tensor]] = []
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    offset = pads = 0
    for name, t in tensors.items():
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and view in seen:
            aliases[name] = seen[view]
            continue
        seen[view] = name
        if offset % ALIGN:
            gap = ALIGN - offset % ALIGN
            header[f"__pad__.{pads}"] = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
            writes.append((offset, torch.zeros(gap, dtype=torch.uint8)))
            offset += gap
            pads += 1
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        writes.append((offset, t))
        offset += nbytes
    return header, writes, aliases


def _header_bytes(header: dict) -> bytes:
    """The JSON header, space-padded so that the data starts on ALIGN bytes (8 + len)."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)
    return len(raw).to_bytes(8, "little") + raw


def write(
    model: "nn.Module | Snapshot", key: dict, target: Path, extras: Optional[dict] = None, progress: bool = False,
    writing: Optional["_Write"] = None,
) -> None:
    """Write the model's snapshot (and `extras`, JSON: what else the load needs, such as the config
    and tokenizer read from the GGUF header) to `target` atomically; CacheError if it cannot be
    described. progress: a bar over the bytes written (a 7B's 4.8 GB take as long as converting it).
    writing: a background write's record (its bytes written; a cancel stops it between tensors)."""
    extras = extras or {}
    if json.loads(json.dumps(extras)) != extras:
        raise CacheError("the config or tokenizer does not survive JSON")
    snap = model if isinstance(model, Snapshot) else snapshot(model)
    tensors = dict(snap.tensors)
    # The extras (a tokenizer's vocabulary and merges: megabytes) as one UTF-8 tensor, parsed once:
    # a JSON string inside the JSON header would be parsed twice, escaped.
    tensors[EXTRAS] = torch.frombuffer(bytearray(json.dumps(extras).encode()), dtype=torch.uint8)
    header, writes, aliases = _layout(tensors)
    strides = {n: list(t.stride()) for n, t in tensors.items() if n not in aliases and not t.is_contiguous()}
    header["__metadata__"] = {
        "format": FORMAT,
        "key": json.dumps(key, sort_keys=True),
        "modules": json.dumps(snap.modules),
        "aliases": json.dumps(aliases),
        "strides": json.dumps(strides),
        "choices": json.dumps(snap.choices, sort_keys=True),
    }
    head = _header_bytes(header)
    size = len(head) + (writes[-1][0] + writes[-1][1].numel() * writes[-1][1].element_size() if writes else 0)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(target.parent)
    if shutil.disk_usage(target.parent).free < size + DISK_MARGIN:
        raise CacheError(f"not enough free disk space in {target.parent} for {size >> 20} MiB")
    from tqdm import tqdm

    # (the pid in the name: a file left by a process that died while writing is removed later)
    fd, tmp = tempfile.mkstemp(prefix=f"{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    with tqdm(total=size, unit="B", unit_scale=True, desc="writing the model cache", disable=not progress) as bar:
        try:
            try:
                _write_file(tmp, head, writes, bar, writing, direct=True)
            except _DirectRefused:  # (at its first write) the file system takes no O_DIRECT writes
                bar.reset()
                if writing is not None:
                    writing.written = 0
                _write_file(tmp, head, writes, bar, writing, direct=False)
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


DIRECT_CHUNK = 8 << 20  # bytes per O_DIRECT write
DIRECT_ALIGN = 4096  # O_DIRECT's alignment of memory, length and offset (the largest logical block size)


class _DirectRefused(Exception):
    pass


class _AlignedBuffer:
    """DIRECT_CHUNK bytes of page-aligned memory (as O_DIRECT wants; an anonymous mapping) and a numpy
    view of them: the one buffer a write (_DirectSink) or a check (_same_bytes) moves the file through."""

    def __init__(self):
        import mmap

        self.buffer = mmap.mmap(-1, DIRECT_CHUNK)
        self.view = numpy.frombuffer(self.buffer, dtype=numpy.uint8)

    def close(self) -> None:
        del self.view  # (the mapping cannot close while a view holds it)
        self.buffer.close()


def _write_file(path: str, head: bytes, writes: list[tuple[int, torch.Tensor]], bar: Any, writing: Optional["_Write"],
                direct: bool) -> None:
    """The header, then each tensor's bytes in their logical order (`strides` in the header restores
    a strided view), written to `path` from its start.

    direct: with O_DIRECT, from a page-aligned buffer, where the file system takes it (Linux; not
    tmpfs): a buffered write goes through the page cache, whose write path cost 2.8 s of CPU per GB
    on the VMs of benchmarks/RESULTS.md ("stop 46: the model cache written after the load"), an
    O_DIRECT one 0.2 s (the copy into the buffer), at 4-5x the speed. _DirectRefused if it cannot
    open or its first write fails."""
    sink = _DirectSink(path) if direct else _BufferedSink(path)
    try:
        sink.put(torch.frombuffer(bytearray(head), dtype=torch.uint8))
        for _, t in writes:
            if writing is not None:
                writing.check()
            data = _bytes_of(t)
            sink.put(data)
            bar.update(data.numel())
            if writing is not None:
                writing.written += data.numel()
        sink.finish()
    finally:
        sink.close()


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes in its logical (row-major) order, as the file holds them: uint8, 1-D."""
    return t.detach().contiguous().view(torch.uint8).reshape(-1) if t.numel() else t.new_empty(0, dtype=torch.uint8)


class _BufferedSink:
    def __init__(self, path: str):
        self.f = open(path, "wb")

    def put(self, data: torch.Tensor) -> None:
        if data.numel():
            self.f.write(memoryview(data.numpy()).cast("B"))

    def finish(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class _DirectSink:
    def __init__(self, path: str):
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            raise _DirectRefused()
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_TRUNC | flag)
        except OSError:
            raise _DirectRefused() from None
        self.aligned = _AlignedBuffer()
        self.pos = self.total = 0
        self.flushed = False

    def put(self, data: torch.Tensor) -> None:
        # numpy's copies (no GIL held, one thread): torch's would start a second OpenMP team beside
        # the engine's, whose threads spin between products on the same cores
        n, i, source = data.numel(), 0, data.numpy()
        while i < n:
            k = min(n - i, DIRECT_CHUNK - self.pos)
            numpy.copyto(self.aligned.view[self.pos : self.pos + k], source[i : i + k])
            self.pos += k
            i += k
            if self.pos == DIRECT_CHUNK:
                self._flush(DIRECT_CHUNK)
        self.total += n

    def _flush(self, length: int) -> None:
        try:
            with memoryview(self.aligned.buffer) as whole, whole[:length] as part:  # (released even on an error)
                written = os.write(self.fd, part)
        except OSError as e:
            if not self.flushed:
                raise _DirectRefused() from e
            raise
        if written != length:  # (a short O_DIRECT write: the disk is full, or the file system balked)
            raise OSError(f"wrote {written} of {length} bytes")
        self.flushed = True
        self.pos = 0

    def finish(self) -> None:
        if self.pos:  # the tail, padded to the alignment, then cut back to the file's size
            padded = -(-self.pos // DIRECT_ALIGN) * DIRECT_ALIGN
            self.aligned.view[self.pos : padded] = 0
            self._flush(padded)
        os.ftruncate(self.fd, self.total)

    def close(self) -> None:
        os.close(self.fd)
        self.aligned.close()


ABANDONED_SECONDS = 600  # a temporary file this old, of a process no longer running, is removed
FORGOTTEN_SECONDS = 86400  # and one this old whatever its pid says (reused by another process)


def _remove_abandoned(folder: Path) -> None:
    """Remove the temporary files of writes whose process died (killed mid-write: the rename never
    came), named <target>.<pid>.<random>.tmp: untouched for ABANDONED_SECONDS with the pid not
    running, or for FORGOTTEN_SECONDS (a write in progress touches its file all the time)."""
    for tmp in folder.glob("*.safetensors.*.tmp"):
        try:
            pid = int(tmp.name.rsplit(".", 3)[1])
            age = time.time() - tmp.stat().st_mtime
        except (IndexError, ValueError, OSError):
            continue
        if age <= ABANDONED_SECONDS:
            continue
        if age <= FORGOTTEN_SECONDS:
            if os.name == "nt":  # (os.kill there terminates the process: no way to ask)
                continue
            try:
                os.kill(pid, 0)
                continue  # still running (or not ours to signal): its write may be in progress
            except ProcessLookupError:
                pass
            except OSError:
                continue
        try:
            tmp.unlink()
        except OSError:
            pass


# ------------------------------------------------------------------------------------ reading


def _read_header(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 2 <= n <= size - 8:
            raise CacheError(f"bad header length {n}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CacheError(f"bad header: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise CacheError("no metadata")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise CacheError(f"the file has {size} bytes, its header describes {8 + n + end}")
    return header, 8 + n


def read(path: Path, key: dict, build: Callable[[dict], nn.Module], check_choices: bool = True) -> tuple[nn.Module, dict]:
    """The model in the snapshot at `path` and its extras: `build(extras)` makes the meta-device
    model (from the config), which is then filled. StaleChoices (with `check_choices`) where a
    kernel choice the writing process had made is no longer the one stored for this machine."""
    header, base = _read_header(path)
    meta = header["__metadata__"]
    if meta.get("format") != FORMAT:
        raise CacheError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
    if json.loads(meta["key"]) != json.loads(json.dumps(key, sort_keys=True)):
        raise CacheError("written for another file, engine or setting (key differs)")
    try:
        made = json.loads(meta["choices"])
    except (KeyError, TypeError, ValueError):
        raise CacheError("no kernel choices recorded") from None
    if not isinstance(made, dict) or not all(isinstance(v, dict) for v in made.values()):
        raise CacheError("bad kernel choices record")
    if check_choices and (changed := changed_choices(made)):
        raise StaleChoices(", ".join(changed))
    modules = json.loads(meta["modules"])
    aliases: dict[str, str] = json.loads(meta["aliases"])
    strides: dict[str, list[int]] = json.loads(meta["strides"])
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)

    def tensor(name: str) -> torch.Tensor:
        name = aliases.get(name, name)
        entry = header[name]
        dtype = _BY_NAME[entry["dtype"]]
        start, stop = entry["data_offsets"]
        shape = tuple(entry["shape"])
        esize = torch.empty((), dtype=dtype).element_size()
        numel = 1
        for d in shape:
            numel *= d
        if stop - start != numel * esize or (base + start) % esize:
            raise CacheError(f"tensor {name!r}: bad extent")
        t = torch.empty(0, dtype=dtype)
        t.set_(storage, (base + start) // esize, shape, _contiguous_strides(shape))
        if name in strides:
            t = _restride(t, strides[name])
        return t

    if EXTRAS not in header:
        raise CacheError("no extras")
    extras = json.loads(tensor(EXTRAS).numpy().tobytes())
    model = build(extras)
    # Parents come before children in named_modules' order: each module is placed, then filled.
    built: dict[str, nn.Module] = {}
    for entry in modules:
        path_ = entry["path"]
        cls = _class(entry["class"])
        current = _get(model, path_)
        if current is not None and type(current) is cls:
            module = current
        else:
            if entry["opaque"]:
                raise CacheError(f"{path_}: a {entry['class']} with attributes this cache cannot rebuild")
            module = cls.__new__(cls)
            nn.Module.__init__(module)
            parent, _, attr = path_.rpartition(".")
            if not path_:
                raise CacheError("the model's own class differs")
            setattr(built[parent] if parent in built else _get(model, parent), attr, module)
        built[path_] = module
        # Children the snapshot does not list are gone (e.g. replaced by an attribute).
        for name in list(module._modules):
            if name not in entry["children"]:
                del module._modules[name]
        for name, value in entry["attrs"].items():
            if _is_slot(module, name):
                raise CacheError(f"{path_}.{name}: a plain attribute where the model has a parameter or module")
            module.__dict__[name] = _decode(value)
        for name, kind, tname, requires_grad in entry["slots"]:
            t = None if tname is None else tensor(tname)
            module._parameters.pop(name, None)
            module._buffers.pop(name, None)
            module.__dict__.pop(name, None)
            if kind == "param":
                module._parameters[name] = None if t is None else nn.Parameter(t, requires_grad=requires_grad)
            elif kind in ("buffer", "buffer_np"):
                module._buffers[name] = t
                if kind == "buffer_np":
                    module._non_persistent_buffers_set.add(name)
                else:
                    module._non_persistent_buffers_set.discard(name)
            else:
                module.__dict__[name] = t
    _share_parameters(model, modules, aliases)
    return model, extras


def _share_parameters(model: nn.Module, modules: list[dict], aliases: dict[str, str]) -> None:
    """Parameters that were one object (a tied head) are one object again."""
    first: dict[str, nn.Parameter] = {}
    for entry in modules:
        module = _get(model, entry["path"])
        for name, kind, tname, _ in entry["slots"]:
            if kind != "param" or tname is None:
                continue
            root = aliases.get(tname, tname)
            if root in first:
                module._parameters[name] = first[root]
            else:
                first[root] = module._parameters[name]


def _is_slot(module: nn.Module, name: str) -> bool:
    return name in module._parameters or name in module._buffers or name in module._modules


def _contiguous_strides(shape: tuple) -> tuple:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(strides))


def _restride(t: torch.Tensor, stride: list[int]) -> torch.Tensor:
    """A tensor with the given strides and the values of `t` (written in row-major order)."""
    out = torch.empty_strided(t.shape, stride, dtype=t.dtype)
    out.copy_(t)
    return out


def _get(model: nn.Module, path: str) -> Optional[nn.Module]:
    if not path:
        return model
    module: Any = model
    for part in path.split("."):
        module = module._modules.get(part) if isinstance(module, nn.Module) else None
        if module is None:
            return None
    return module


# ----------------------------------------------------------------------------------- checking


def same_model(
    a: "nn.Module | Snapshot", b: "nn.Module | Snapshot", compared: Optional[Callable[[torch.Tensor], None]] = None, data: bool = True,
) -> Optional[str]:
    """None when `b` is `a` (a model, or a model's Snapshot) rebuilt: module classes, plain
    attributes, tensors (values, dtypes, shapes, strides), parameters vs buffers and shared tensors;
    else what differs. `compared` is called with each tensor of `b` once it has been compared.
    data=False: everything but the tensors' values."""
    sa = a if isinstance(a, Snapshot) else snapshot(a)
    sb = b if isinstance(b, Snapshot) else snapshot(b)
    ma, ta, mb, tb = sa.modules, sa.tensors, sb.modules, sb.tensors
    if json.dumps(ma, sort_keys=True) != json.dumps(mb, sort_keys=True):
        for x, y in zip(ma, mb):
            if json.dumps(x, sort_keys=True) != json.dumps(y, sort_keys=True):
                return f"module {x['path']!r}: {x} != {y}"
        return "module trees differ"
    for name, x in ta.items():
        y = tb[name]
        if x.dtype != y.dtype or x.shape != y.shape or x.stride() != y.stride():
            return f"tensor {name!r} differs"
        if not data:
            continue
        for xs, ys in _pieces(x, y):
            if not torch.equal(xs, ys):
                return f"tensor {name!r} differs"
            if compared is not None:
                compared(ys)
    if _aliasing(ta) != _aliasing(tb):
        return "shared tensors differ"
    types_b = {(path, name): cls for path, name, cls in sb.opaque}
    for path, name, cls in sa.opaque:
        if types_b.get((path, name)) != cls:
            return f"{path}.{name}: {cls} != {types_b.get((path, name))}"
    return None


COMPARE_BYTES = 4 << 20  # same_model compares at most this much at a time


def _pieces(x: torch.Tensor, y: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """x and y (same shape and strides) in matching slices of about COMPARE_BYTES."""
    if not (x.is_contiguous() and y.is_contiguous()) or x.numel() * x.element_size() <= COMPARE_BYTES:
        yield x, y
        return
    xf, yf = x.reshape(-1), y.reshape(-1)
    step = max(1, COMPARE_BYTES // x.element_size())
    for i in range(0, xf.numel(), step):
        yield xf[i : i + step], yf[i : i + step]


def _aliasing(tensors: dict[str, torch.Tensor]) -> list[list[str]]:
    groups: dict[tuple, list[str]] = {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel():
            groups.setdefault(key, []).append(name)
    return sorted(g for g in groups.values() if len(g) > 1)


# ------------------------------------------------------------------------------------ the API


def load(path: str, key: dict, build: Callable[[dict], nn.Module]) -> Optional[tuple[nn.Module, dict]]:
    """The cached model for `key` and its extras, or None (no file; a bad one is reported in one line)."""
    target = cache_file(key)
    if not target.is_file():
        return None
    try:
        return read(target, key, build)
    except StaleChoices as e:  # the machine's kernel choices changed since: convert again, rewrite it
        logging.getLogger("pangu_infer.loader").info("%s: kernel choices changed (%s); converting again", target, e)
        return None
    except Exception as e:  # noqa: BLE001  (any problem with the file: load normally, rewrite it)
        warn(f"ignoring {target} ({type(e).__name__}: {e}); loading {os.path.basename(path)} normally")
        return None


BACKGROUND_BYTES = 256 << 20  # models above this size are written after the load returns


def store(
    model: nn.Module, key: dict, build: Callable[[dict], nn.Module], extras: Optional[dict] = None, progress: bool = False,
    background: Optional[bool] = None,
) -> Optional[Path]:
    """Write the model's snapshot, check it reads back as the same model, and keep it; on any
    problem keep nothing and say why in one line. progress: write's bar.

    background (None: for models above BACKGROUND_BYTES): snapshot the model now, then write and
    check the file in a thread and return None at once. Writing and checking a 7B's 4.8 GB takes
    about 9 s of the disk's time (and 2 s of CPU) while the engine already serves; a load of the
    same file in this process waits for it (wait()), and the process waits for it at exit, saying
    so (finish_writes)."""
    target = cache_file(key)
    try:
        snap = snapshot(model)
    except CacheError as e:
        warn(f"not cached ({e})")
        return None
    size = sum(t.numel() * t.element_size() for t in snap.tensors.values())
    if background is None:
        background = size > BACKGROUND_BYTES
    if not background:
        return _store(snap, key, target, build, extras, progress, None)
    wait(target)  # (one write of a file at a time)
    writing = _Write(target, size)
    writing.thread = threading.Thread(
        target=_store_quietly, args=(snap, key, target, build, extras, writing), name="pangu-infer model cache", daemon=True
    )
    with _WRITES_LOCK:
        global _EXIT_HOOKED
        _WRITES[target] = writing
        if not _EXIT_HOOKED:  # (daemon threads still run in atexit handlers: this one waits for them)
            import atexit

            atexit.register(finish_writes)
            _EXIT_HOOKED = True
    print(f"pangu-infer: model cache: writing {_gb(size)} to {target} in the background (the next start maps it)", file=sys.stderr)
    writing.thread.start()
    return None


def _store(
    snap: Snapshot, key: dict, target: Path, build: Callable[[dict], nn.Module], extras: Optional[dict], progress: bool,
    writing: Optional["_Write"],
) -> Optional[Path]:
    try:
        write(snap, key, target, extras, progress, writing)
    except CacheError as e:
        if writing is None or not writing.cancel.is_set():  # (an interrupted exit says it once)
            warn(f"not cached ({e})")
        return None
    except OSError as e:
        warn(f"not written to {target.parent} ({e})")
        return None
    try:
        why = _check(snap, key, target, build, extras or {}, writing)
    except Exception as e:  # noqa: BLE001
        why = f"{type(e).__name__}: {e}"
    if why is not None:
        if writing is None or not writing.cancel.is_set():
            warn(f"not cached: the written model does not read back the same ({why})")
        target.unlink(missing_ok=True)
        return None
    for old in _stale(target):
        old.unlink(missing_ok=True)
    return target


def _check(
    snap: Snapshot, key: dict, target: Path, build: Callable[[dict], nn.Module], extras: dict, writing: Optional["_Write"],
    compared: Optional[Callable[[], None]] = None,
) -> Optional[str]:
    """None when the file at `target` reads back as the snapshot's model, else what differs:
    read() rebuilds it (mapped: its tensors are views of the file) with the same module tree,
    attributes, tensor shapes, strides, sharing and extras, each mapped tensor a view of the bytes
    its header entry names; and those bytes, read from the disk in order, are the snapshot's.

    The bytes are read into one small buffer (O_DIRECT where the file system takes it), not through
    the mapping: the check never holds a second resident copy of the model, and it leaves the page
    cache as it was (filling it cost about 2 s of CPU per GB on the VMs of benchmarks/RESULTS.md).
    compared: called after each buffer's worth is compared (tests watch the resident memory)."""
    copy, extras_read = read(target, key, build, check_choices=False)
    if extras_read != json.loads(json.dumps(extras)):
        return "the extras differ"
    copied = snapshot(copy)
    why = same_model(snap, copied, data=False)
    if why is not None:
        return why
    header, base = _read_header(target)
    meta = header["__metadata__"]
    aliases, strides = json.loads(meta["aliases"]), json.loads(meta["strides"])
    size = target.stat().st_size
    file_start: Optional[int] = None  # the address of the file's first byte in the copy's mapping
    expected: list[tuple[int, str, torch.Tensor]] = []  # (offset in the file, name, the snapshot's tensor)
    for name, t in copied.tensors.items():
        entry = header[aliases.get(name, name)]
        start, stop = entry["data_offsets"]
        if name in strides or t.numel() == 0:  # (a strided tensor is rebuilt as a copy: its values compared here)
            if not torch.equal(t, snap.tensors[name]):
                return f"tensor {name!r} differs"
            continue
        storage = t.untyped_storage()
        if file_start is None:
            file_start = storage.data_ptr()
        address = storage.data_ptr() + t.storage_offset() * t.element_size()
        if storage.data_ptr() != file_start or storage.nbytes() != size or address != file_start + base + start:
            return f"tensor {name!r} is not read from its place in the file"
        if name not in aliases:
            expected.append((base + start, name, snap.tensors[name]))
    del copy, copied
    expected.sort(key=lambda e: e[0])
    return _same_bytes(target, expected, writing, compared)


def _same_bytes(
    path: Path, expected: list[tuple[int, str, torch.Tensor]], writing: Optional["_Write"], compared: Optional[Callable[[], None]],
) -> Optional[str]:
    """None when the file holds each tensor's bytes (in row-major order) at its offset, else the
    first tensor that differs. `expected` sorted by offset; the file read once, in order."""
    flag = getattr(os, "O_DIRECT", 0)
    try:
        fd = os.open(path, os.O_RDONLY | flag)
    except OSError:
        fd, flag = os.open(path, os.O_RDONLY), 0
    aligned = _AlignedBuffer()
    try:
        # compared by numpy (one thread; see _DirectSink.put), 5x faster than torch.equal on bytes
        wanted = [(offset, name, _bytes_of(t).numpy()) for offset, name, t in expected]
        i = 0
        chunk_start = wanted[0][0] // DIRECT_ALIGN * DIRECT_ALIGN if wanted else 0
        while i < len(wanted):
            if writing is not None:
                writing.check()
            try:
                n = _read_at(fd, aligned.buffer, chunk_start)
            except OSError as e:
                if not (flag and e.errno == errno.EINVAL):
                    raise
                os.close(fd)  # a file system that opens with O_DIRECT but reads only without it
                fd, flag = os.open(path, os.O_RDONLY), 0
                n = _read_at(fd, aligned.buffer, chunk_start)
            if n <= 0:
                return f"tensor {wanted[i][1]!r} is cut short"
            chunk_end = chunk_start + n
            # every tensor overlapping [chunk_start, chunk_end): the part inside it
            j = i
            while j < len(wanted) and wanted[j][0] < chunk_end:
                offset, name, data = wanted[j]
                lo, hi = max(offset, chunk_start), min(offset + data.size, chunk_end)
                if hi > lo and not numpy.array_equal(aligned.view[lo - chunk_start : hi - chunk_start], data[lo - offset : hi - offset]):
                    return f"tensor {name!r} differs"
                j += 1
            while i < len(wanted) and wanted[i][0] + wanted[i][2].size <= chunk_end:
                i += 1  # (wholly compared)
            if compared is not None:
                compared()
            chunk_start = chunk_end
        return None
    finally:
        os.close(fd)
        aligned.close()


def _read_at(fd: int, buffer: Any, offset: int) -> int:
    """Read into `buffer` from `offset` of the file: the bytes read (fewer at its end)."""
    with io.FileIO(fd, "rb", closefd=False) as f:  # (os.preadv is not on every system)
        f.seek(offset)
        return f.readinto(buffer) or 0


class _Write:
    """A write in the background: its thread, its target, bytes written of the total, a cancel."""

    def __init__(self, target: Path, total: int):
        self.target, self.total, self.written = target, total, 0
        self.cancel = threading.Event()
        # set by the thread as it ends (Thread.join, interrupted by Ctrl-C, can report a running
        # thread as ended: Python 3.11)
        self.done = threading.Event()
        self.thread: Optional[threading.Thread] = None
        self.started = time.monotonic()

    def check(self) -> None:
        if self.cancel.is_set():
            raise CacheError("interrupted")


_WRITES: dict[Path, _Write] = {}
_WRITES_LOCK = threading.Lock()
_EXIT_HOOKED = False


def _forget_writes_in_child() -> None:
    """A forked child has none of the parent's threads: nothing of theirs to wait for at its exit."""
    global _WRITES_LOCK
    _WRITES_LOCK = threading.Lock()
    _WRITES.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_writes_in_child)


def _store_quietly(snap: Snapshot, key: dict, target: Path, build: Callable[[dict], nn.Module], extras: Optional[dict],
                   writing: _Write) -> None:
    try:
        written = _store(snap, key, target, build, extras, False, writing)
        if written is not None:
            logging.getLogger("pangu_infer.loader").info(
                "model cache written: %s (%.1f s)", written, time.monotonic() - writing.started
            )
    except BaseException as e:  # noqa: BLE001  (a thread's error reaches nobody else: say it, keep nothing)
        warn(f"not cached ({type(e).__name__}: {e})")
    finally:
        del snap  # (the tensors it holds alive)
        writing.done.set()  # (it stays in _WRITES until a wait() has joined its thread)


def wait(target: Optional[Path] = None, timeout: Optional[float] = None) -> bool:
    """Wait for this process's background write of `target` (None: every one) to end; False if one
    is still running after `timeout` seconds."""
    with _WRITES_LOCK:
        writes = [w for t, w in _WRITES.items() if target is None or t == target]
    deadline = None if timeout is None else time.monotonic() + timeout
    for w in writes:
        if not w.done.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
            return False
        assert w.thread is not None
        # Its work is over; this waits out the thread's own teardown, which must not overlap the
        # interpreter's exit (a C++ abort, "terminate called without an active exception").
        w.thread.join()
        with _WRITES_LOCK:
            if _WRITES.get(w.target) is w:
                del _WRITES[w.target]
    return True


def finish_writes(interruptible: bool = True) -> None:
    """At exit: let the background writes finish (the cache is the point of the first load), saying
    so; interrupted (Ctrl-C), stop them and keep nothing. Registered with atexit; called by what
    ends a process without it (the CLI's os._exit, the server's shutdown, before uvicorn re-raises
    the signal that stopped it). interruptible=False: the caller's Ctrl-C does not reach here."""
    with _WRITES_LOCK:
        writes = list(_WRITES.values())
    try:
        for w in writes:
            if not w.done.is_set():
                skip = "; Ctrl-C skips it" if interruptible else ""
                print(f"pangu-infer: model cache: finishing the write of {w.target.name} ({_gb(w.written)} of {_gb(w.total)} "
                      f"written{skip})", file=sys.stderr, flush=True)
            wait(w.target)
    except KeyboardInterrupt:
        for w in writes:
            w.cancel.set()
        wait(timeout=10)
        warn("not cached (interrupted)")


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
