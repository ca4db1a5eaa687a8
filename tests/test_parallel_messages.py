"""What rank 0 sends the tensor-parallel workers (parallel/messages.py), without processes: every
kind ModelRunner.mirror sends goes as a step frame (no pickle) and comes back equal, field by field;
control messages and values a step frame does not carry go pickled. The end-to-end checks (the
ranks' outputs equal one process's) are tests/test_parallel*.py."""

from __future__ import annotations

import logging
import pickle

import pytest
import torch

from pangu_infer.models.layers import AttentionBatch, PrefillSlice
from pangu_infer.parallel import messages

CPU = torch.device("cpu")


def _prefill_batch() -> AttentionBatch:
    """Two decodes then two prefill chunks, one with a causal mask (a later chunk), one without."""
    mask = torch.arange(7)[None, :] <= torch.arange(4, 7)[:, None]
    return AttentionBatch(
        slot_mapping=torch.tensor([5, 33, 64, 65, 66, 96, 97, 98], dtype=torch.long),
        decode_slots=torch.tensor([[0, 1, 2, 0], [16, 17, 18, 33]]),
        decode_mask=(torch.arange(4)[None, :] < torch.tensor([3, 4])[:, None])[:, None, None, :],
        decode_groups=[(1, 3), (2, 4)],
        prefills=[PrefillSlice(2, 3, 7, torch.arange(60, 67), mask[:3]), PrefillSlice(5, 3, 3, torch.arange(96, 99), None)],
    )


def _decode_batch() -> AttentionBatch:
    return AttentionBatch(
        slot_mapping=torch.tensor([9]), decode_slots=torch.arange(32).reshape(1, 32),
        decode_mask=torch.ones(1, 1, 1, 32, dtype=torch.bool), batch_invariant=True,
    )


# What the runner and LLM.logits mirror, with each step's LoRA rows (None: no adapter).
STEPS = {
    "forward": ("forward", (torch.tensor([1, 2, 3, 4, 5, 6, 7, 8]), torch.tensor([3, 4, 4, 5, 6, 0, 1, 2]), _prefill_batch()), [0, -1, 1, 1, 1, -1, -1, -1]),
    "decode": ("decode", (torch.tensor([42]), torch.tensor([31]), _decode_batch()), None),
    "logits": ("forward", (torch.tensor([3, 4, 5]), torch.arange(3), None), [2, 2, 2]),  # no attention metadata
    "copy": ("copy", ([(3, 7, 5), (3, 8, 16)],), None),  # a beam search's KV copies
    "empty_rows": ("decode", (torch.tensor([1, 2]), torch.tensor([5, 6]), _decode_batch()), []),
    # not contiguous, one row of a column (contiguous, its stride anything), empty: sent by value
    "strides": ("forward", (torch.arange(12).reshape(3, 4).t(), torch.arange(64).reshape(1, 64)[:, -1], torch.zeros(0, 3)), None),
}


def assert_same(got, want, where="message", fresh=True):
    """got equals want value by value; with `fresh`, each tensor its own contiguous one (a step
    frame's, not a view into the frame: as rank 0's were when the workers' compiled steps were built)."""
    assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, f"{where}: {got.dtype}{tuple(got.shape)}"
        assert torch.equal(got, want), where
        assert not fresh or (got.storage_offset() == 0 and got.is_contiguous()), f"{where}: a view into the frame"
    elif isinstance(want, (tuple, list)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]", fresh)
    elif isinstance(want, (AttentionBatch, PrefillSlice)):
        for name in want.__dataclass_fields__:
            assert_same(getattr(got, name), getattr(want, name), f"{where}.{name}", fresh)
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@pytest.mark.parametrize("name", STEPS)
def test_every_mirrored_step_comes_back_equal_from_its_frame(name):
    message = STEPS[name]
    header, body = messages.encode(message)
    assert header.tolist()[0] == messages.STEP_FRAME and header.tolist()[2] == body.numel()
    assert_same(messages.decode(header.clone(), body.clone(), CPU), message)


def test_every_field_of_the_attention_metadata_travels():
    """A field added to AttentionBatch or PrefillSlice is encoded with the others (by declaration
    order), so a batch that sets each one to a non-default value must come back with each."""
    batch = _prefill_batch()
    batch.batch_invariant = True
    message = ("forward", (torch.tensor([1]), torch.tensor([0]), batch), None)
    got = messages.decode(*messages.encode(message), CPU)[1][2]
    assert_same(got, batch)
    assert got.batch_invariant is True and got.prefills[0].causal_mask is not None


def test_a_value_a_step_frame_does_not_carry_is_refused():
    with pytest.raises(messages.Unencodable, match="float"):
        messages.encode(("forward", (torch.tensor([1]), 0.5, None), None))
    with pytest.raises(messages.Unencodable, match="complex"):
        messages.encode(("forward", (torch.zeros(2, dtype=torch.complex64),), None))
    with pytest.raises(messages.Unencodable, match="runner"):
        messages.encode(("runner", 8, 16))


@pytest.fixture
def wire(monkeypatch):
    """dist.broadcast in one process: rank 0's broadcasts are recorded, then replayed to `receive`."""
    sent: list[torch.Tensor] = []

    def broadcast(tensor, src, group):
        if receiving:
            tensor.copy_(sent.pop(0))
        else:
            sent.append(tensor.clone())

    receiving = False
    monkeypatch.setattr(messages.dist, "broadcast", broadcast)

    def roundtrip(message, pickled=False):
        nonlocal receiving
        receiving = False
        messages.send(message, None, pickled=pickled)
        frames = [int(sent[0][:8].view(torch.int64)), len(sent)]  # (its frame, broadcasts)
        receiving = True
        got = messages.receive(None, CPU)
        assert not sent, "receive read every broadcast send made"
        return frames, got

    return roundtrip


