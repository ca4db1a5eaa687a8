"""The `pangu-infer` command (also `python -m pangu_infer`): generate | chat | serve | run-batch | plan | quantize | bench."""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import re
import sys
import time
from typing import Optional

from pangu_infer.parallel.errors import ParallelStartupError

# command -> module that defines add_arguments(parser) and run(args) -> int
EXTERNAL_COMMANDS = {
    "serve": ("pangu_infer.server.cli", "serve the OpenAI-compatible HTTP API"),
    "run-batch": ("pangu_infer.batch", "answer a file of OpenAI Batch API requests offline (vLLM's run-batch)"),
    "plan": ("pangu_infer.plan", "print parameters, weight and KV memory, and how much context fits"),
    "quantize": ("pangu_infer.quant.cli", "write a pre-quantized int8/int4 checkpoint"),
    "bench": ("pangu_infer.bench", "measure prefill, decode and throughput against the memory-bandwidth limit"),
}


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that loads a model; names match the LLM/EngineConfig fields."""
    from pangu_infer.sampling_params import MAX_LOGPROBS

    p.add_argument("--model", "-m", default=None, help="model folder, .gguf file or hub id (default: the demo model; -m: llama.cpp's)")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (default: auto)")
    p.add_argument("--device", default=None, help="cpu | cuda | npu (default: the best present)")
    p.add_argument(
        "--quantization", default="auto", choices=["auto", "none", "int8", "int4"],
        help="weight-only quantization: auto (default) keeps the checkpoint's own (a .gguf file's Q4 blocks as int4, "
        "other block types as int8), none loads float weights in --dtype, int8/int4 quantize while loading "
        "(int4: groups of 128 weights, 32 for .gguf files)",
    )
    p.add_argument("--offload-experts", action="store_true", help="MoE models: keep routed experts memory-mapped from the checkpoint, paged in as used")
    p.add_argument(
        "--tensor-parallel-size", "-tp", type=int, default=1,
        help="ranks that split the model (heads, MLP columns, MoGE expert groups); spawned here, or one per torchrun process "
        "(-tp: vLLM's spelling)",
    )
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                   help="vLLM's: 1, the only value here (--tensor-parallel-size splits a model over devices)")
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="vLLM's: 1, the only value here (one engine per server: run a server per device group behind a balancer)")
    p.add_argument("--seed", type=int, default=None, help="engine seed for unseeded sampling")
    p.add_argument(
        "-t", "--threads", type=int, default=None,
        help="CPU threads for the products, as llama.cpp's -t (default: the cores this process may use, "
        "fewer where a container's CPU quota allows fewer; OMP_NUM_THREADS is respected); tensor-parallel "
        "ranks on the CPU share them",
    )
    p.add_argument("--max-model-len", "-c", "--ctx-size", dest="max_model_len", type=_token_count, default=None,
                   help="context length limit, e.g. 4096, 4k (4000) or 4K (4096) as vLLM reads it (-c/--ctx-size: llama.cpp's spelling)")
    p.add_argument("--max-num-seqs", "-np", "--parallel", dest="max_num_seqs", type=int, default=64,
                   help="sequences batched per step (-np/--parallel: llama.cpp's spelling)")
    p.add_argument("--max-num-batched-tokens", type=_token_count, default=None,
                   help="tokens per step, decodes and prefill chunks together (default 2048; with --no-enable-chunked-prefill, "
                   "at least --max-model-len)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--kv-cache-memory", type=_memory, default=None, help="KV cache bytes (e.g. 2GiB) or a fraction of free memory (e.g. 0.5)")
    p.add_argument(
        "--gpu-memory-utilization", type=float, default=None,
        help="GPUs and NPUs: the share of the device's whole memory this engine fills, weights, activations and "
        "KV cache together, as vLLM's flag (e.g. 0.9); the KV cache gets the rest after the weights",
    )
    p.add_argument(
        "--kv-cache-dtype", default=None, choices=["auto", "float32", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2"],
        help="the KV cache's dtype: auto is the model's (as vLLM); not given, bfloat16 where the model runs in "
        "float32 only because the CPU lacks native bf16 products (half the memory, same speed), else the model's; "
        "fp8 (e4m3, as vLLM's), fp8_e4m3 or fp8_e5m2: one byte a value, scale 1, half a bf16 cache's memory "
        "(read back into the model's dtype for attention)",
    )
    p.add_argument("--no-prefix-caching", "--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="turn prefix caching off (--no-enable-prefix-caching: vLLM's spelling)")
    p.add_argument("--enable-prefix-caching", dest="enable_prefix_caching", action="store_true",
                   help="prefix caching on: the default (vLLM's flag, taken so its command lines work)")
    p.add_argument("--tokenizer-mode", choices=["auto", "slow"], default="auto",
                   help="auto or slow, as vLLM's: the same here (Pangu's tokenizer.model is always encoded by SentencePiece's own "
                   "rules, the slow tokenizer's; openPangu's vLLM commands pass slow)")
    p.add_argument("--load-format", choices=["auto", "safetensors", "gguf", "dummy"], default="auto",
                   help="vLLM's: auto (the default) reads a model folder's safetensors or a .gguf file, as the model is; "
                   "safetensors or gguf say which, and a model of the other kind is refused; dummy: random weights "
                   "from the model folder's config.json (a hub model's config and tokenizer alone are downloaded), "
                   "quantized as --quantization says, for timing a model without its weights")
    p.add_argument("--enable-chunked-prefill", dest="enable_chunked_prefill", action="store_true", default=True,
                   help="prompts longer than what is left of a step's --max-num-batched-tokens are prefilled in chunks beside "
                   "the decodes: the default (vLLM's flag)")
    p.add_argument("--no-enable-chunked-prefill", dest="enable_chunked_prefill", action="store_false",
                   help="each prompt is prefilled in one step, waiting for a step whose budget holds it whole "
                   "(--max-num-batched-tokens then at least --max-model-len; vLLM's flag)")
    p.add_argument("--distributed-executor-backend", choices=["mp", "uni", "external_launcher", "ray"], default=None,
                   help="vLLM's: mp (the ranks of --tensor-parallel-size are processes this one starts: the default here), "
                   "external_launcher (torchrun started them), uni (one process, --tensor-parallel-size 1); ray is not used")
    p.add_argument("--revision", default=None, help="a model on the hub: the branch, tag or commit to download (vLLM's flag)")
    p.add_argument("--download-dir", default=None, help="a model on the hub: the folder to download it into (vLLM's flag)")
    p.add_argument("--tokenizer", default=None,
                   help="a folder or hub id whose tokenizer (and chat template) is used instead of the model's, as vLLM's flag")
    p.add_argument("--tokenizer-revision", default=None,
                   help="the tokenizer on the hub: the branch, tag or commit to download (of --tokenizer, else of the model's "
                   "own; vLLM's flag)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="taken so vLLM's command lines work: nothing in a model folder is ever run here, so there is nothing to trust")
    p.add_argument(
        "--num-speculative-tokens", type=int, default=0,
        help="speculative decoding: draft tokens per step (0 = off; with --speculative-model: 4), drafted by "
        "prompt lookup unless a draft model is given",
    )
    p.add_argument("--speculative-ngram", type=int, default=3, help="longest n-gram prompt lookup matches (default: 3)")
    p.add_argument(
        "--speculative-model", default=None,
        help="a smaller model of the same tokenizer (folder, .gguf file or hub id) that drafts the tokens, "
        "as llama.cpp's --model-draft",
    )
    p.add_argument(
        "--speculative-config", type=_json_object, default=None,
        help='vLLM\'s speculative config as JSON, e.g. \'{"model": "draft.gguf", "num_speculative_tokens": 4}\' '
        'or \'{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}\'',
    )
    p.add_argument(
        "--enforce-eager", action="store_true",
        help="never torch.compile (by default decode steps run compiled, built at startup: about a minute "
        "the first time on a small CPU, seconds from the cache after)",
    )
    p.add_argument(
        "--no-model-cache", action="store_true",
        help="convert a .gguf file on every start instead of mapping its converted form from "
        "~/.cache/pangu-infer/models (same as PANGU_INFER_MODEL_CACHE=0)",
    )
    p.add_argument(
        "--batch-invariant", action="store_true",
        help="every request's tokens and logprobs bitwise the same whatever else is in the batch "
        "(greedy and seeded requests; costs speed, see the README)",
    )
    p.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters (PEFT folders or GGUF adapter files) beside the base model")
    p.add_argument("--max-loras", type=int, default=4, help="LoRA adapters held at once (default: 4)")
    p.add_argument("--max-lora-rank", type=int, default=16, help="the highest LoRA rank accepted (default: 16, as vLLM; each adapter slot is this wide)")
    p.add_argument(
        "--generation-config", default="auto", metavar="auto|vllm|FOLDER",
        help="where the default sampling values of a request that omits them come from (vLLM's flag): auto "
        "(default) the model's generation_config.json, vllm the engine's own defaults (the file ignored), or a "
        "folder holding a generation_config.json; keys read: temperature, top_p, top_k, min_p, "
        "repetition_penalty, max_new_tokens (the default max_tokens; a FOLDER's also caps a server request's "
        "own max_tokens, as vLLM's), do_sample false (greedy)",
    )
    p.add_argument(
        "--override-generation-config", default=None, metavar="JSON",
        help='default sampling values over those --generation-config chose, as a JSON object (vLLM\'s flag), '
        'e.g. \'{"temperature": 0.5, "top_p": 0.9}\'; a request\'s own values still win, except that its '
        '"max_new_tokens" also caps a server request\'s own max_tokens (vLLM\'s server-wide limit)',
    )
    p.add_argument(
        "--max-logprobs", type=int, default=MAX_LOGPROBS,
        help=f"the most top logprobs a token of a request may ask for (logprobs, top_logprobs, prompt_logprobs; "
        f"default: {MAX_LOGPROBS}, OpenAI's and vLLM's); -1: no limit, every token of the vocabulary (vLLM's flag)",
    )
    p.add_argument(
        "--scheduling-policy", default="fcfs", choices=["fcfs", "priority"],
        help="fcfs (default): requests run in arrival order; priority: by each request's priority, lower first "
        "(vLLM's; the running request of lowest priority is preempted when KV blocks run out)",
    )


def add_chat_template_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--chat-template", default=None, metavar="FILE_OR_TEMPLATE", type=_chat_template_argument,
        help="render chats with this Jinja template (a file's path, or the template itself, its \\n and "
        "other backslash escapes read as vLLM reads them) instead of the model's own, as vLLM's --chat-template",
    )
    p.add_argument(
        "--chat-template-file", dest="chat_template", default=None, metavar="FILE", type=_chat_template_file,
        help="the same from a file that must exist (llama.cpp's flag)",
    )
    p.add_argument("--jinja", action="store_true",
                   help="taken so llama.cpp's command lines work: chat templates are always Jinja here")


_ESCAPE = re.compile(r"\\(?:u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|x[0-9a-fA-F]{2}|N\{[^}]*\}|[0-7]{1,3}|[\\'\"abfnrtv])")


def _chat_template_file(path: str) -> str:
    """--chat-template-file: a path to an existing file (argparse names the flag when it is not)."""
    if not os.path.isfile(os.path.expanduser(path)):
        raise argparse.ArgumentTypeError(f"{path!r}: no such file")
    return path


def _chat_template_argument(text: str) -> str:
    """A template typed on the command line has no newlines, only `\\n`: as vLLM does, backslash
    escapes of a template given inline (not a file's path) are decoded (vLLM: Python's unicode_escape;
    here escape by escape, so that non-ASCII text in the template stays as typed)."""
    import codecs

    try:
        if os.path.isfile(os.path.expanduser(text)):
            return text
    except (OSError, ValueError):
        pass
    return _ESCAPE.sub(lambda m: codecs.decode(m.group(0), "unicode_escape"), text)


def llm_kwargs(args: argparse.Namespace) -> dict:
    """LLM's keyword arguments from the model flags; a bad --generation-config or
    --override-generation-config is a ValueError naming the flag (before anything loads)."""
    from pangu_infer.generation_config import check_generation_config, check_override
    from pangu_infer.parallel.launch import check_executor_backend

    check_generation_config(args.generation_config, "--generation-config")
    check_executor_backend(args.distributed_executor_backend, args.tensor_parallel_size, cli=True)
    from pangu_infer.loader import check_load_format

    check_load_format(args.load_format, getattr(args, "model", None) or getattr(args, "model_tag", None), "--load-format", "--model")
    if args.pipeline_parallel_size != 1:
        raise ValueError(f"--pipeline-parallel-size {args.pipeline_parallel_size}: pipeline parallelism is not done here; "
                         "--tensor-parallel-size N splits the model over N devices")
    if args.data_parallel_size != 1:
        raise ValueError(f"--data-parallel-size {args.data_parallel_size}: one engine per server here; run a server per "
                         "device (or --tensor-parallel-size group) behind a load balancer")
    override = check_override(args.override_generation_config, "--override-generation-config")
    if getattr(args, "no_model_cache", False):
        os.environ["PANGU_INFER_MODEL_CACHE"] = "0"  # read by the loader (loader/model_cache.py)
    return dict(
        tokenizer=args.tokenizer,
        tokenizer_revision=args.tokenizer_revision,
        revision=args.revision,
        download_dir=args.download_dir,
        dtype=args.dtype,
        device=args.device,
        quantization=args.quantization,
        offload_experts=args.offload_experts,
        tensor_parallel_size=args.tensor_parallel_size,
        seed=args.seed,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_chunked_prefill=args.enable_chunked_prefill,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_dtype=args.kv_cache_dtype,
        enable_prefix_caching=args.enable_prefix_caching,
        num_speculative_tokens=args.num_speculative_tokens,
        speculative_ngram=args.speculative_ngram,
        speculative_model=args.speculative_model,
        speculative_config=args.speculative_config,
        enforce_eager=args.enforce_eager,
        batch_invariant=args.batch_invariant,
        enable_lora=args.enable_lora or bool(getattr(args, "lora", None)),
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        scheduling_policy=args.scheduling_policy,
        max_logprobs=args.max_logprobs,
        load_format=args.load_format,
        threads=args.threads,
        generation_config=args.generation_config,
        override_generation_config=override or None,
        **({"chat_template": args.chat_template} if getattr(args, "chat_template", None) is not None else {}),
    )


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"invalid JSON {text!r}: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
    return value


_TOKEN_COUNT = re.compile(r"(\d+(?:\.\d+)?)([kmgtKMGT]?)")
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _token_count(text: str) -> int:
    """A count of tokens as vLLM's flags read one: '4096'; with a lowercase suffix, powers of 1000 ('4k'
    4000, '25.6k' 25600); with an uppercase one, powers of 1024 ('4K' 4096; whole numbers only)."""
    m = _TOKEN_COUNT.fullmatch(text.strip())
    if m is None or (m[2] in _BINARY and "." in m[1]) or (not m[2] and "." in m[1]):
        raise argparse.ArgumentTypeError(f"invalid token count {text!r}: expected e.g. 4096, 4k (4000) or 4K (4096)")
    number, suffix = m[1], m[2]
    if suffix in _DECIMAL:
        return int(float(number) * _DECIMAL[suffix])
    return int(number) * _BINARY.get(suffix, 1)


def _memory(text: str):
    """'2GiB', '512MB', '1073741824' -> bytes; '0.5' -> a fraction of free memory."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    t = text.strip().lower()
    for suffix, mult in units.items():
        if t.endswith(suffix):
            try:
                return int(float(t[: -len(suffix)]) * mult)
            except (ValueError, OverflowError):  # (int() of nan, of inf)
                break
    try:
        return int(t) if t.isdigit() else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid memory size {text!r}: expected e.g. 2GiB, 512MB or 0.5") from None


