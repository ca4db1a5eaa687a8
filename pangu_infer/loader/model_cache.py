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
- written to a temporary file and renamed into place: a reader never sees a partial file;
- checked before it is kept: the file is loaded back at once and must reproduce every module
  class, plain attribute, tensor (bitwise, with its strides) and shared tensor of the model that
  was just converted; a model that does not round-trip is not cached;
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

import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from pangu_infer.machine import cache_root, changed_choices, choices_made, engine_settings, source_hash
from pangu_infer.memory import drop_mapped_pages, file_backed_ranges, is_file_backed

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


def write(model: nn.Module, key: dict, target: Path, extras: Optional[dict] = None, progress: bool = False) -> None:
    """Write the model's snapshot (and `extras`, JSON: what else the load needs, such as the config
    and tokenizer read from the GGUF header) to `target` atomically; CacheError if it cannot be
    described. progress: a bar over the bytes written (a 7B's 4.8 GB take as long as converting it)."""
    extras = extras or {}
    if json.loads(json.dumps(extras)) != extras:
        raise CacheError("the config or tokenizer does not survive JSON")
    modules, tensors = describe(model)
    # The extras (a tokenizer's vocabulary and merges: megabytes) as one UTF-8 tensor, parsed once:
    # a JSON string inside the JSON header would be parsed twice, escaped.
    tensors[EXTRAS] = torch.frombuffer(bytearray(json.dumps(extras).encode()), dtype=torch.uint8)
    header, writes, aliases = _layout(tensors)
    strides = {n: list(t.stride()) for n, t in tensors.items() if n not in aliases and not t.is_contiguous()}
    header["__metadata__"] = {
        "format": FORMAT,
        "key": json.dumps(key, sort_keys=True),
        "modules": json.dumps(modules),
        "aliases": json.dumps(aliases),
        "strides": json.dumps(strides),
        "choices": json.dumps(choices_made(), sort_keys=True),
    }
    head = _header_bytes(header)
    size = len(head) + (writes[-1][0] + writes[-1][1].numel() * writes[-1][1].element_size() if writes else 0)
    target.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(target.parent).free < size + DISK_MARGIN:
        raise CacheError(f"not enough free disk space in {target.parent} for {size >> 20} MiB")
    from tqdm import tqdm

    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    with tqdm(total=size, unit="B", unit_scale=True, desc="writing the model cache", disable=not progress) as bar:
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(head)
                for _, t in writes:
                    # Strided tensors are written in their logical (row-major) order; `strides` restores the view.
                    data = t.detach().contiguous().view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)
                    f.write(memoryview(data.numpy()).cast("B") if data.numel() else b"")
                    bar.update(data.numel())
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


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


def _drop_if_mapped(t: torch.Tensor, ranges: list[tuple[int, int]]) -> None:
    if is_file_backed(t, ranges):  # never anonymous memory: MADV_DONTNEED would zero it
        drop_mapped_pages(t)


def same_model(a: nn.Module, b: nn.Module, compared: Optional[Callable[[torch.Tensor], None]] = None) -> Optional[str]:
    """None when `b` is `a` rebuilt: module classes, plain attributes, tensors (values, dtypes,
    shapes, strides), parameters vs buffers and shared tensors; else what differs. `compared` is
    called with each tensor of `b` once it has been compared."""
    ma, ta = describe(a)
    mb, tb = describe(b)
    if json.dumps(ma, sort_keys=True) != json.dumps(mb, sort_keys=True):
        for x, y in zip(ma, mb):
            if json.dumps(x, sort_keys=True) != json.dumps(y, sort_keys=True):
                return f"module {x['path']!r}: {x} != {y}"
        return "module trees differ"
    for name, x in ta.items():
        y = tb[name]
        if x.dtype != y.dtype or x.shape != y.shape or x.stride() != y.stride():
            return f"tensor {name!r} differs"
        for xs, ys in _pieces(x, y):
            if not torch.equal(xs, ys):
                return f"tensor {name!r} differs"
            if compared is not None:
                compared(ys)
    for pa, pb in ((_aliasing(ta), _aliasing(tb)),):
        if pa != pb:
            return "shared tensors differ"
    for (na, ma_), (nb, mb_) in zip(a.named_modules(remove_duplicate=False), b.named_modules(remove_duplicate=False)):
        for name in ma_.__dict__:
            if name in _MODULE_INTERNALS or name.startswith("_"):
                continue
            va, vb = ma_.__dict__[name], mb_.__dict__.get(name, _MISSING)
            if not isinstance(va, torch.Tensor) and not _encode(va)[0] and type(va) is not type(vb):
                return f"{na}.{name}: {type(va).__name__} != {type(vb).__name__}"
    return None


_MISSING = object()
COMPARE_BYTES = 4 << 20  # compared (and, read back, dropped) at most this much at a time


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


def store(
    model: nn.Module, key: dict, build: Callable[[dict], nn.Module], extras: Optional[dict] = None, progress: bool = False
) -> Optional[Path]:
    """Write the model's snapshot, check it reads back as the same model, and keep it; on any
    problem keep nothing and say why in one line. progress: write's bar."""
    target = cache_file(key)
    try:
        write(model, key, target, extras, progress)
    except CacheError as e:
        warn(f"not cached ({e})")
        return None
    except OSError as e:
        warn(f"not written to {target.parent} ({e})")
        return None
    try:
        # The copy read back is memory-mapped: each tensor's pages are given back once compared, so
        # the check never holds a second resident model (peak RSS of a first load, RESULTS.md).
        copy = read(target, key, build, check_choices=False)[0]
        ranges = file_backed_ranges()
        why = same_model(model, copy, compared=lambda t: _drop_if_mapped(t, ranges))
        del copy
    except Exception as e:  # noqa: BLE001
        why = f"{type(e).__name__}: {e}"
    if why is not None:
        warn(f"not cached: the written model does not read back the same ({why})")
        target.unlink(missing_ok=True)
        return None
    for old in _stale(target):
        old.unlink(missing_ok=True)
    return target