def test_steps_go_as_tensor_frames_and_control_messages_pickled(wire, monkeypatch):
    pickles = []
    real_dumps = pickle.dumps
    monkeypatch.setattr(messages.pickle, "dumps", lambda obj: pickles.append(obj) or real_dumps(obj))
    for name, message in STEPS.items():
        frames, got = wire(message)
        assert frames == [messages.STEP_FRAME, 1], name  # the whole step in one broadcast
        assert_same(got, message, name)
    assert pickles == []  # no step was pickled
    control = [("runner", 64, 16, torch.bfloat16, True, 2048, False, 8), ("lora_install", True), ("compiled", None), ("shutdown",)]
    for message in control:
        frames, got = wire(message)
        assert frames == [messages.PICKLED_FRAME, 1] and got == message


def test_a_step_sent_pickled_comes_back_the_same(wire):
    """The driver's pickled_steps (the old form, for benchmarks) and the fallback below."""
    for name, message in STEPS.items():
        frames, got = wire(message, pickled=True)
        assert frames == [messages.PICKLED_FRAME, 1], name
        assert_same(got, message, name, fresh=False)  # (pickle keeps a view's strides)


def test_a_step_with_a_value_the_frame_does_not_carry_goes_pickled_with_a_warning(wire, caplog, monkeypatch):
    monkeypatch.setattr(messages, "_warned", set())  # (warned once per kind and process)
    message = ("forward", (torch.tensor([1, 2]), torch.tensor([0, 1]), None, 0.25), None)
    with caplog.at_level(logging.WARNING, logger="pangu_infer.parallel"):
        frames, got = wire(message)
    assert frames == [messages.PICKLED_FRAME, 1]
    assert_same(got, message)
    assert "float" in caplog.text


def test_a_step_larger_than_the_first_broadcast_follows_in_a_second(wire):
    """A decode batch of 8 at 4096 tokens of context: 300 KB of slots and mask."""
    slots = torch.arange(8 * 4096).reshape(8, 4096)
    attn = AttentionBatch(slot_mapping=slots[:, -1].clone(), decode_slots=slots, decode_mask=torch.ones(8, 1, 1, 4096, dtype=torch.bool))
    message = ("decode", (torch.arange(8), torch.full((8,), 4095), attn), list(range(8)))
    assert messages.encode(message)[1].numel() > messages.FIRST_BYTES
    frames, got = wire(message)
    assert frames == [messages.STEP_FRAME, 2]
    assert_same(got, message)
    frames, got = wire(message, pickled=True)
    assert frames == [messages.PICKLED_FRAME, 2]
    assert_same(got, message, fresh=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_step_on_a_device_comes_back_on_the_workers_device():
    """Rank 0's inputs on its device go through the host; the worker's land on its own device."""
    cuda = torch.device("cuda")
    kind, (ids, pos, attn), rows = STEPS["forward"]
    on_device = messages.decode(*messages.encode((kind, (ids.to(cuda), pos.to(cuda), attn), rows)), cuda)
    assert on_device[1][0].device.type == "cuda" and on_device[1][2].prefills[0].kv_slots.device.type == "cuda"
    assert_same(messages.decode(*messages.encode(on_device), CPU), STEPS["forward"])


def test_every_step_a_real_runner_mirrors_goes_as_a_frame_and_comes_back_equal(tiny_dense_dir):
    """One process, the runner's mirror set as the driver sets it: prefill chunks with and without
    masks, decode groups, a prediction's drafts, embeddings, logits() (no attention metadata) and a
    beam search's KV copies; each message encodes (no pickled fallback) and decodes equal."""
    from pangu_infer import LLM, BeamSearchParams, SamplingParams

    llm = LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=1 << 24, enforce_eager=True,
              max_num_batched_tokens=16)  # (a 35-token prompt in chunks: later chunks have causal masks)
    seen: dict[str, int] = {}

    def mirror(kind, inputs):
        message = (kind, inputs, None)
        assert_same(messages.decode(*messages.encode(message), CPU), message, kind)
        attn = inputs[2] if kind != "copy" else None
        for what, there in (("mask", attn is not None and any(p.causal_mask is not None for p in attn.prefills)),
                            ("groups", attn is not None and bool(attn.decode_groups)), ("no attn", kind == "forward" and attn is None)):
            seen[what] = seen.get(what, 0) + there
        seen[kind] = seen.get(kind, 0) + 1

    llm.engine.runner.mirror = mirror
    prompts = [{"prompt_token_ids": list(range(5, 17))}, {"prompt_token_ids": list(range(40, 75))}]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    first = llm.generate(prompts, greedy, use_tqdm=False)[0].outputs[0].token_ids
    llm.generate(prompts[0], SamplingParams(**{**greedy.__dict__, "prediction": first}), use_tqdm=False)
    llm.embed(prompts, use_tqdm=False)
    llm.logits(list(range(3, 20)))
    llm.beam_search(prompts[1], BeamSearchParams(beam_width=2, max_tokens=4, ignore_eos=True))
    assert seen["forward"] > 10 and all(seen.get(k, 0) > 0 for k in ("copy", "mask", "groups", "no attn")), seen