DEFAULT_MAX_TOKENS = 256  # generate and chat, where neither --max-tokens nor the generation config gives one


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-tokens", "-n", "--n-predict", dest="max_tokens", type=int, default=None,
        help=f"the reply's length limit in tokens (default: max_new_tokens of the generation config, else {DEFAULT_MAX_TOKENS})",
    )
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's generation_config)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample from the most likely tokens whose probabilities add up to this (default: the model's generation_config, else 1: all)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample from this many most likely tokens (default: the model's generation_config, else 0: all)")
    p.add_argument("--min-p", type=float, default=None,
                   help="drop tokens less likely than this times the most likely one's probability (default: the model's generation_config, else 0)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="above 1 makes tokens of the prompt and the reply less likely (default: the model's generation_config, else 1: none)")
    p.add_argument("--sample-seed", dest="sample_seed", type=int, default=None, help="seed of this request's sampling")
    p.add_argument("--ignore-eos", action="store_true",
                   help="go on past the end-of-sequence token, up to --max-tokens (llama.cpp's flag, vLLM's ignore_eos: for timing runs)")


def _sampling_changes(args: argparse.Namespace) -> dict:
    changes = {} if args.max_tokens is None else {"max_tokens": args.max_tokens}
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.sample_seed is not None:
        changes["seed"] = args.sample_seed
    if args.ignore_eos:
        changes["ignore_eos"] = True
    return changes


def sampling_params(llm, args: argparse.Namespace):
    """The defaults of the generation config (--generation-config, --override-generation-config),
    overridden by the flags given."""
    from dataclasses import replace

    changes = _sampling_changes(args)
    if "max_tokens" not in changes and llm.default_max_tokens is None:
        changes["max_tokens"] = DEFAULT_MAX_TOKENS
    return replace(llm.default_sampling_params(), **changes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pangu-infer", description="Run Pangu and Llama-family models")
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine details")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete one prompt and print the text")
    add_model_arguments(g)
    add_sampling_arguments(g)
    g.add_argument("--prompt", "-p", required=True, help="the prompt text (-p: llama.cpp's)")
    g.add_argument("--lora", default=None, metavar="PATH", help="answer with this LoRA adapter (a PEFT folder or a GGUF adapter file, as llama.cpp's --lora) on the model")
    g.add_argument("--stats", action="store_true", help="print the load time and tokens/s to stderr")

    c = sub.add_parser(
        "chat", help="chat in the terminal: streamed replies, reasoning apart, line editing and history, /help for commands",
    )
    add_model_arguments(c)
    add_sampling_arguments(c)
    add_chat_template_argument(c)
    c.add_argument("--system", default=None, help="system prompt (also /system TEXT in the chat)")
    c.add_argument(
        "--thinking", default=None, choices=["on", "off", "auto"],
        help="Pangu thinking mode (also /think in the chat; default: the model's, which thinks)",
    )
    c.add_argument(
        "--message", action="append", default=None,
        help="ask this instead of reading stdin (repeatable; /commands work here too)",
    )
    c.add_argument("--stats", action="store_true", help="print the load time, and tokens/s after each reply")
    c.add_argument("--lora", default=None, metavar="PATH", help="chat with this LoRA adapter (a PEFT folder or a GGUF adapter file) on the model")

    for name, (module, help_text) in EXTERNAL_COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        try:
            importlib.import_module(module).add_arguments(p)
        except ImportError:
            p.set_defaults(_unavailable=module)
    for p in sub.choices.values():
        # -v after the command too (`pangu-infer serve -v`); SUPPRESS leaves a -v before it standing
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log engine details (also before the command)")
    return parser


# Commands that end when their answer is printed: the process then exits at once (`command`).
ONE_SHOT_COMMANDS = ("generate", "chat")


def command() -> None:
    """The `pangu-infer` command (and `python -m pangu_infer`): `main`, and after a one-shot
    command (generate, chat) an immediate exit once the output is flushed. That skips the
    interpreter's teardown of torch (seconds on a busy machine; benchmarks/startup.py) and never
    waits for a compiled decode step still building in the background."""
    # What was imported lives as long as the process: out of the garbage collector's walks
    # (each full collection walked torch's objects again, ~0.1 s; benchmarks/RESULTS.md, startup).
    gc.freeze()
    rc = main(exit_when_done=True)
    sys.exit(rc)


def main(argv: Optional[list[str]] = None, exit_when_done: bool = False) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command in ONE_SHOT_COMMANDS:
            if sys.stdout is None:  # (`>&-`: Python leaves sys.stdout None), before the model loads
                raise ValueError("stdout is closed: nowhere to write the reply")
            rc = _generate(args) if args.command == "generate" else _chat(args)
            if exit_when_done:
                _exit_now(rc)
            return rc
        if getattr(args, "_unavailable", None):
            print(f"pangu-infer {args.command}: not available in this build ({args._unavailable} is missing)", file=sys.stderr)
            return 2
        return importlib.import_module(EXTERNAL_COMMANDS[args.command][0]).run(args)
    except (ValueError, OSError, ParallelStartupError) as e:
        # Every user mistake (bad path, config, parameter) ends as one clear line, not a traceback.
        print(f"pangu-infer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _exit_now(rc: int) -> None:
    """Flush what was written and end the process without the interpreter's teardown (after a model
    cache write still running in the background: os._exit skips the atexit hook that waits for it)."""
    model_cache = sys.modules.get("pangu_infer.loader.model_cache")
    if model_cache is not None:
        model_cache.finish_writes()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # (a stream closed when the process started)
                stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be written anyway
            pass
    os._exit(rc)


def _load(args: argparse.Namespace):
    from pangu_infer.llm import LLM
    from pangu_infer.sampling_params import SamplingParams

    if hasattr(args, "max_tokens"):
        SamplingParams(**_sampling_changes(args))  # a bad flag fails before the model loads

    # Loading makes many long-lived objects (modules, the tokenizer) and little garbage: no
    # collection walks them while they are made, and they join the frozen ones after.
    collecting = gc.isenabled()
    gc.disable()
    try:
        llm = LLM(args.model, **llm_kwargs(args))
    finally:
        gc.freeze()
        if collecting:
            gc.enable()
    if getattr(args, "lora", None):
        from pangu_infer.lora import LoRARequest

        # Read now: a bad adapter is one line before any prompt (and --stats' load time counts it).
        args.lora_request = LoRARequest(os.path.basename(os.path.normpath(args.lora)) or "lora", 1, args.lora)
        llm.engine.add_lora(args.lora_request)
    if getattr(args, "stats", False):
        print(load_line(llm), file=sys.stderr)
    return llm


def load_line(llm) -> str:
    """The --stats line about loading: the time to a ready engine, and where the compiled decode
    step (built on a background thread) stands."""
    runner = llm.engine.runner
    if runner.compiling:
        state = ", compiled decode building in the background"
    elif runner.decode_forward is not None:
        state = f", compiled decode ready after {runner.compile_seconds:.2f} s" if runner.compile_seconds else ""
    else:
        state = ", decoding eagerly"
    return f"[loaded in {llm.load_seconds:.2f} s{state}]"


def _generate(args: argparse.Namespace) -> int:
    from pangu_infer.engine.spec_decode import acceptance_words

    llm = _load(args)
    params = sampling_params(llm, args)
    start = time.perf_counter()
    out = llm.generate(args.prompt, params, use_tqdm=False, lora_request=getattr(args, "lora_request", None))[0]
    elapsed = time.perf_counter() - start
    print(out.outputs[0].text)
    if args.stats:
        n = len(out.outputs[0].token_ids)
        print(f"[{n} tokens in {elapsed:.2f} s, {n / elapsed:.1f} tokens/s{acceptance_words(llm.engine)}]", file=sys.stderr)
    if out.error is not None:  # ended early: what it wrote is above, why here (the log has an engine fault's traceback)
        print(f"pangu-infer generate: the reply ended early: {out.error}", file=sys.stderr)
        return 1
    return 0


def _chat(args: argparse.Namespace) -> int:
    from pangu_infer.chat_session import run_chat

    if not args.message and sys.stdin is None:  # (`<&-`: Python leaves sys.stdin None)
        raise ValueError("stdin is closed and no --message was given: nothing to answer")
    llm = _load(args)
    return run_chat(llm, args, sampling_params(llm, args))


if __name__ == "__main__":
    command()
