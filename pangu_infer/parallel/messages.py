"""The messages rank 0 sends the workers over the control group: each step's inputs as tensors,
the rare control messages (runner settings, LoRA installs, shutdown, ...) pickled.

Every message is one or two broadcasts of bytes: a header, int64 [frame, meta ints, body bytes],
then the body, in the same broadcast where it fits in FIRST_BYTES, else in a second one. A step frame's body is a list of int64 "meta" ints that describe the message (its
kind, the structure of its inputs, every int, bool and None, each tensor's dtype and shape),
then the tensors' bytes, one after another. A pickled frame's body is the message pickled
(as `dist.broadcast_object_list` sends it: what every message was before). A step sent as tensors
is not pickled on rank 0 nor unpickled on the workers, the per-step cost the pickled form had
(torch pickles a tensor through torch.save); vLLM and SGLang send step inputs this way too.

`send` (rank 0) and `receive` (workers) are the only two ends; `encode`/`decode` are the step
frame's pair. The values a step frame carries: None, bools, ints, tensors, tuples and lists of
them, and the attention metadata dataclasses (models/layers.py), field by field in declaration
order; anything else (a new field of another type) is sent pickled instead, never dropped.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import fields
from typing import Any, Optional

import torch
import torch.distributed as dist

from pangu_infer.models.layers import AttentionBatch, PrefillSlice
from pangu_infer.parallel.group import CPU, to_device

logger = logging.getLogger("pangu_infer.parallel")

# The kinds ModelRunner.mirror sends (engine/runner.py, llm.py): each step's, sent as tensors.
STEP_KINDS = ("forward", "decode", "copy")

STEP_FRAME, PICKLED_FRAME = 1, 2
# Every message's first broadcast: the header (3 int64s), then the body where it fits, else the
# body is a second broadcast. A decode step's slots and mask take 9 bytes per row and context token:
# 64 KiB holds 8 rows of 900 tokens, or one of 7,000. A broadcast cost ~130 us on 2 shared cores
# (gloo, 2 processes), 15 us more at 64 KiB than at 24 bytes (benchmarks/RESULTS.md).
HEADER_BYTES = 24
FIRST_BYTES = 64 << 10

# Value tags in the meta ints.
_NONE, _FALSE, _TRUE, _INT, _INTS, _TENSOR, _TUPLE, _LIST = range(8)
_CLASSES = (AttentionBatch, PrefillSlice)  # tags _DATACLASS + index
_DATACLASS = 8
_FIELDS = {cls: tuple(f.name for f in fields(cls)) for cls in _CLASSES}
_DTYPES = (
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
)
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPES)}


class Unencodable(TypeError):
    """A value a step frame does not carry (sent pickled instead)."""


def encode(message: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(header, body) of a step message (kind, *values), the body on the CPU; raises Unencodable."""
    kind, *values = message
    if kind not in STEP_KINDS:
        raise Unencodable(f"{kind!r} is not a step kind")
    meta: list[int] = [STEP_KINDS.index(kind)]
    tensors: list[torch.Tensor] = []
    _put(tuple(values), meta, tensors)
    # One copy of every tensor's bytes into the body, after the meta ints. A device tensor is copied
    # to the host first (decode steps' inputs are few). Flat by as_strided: a contiguous tensor with
    # a dimension of 1 may keep any stride there (x[:, -1] of one row), which a byte view refuses.
    pieces = [torch.tensor(meta, dtype=torch.int64).view(torch.uint8)]
    for t in tensors:
        t = t.contiguous()
        pieces.append(t.as_strided((t.numel(),), (1,)).view(torch.uint8).to(CPU))
    body = torch.cat(pieces)
    total = body.numel()
    return torch.tensor([STEP_FRAME, len(meta), total], dtype=torch.int64), body


def _put(value: Any, meta: list[int], tensors: list[torch.Tensor]) -> None:
    if value is None:
        meta.append(_NONE)
    elif value is True or value is False:
        meta.append(_TRUE if value else _FALSE)
    elif type(value) is int:
        meta += (_INT, value)
    elif isinstance(value, torch.Tensor):
        code = _DTYPE_CODE.get(value.dtype)
        if code is None:
            raise Unencodable(f"a tensor of dtype {value.dtype}")
        meta += (_TENSOR, code, value.dim(), *value.shape)
        tensors.append(value)
    elif type(value) is list and all(type(v) is int for v in value):  # LoRA rows: one int each
        meta += (_INTS, len(value), *value)
    elif type(value) in (tuple, list):
        meta += (_TUPLE if type(value) is tuple else _LIST, len(value))
        for v in value:
            _put(v, meta, tensors)
    elif type(value) in _FIELDS:
        meta.append(_DATACLASS + _CLASSES.index(type(value)))
        for name in _FIELDS[type(value)]:
            _put(getattr(value, name), meta, tensors)
    else:
        raise Unencodable(f"a value of type {type(value).__name__}")


