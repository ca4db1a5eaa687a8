"""Tiny random checkpoints with the real Pangu tensor names and config fields, built once per session."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from pangu_infer.loader.random import pangu_dense_config, pangu_moge_config, random_state_dict, write_checkpoint

TINY_LAYERS = 2


def _inv_freq_tensors(config: dict) -> dict[str, torch.Tensor]:
    """The real 7B checkpoint stores these unused buffers; the loader must skip them."""
    half = config["hidden_size"] // config["num_attention_heads"] // 2
    return {
        f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(half) for i in range(config["num_hidden_layers"])
    }


def build_tiny_model(
    directory: Path,
    config: dict,
    tokenizer_dir: Path | None = None,
    num_shards: int = 1,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Path:
    """A complete model folder: config, weights (with inv_freq buffers), tokenizer, generation config."""
    tensors = random_state_dict(config, seed=seed, dtype=dtype)
    write_checkpoint(str(directory), config, tensors, num_shards=num_shards, extra_tensors=_inv_freq_tensors(config))
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            shutil.copy(f, directory / f.name)
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"], "do_sample": False}
    (directory / "generation_config.json").write_text(json.dumps(gen))
    return directory


def add_mlp_noise(directory: Path, scale: float = 0.15, seed: int = 7) -> Path:
    """The model folder's weights with noise on its MLPs, in place: as a draft, a model that agrees
    with the original often, not always (speculative decoding's tests)."""
    from safetensors.torch import load_file, save_file

    path = Path(directory) / "model.safetensors"
    tensors = load_file(str(path))
    g = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if ".mlp." in name:
            tensors[name] = t + scale * t.std() * torch.randn(t.shape, generator=g)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return Path(directory)


def _tiny_vocab(tokenizer_dir: Path) -> tuple[int, int]:
    from pangu_infer.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    return tok.vocab_size, tok.eos_token_id


@pytest.fixture(scope="session")
def tiny_dense_config(pangu_tokenizer_dir: Path) -> dict:
    vocab, eos = _tiny_vocab(pangu_tokenizer_dir)
    return pangu_dense_config(vocab_size=vocab, eos_token_id=eos, num_hidden_layers=TINY_LAYERS)


@pytest.fixture(scope="session")
def tiny_moge_config(pangu_tokenizer_dir: Path) -> dict:
    vocab, eos = _tiny_vocab(pangu_tokenizer_dir)
    return pangu_moge_config(vocab_size=vocab, eos_token_id=eos, num_hidden_layers=TINY_LAYERS)


@pytest.fixture(scope="session")
def tiny_dense_dir(tmp_path_factory, tiny_dense_config, pangu_tokenizer_dir) -> Path:
    """openPangu-Embedded layout (q/k/v/o biases, inv_freq buffers), fp32, one file."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_dense"), tiny_dense_config, pangu_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_moge_dir(tmp_path_factory, tiny_moge_config, pangu_tokenizer_dir) -> Path:
    """Pangu Pro MoE layout: 64 experts in 8 groups, shared expert, router_scale; fp32, one file."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_moge"), tiny_moge_config, pangu_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_r72b_config(pangu_tokenizer_dir: Path) -> dict:
    """openPangu-R-72B-2512's layout at tiny widths: 8 heads / 2 KV heads of K 24 (rope 8) and
    V 16, 4 sinks with values, layer 0 dense, 16 experts top-4 with a correction bias, 2 shared."""
    from pangu_infer.loader.random import pangu_r72b_config

    vocab, eos = _tiny_vocab(pangu_tokenizer_dir)
    return pangu_r72b_config(vocab_size=vocab, eos_token_id=eos)


@pytest.fixture(scope="session")
def tiny_ultra_config(pangu_tokenizer_dir: Path) -> dict:
    """openPangu-Ultra-MoE-718B's layout at tiny widths: MLA (q rank 24, kv rank 32, nope 16,
    rope 8, v 16), layer 0 dense, 16 experts top-4, 1 shared, sandwich norm."""
    from pangu_infer.loader.random import pangu_ultra_config

    vocab, eos = _tiny_vocab(pangu_tokenizer_dir)
    return pangu_ultra_config(vocab_size=vocab, eos_token_id=eos)


@pytest.fixture(scope="session")
def tiny_r72b_dir(tmp_path_factory, tiny_r72b_config, pangu_tokenizer_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_r72b"), tiny_r72b_config, pangu_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_ultra_dir(tmp_path_factory, tiny_ultra_config, pangu_tokenizer_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_ultra"), tiny_ultra_config, pangu_tokenizer_dir)


def random_moge_block(seed: int = 0, **overrides):
    """A MoGEBlock of the tiny config (64 experts, 8 groups; `overrides` of pangu_moge_config) with
    random fp32 weights of unit-ish scale and router scales in [0.5, 1.5)."""
    from pangu_infer.config import ModelConfig
    from pangu_infer.models.moge import MoGEBlock

    cfg = ModelConfig.from_hf_dict(pangu_moge_config(vocab_size=128, **overrides))
    block = MoGEBlock(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn(param.shape, generator=g) / param.shape[-1] ** 0.5)
        block.router_scale.copy_(0.5 + torch.rand(block.router_scale.shape, generator=g))
    return block


@pytest.fixture
def slow_fx_trace_build(monkeypatch):
    """The compile thread's build replaced by what inductor does mid-compile and nothing else: it
    traces loop_body.InterpreterShim's placeholder graph with torch.fx (which replaces
    nn.Module.__call__ for the whole process while it runs), here made to take 1.5 s; then no
    graph (decoding stays eager). Returns the event set once that trace has ended."""
    import functools
    import threading
    import time

    import pangu_infer.engine.runner as runner_module
    from torch._inductor import loop_body

    def slow_placeholder():
        def identity(x):
            time.sleep(1.5)
            return x

        return torch.fx.symbolic_trace(identity)

    monkeypatch.setattr(loop_body.InterpreterShim, "_dummy_gm", staticmethod(functools.cache(slow_placeholder)))
    built = threading.Event()

    def build(*args, **kwargs):
        loop_body.InterpreterShim._dummy_gm()
        built.set()
        return None, "a stand-in build"

    monkeypatch.setattr(runner_module, "build_decode_step", build)
    return built


@pytest.fixture
def compiling_elsewhere():
    """While the test runs, another thread sits inside a torch.compile session (its backend waits),
    as the engine's background thread does while it compiles the decode step beside live requests.
    torch 2.13 holds torch.compiler.is_compiling() True for the whole process meanwhile."""
    inside, release = threading.Event(), threading.Event()

    def backend(gm, example_inputs):
        inside.set()
        release.wait(120)
        return gm.forward

    thread = threading.Thread(target=lambda: torch.compile(lambda x: x + 1, backend=backend)(torch.zeros(2)), daemon=True)
    thread.start()
    assert inside.wait(120), "the compile in the other thread never reached its backend"
    assert torch.compiler.is_compiling()  # what the code must not be misled by
    yield
    release.set()
    thread.join(120)