def decode(header: torch.Tensor, body: torch.Tensor, device: torch.device) -> tuple:
    """The message `encode` made, its tensors on `device` (each its own tensor, as rank 0's were)."""
    _, num_meta, _ = header.tolist()
    meta = body[: 8 * num_meta].view(torch.int64).tolist()
    reader = _Reader(meta, body, 8 * num_meta, device)
    kind = STEP_KINDS[reader.next()]
    return (kind, *reader.value())


class _Reader:
    def __init__(self, meta: list[int], body: torch.Tensor, offset: int, device: torch.device):
        self.meta, self.i = meta, 0
        self.body, self.offset = body, offset
        self.device = device

    def next(self) -> int:
        self.i += 1
        return self.meta[self.i - 1]

    def take(self, n: int) -> list[int]:
        self.i += n
        return self.meta[self.i - n : self.i]

    def value(self) -> Any:
        tag = self.next()
        if tag == _NONE:
            return None
        if tag in (_FALSE, _TRUE):
            return tag == _TRUE
        if tag == _INT:
            return self.next()
        if tag == _INTS:
            return self.take(self.next())
        if tag == _TENSOR:
            dtype = _DTYPES[self.next()]
            shape = self.take(self.next())
            n = dtype.itemsize
            for s in shape:
                n *= s
            piece = self.body[self.offset : self.offset + n]
            self.offset += n
            # Its bytes cloned (or copied to the device) first: a fresh tensor, not a view at an
            # offset into the body (as a compiled step's inputs were when it was built), and at any
            # offset in the body (a view as a wider dtype needs an aligned one).
            piece = piece.clone() if self.device.type == "cpu" else piece.to(self.device)
            return piece.view(dtype).reshape(shape)
        if tag in (_TUPLE, _LIST):
            items = [self.value() for _ in range(self.next())]
            return tuple(items) if tag == _TUPLE else items
        cls = _CLASSES[tag - _DATACLASS]
        return cls(**{name: self.value() for name in _FIELDS[cls]})


_warned: set[str] = set()


def send(message: tuple, group: dist.ProcessGroup, pickled: bool = False) -> None:
    """Rank 0: broadcast `message` (kind, *values) to every rank of `group`; a step kind as a step
    frame unless `pickled` (or a value it does not carry), every other kind pickled."""
    frame: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    if message[0] in STEP_KINDS and not pickled:
        try:
            frame = encode(message)
        except Unencodable as e:
            if message[0] not in _warned:
                _warned.add(message[0])
                logger.warning("tensor-parallel %r steps sent pickled: %s", message[0], e)
    if frame is None:
        data = pickle.dumps(to_device(message, CPU))
        body = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        frame = torch.tensor([PICKLED_FRAME, 0, len(data)], dtype=torch.int64), body
    header, body = frame
    first = torch.zeros(FIRST_BYTES, dtype=torch.uint8)  # (zeros: no stale memory of this process sent)
    first[:HEADER_BYTES].view(torch.int64).copy_(header)
    n = body.numel()
    if n <= FIRST_BYTES - HEADER_BYTES:  # the body in the first broadcast: one broadcast in all
        first[HEADER_BYTES : HEADER_BYTES + n].copy_(body)
    dist.broadcast(first, src=0, group=group)
    if n > FIRST_BYTES - HEADER_BYTES:
        dist.broadcast(body, src=0, group=group)


def receive(group: dist.ProcessGroup, device: torch.device) -> tuple:
    """A worker: the next message rank 0 sends, its tensors on `device`."""
    first = torch.empty(FIRST_BYTES, dtype=torch.uint8)
    dist.broadcast(first, src=0, group=group)
    header = first[:HEADER_BYTES].view(torch.int64)
    frame, _, n = header.tolist()
    if n <= FIRST_BYTES - HEADER_BYTES:
        body = first[HEADER_BYTES : HEADER_BYTES + n]
    else:
        body = torch.empty(n, dtype=torch.uint8)
        dist.broadcast(body, src=0, group=group)
    if frame == STEP_FRAME:
        return decode(header, body, device)
    return to_device(pickle.loads(body.numpy().tobytes()), device)
