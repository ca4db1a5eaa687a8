"""LLM: the offline Python entry point (load, generate, chat, logits), shaped like vLLM's."""

from __future__ import annotations

import itertools
import os
import threading
import time
import weakref
from dataclasses import replace
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from pangu_infer.cpu_threads import check_threads, configure_threads
from pangu_infer.device import resolve_device, resolve_dtype
from pangu_infer.engine.engine import EngineConfig, LLMEngine, check_draft_config, check_pooling, default_kv_cache_dtype, embedding_params
from pangu_infer.engine.spec_decode import SpeculativeSettings, speculative_settings
from pangu_infer.errors import RequestError, short_repr
from pangu_infer.generation_config import check_generation_config, check_model_file, check_model_folder, check_override, sampling_defaults
from pangu_infer.loader import (
    LoadedModel, ModelNotFoundError, check_load_format, demo_model_path, is_local_model, load_serving_model, read_config, resolve_model_path,
    resolve_tokenizer_path,
)
from pangu_infer.lora import LoRARequest
from pangu_infer.outputs import BeamSearchOutput, EmbeddingRequestOutput, RequestOutput
from pangu_infer.parallel.launch import check_executor_backend, load_tensor_parallel
from pangu_infer.parallel.state import check_tensor_parallel_size
from pangu_infer.sampling_params import MAX_LOGPROBS, BeamSearchParams, SamplingParams

PromptType = Union[str, dict, list[int]]


class LLM:
    """Load a model (folder, .gguf file or hub id) and generate with it.

    >>> llm = LLM("path/to/openPangu-Embedded-7B", dtype="bfloat16")
    >>> llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=16))[0].outputs[0].text

    quantization: "auto" (default) keeps the checkpoint's own quantization (a GGUF file's Q4 blocks
    as int4, its other block types as int8); "none" loads float weights in `dtype`; "int8"/"int4"
    quantize while loading (docs/design.md, "Quantized weights").

    distributed_executor_backend: as vLLM's, how the tensor_parallel_size ranks start: "mp"
    (processes this one starts, the default here), "external_launcher" (torchrun started each, one
    LLM per rank), "uni" (one process); "ray" is a ValueError (Ray is not used).

    max_num_batched_tokens, enable_chunked_prefill: as vLLM's, the tokens one step forwards (decodes
    and prefill chunks together; default 2048) and whether a prompt longer than what is left of a
    step's budget is prefilled in chunks beside the decodes (the default) or waits for a step that
    holds it whole (False: the budget must be at least max_model_len, and defaults to that).

    tokenizer: as vLLM's, a folder (or hub id) whose tokenizer is used instead of the model's own
    (whose tokenizer files are then never read); its vocabulary must fit the model's. Its chat
    template comes with it. trust_remote_code: taken so vLLM's calls work; nothing in a model
    folder is ever run here, so there is nothing to trust. skip_tokenizer_init: as vLLM's, no
    tokenizer at all (none is read): prompts are token ids, outputs carry token ids and empty texts,
    and what needs one (text prompts, chat, stop strings, bad_words) is a ValueError. revision,
    download_dir: as vLLM's, for a model named by its hub id: the branch, tag or commit, and the
    folder the download goes to (a ValueError for a local path). tokenizer_revision: as vLLM's, the
    branch, tag or commit of the tokenizer on the hub: of `tokenizer`'s hub id, or, with no
    tokenizer given, of the model's own (a ValueError where that is a local path).
    """

    def __init__(
        self,
        model: Optional[str] = None,
        *,
        tokenizer: Optional[str] = None,
        tokenizer_revision: Optional[str] = None,
        revision: Optional[str] = None,
        download_dir: Optional[str] = None,
        skip_tokenizer_init: bool = False,
        trust_remote_code: bool = False,
        dtype: Union[str, torch.dtype, None] = None,
        device: Optional[str] = None,
        quantization: Optional[str] = "auto",
        offload_experts: bool = False,
        tensor_parallel_size: int = 1,
        distributed_executor_backend: Optional[str] = None,
        seed: Optional[int] = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: Optional[int] = None,
        enable_chunked_prefill: bool = True,
        block_size: int = 16,
        kv_cache_memory: Union[None, int, float] = None,
        gpu_memory_utilization: Optional[float] = None,
        kv_cache_dtype: Optional[str] = None,
        enable_prefix_caching: bool = True,
        max_model_len: Optional[int] = None,
        num_speculative_tokens: int = 0,
        speculative_ngram: int = 3,
        speculative_model: Optional[str] = None,
        speculative_config: Optional[dict] = None,
        enforce_eager: bool = False,
        batch_invariant: bool = False,
        enable_lora: bool = False,
        max_loras: int = 4,
        max_lora_rank: int = 16,
        chat_template: Optional[str] = None,
        scheduling_policy: str = "fcfs",
        max_logprobs: int = MAX_LOGPROBS,
        load_format: str = "auto",
        threads: Optional[int] = None,
        generation_config: Optional[str] = "auto",
        override_generation_config: Optional[dict] = None,
        pooling: str = "last",
    ):
        start = time.perf_counter()
        if isinstance(model, os.PathLike):
            model = os.fspath(model)
        if model is not None and not isinstance(model, str):
            raise ValueError(f"model={short_repr(model)} must be a model folder, a .gguf file or a hub id")
        check_threads(threads)
        # load_format (vLLM's): "dummy" builds the model from its config.json with random weights
        dummy = check_load_format(load_format, model)
        # pooling: how embed() pools a prompt's final hidden states, "last" (the last token's, vLLM's
        # default for a decoder) or "mean" (vLLM's --override-pooler-config pooling_type); checked first
        try:
            self.pooling = check_pooling(pooling)
        except RequestError as e:
            raise ValueError(str(e)) from None
        # generation_config, override_generation_config (vLLM's): where the default sampling values
        # of a request that omits them come from (pangu_infer/generation_config.py); checked first.
        chosen_config = check_generation_config(generation_config, "generation_config")
        override = check_override(override_generation_config, "override_generation_config")
        # a local folder's own file: checked before loading (a hub model's: once the load has read it)
        own_checked = chosen_config is None and model is not None and check_model_folder(model)
        # chat_template: the Jinja template chats are rendered with instead of the model's (a file's
        # path or the template itself, as vLLM's --chat-template); checked before anything loads.
        template = None if chat_template is None else _chat_template(chat_template)
        if not isinstance(trust_remote_code, bool):
            raise ValueError(f"trust_remote_code={short_repr(trust_remote_code)} must be True or False")
        if not isinstance(skip_tokenizer_init, bool):
            raise ValueError(f"skip_tokenizer_init={short_repr(skip_tokenizer_init)} must be True or False")
        if skip_tokenizer_init and tokenizer is not None:
            raise ValueError(f"skip_tokenizer_init=True and tokenizer={tokenizer!r}: give one")
        if tokenizer_revision is not None:
            if not isinstance(tokenizer_revision, str) or not tokenizer_revision.strip():
                raise ValueError(f"tokenizer_revision={short_repr(tokenizer_revision)} must be a non-empty string")
            if skip_tokenizer_init:
                raise ValueError(f"skip_tokenizer_init=True and tokenizer_revision={tokenizer_revision!r}: give one")
            if tokenizer is None:  # the model's own tokenizer, at that revision
                tokenizer = _hub_model_for_tokenizer(model, tokenizer_revision)
        own_tokenizer = None if tokenizer is None else _tokenizer(tokenizer, tokenizer_revision)  # before the model loads
        if own_tokenizer is not None:  # a local model's vocabulary is in its config: checked before its weights load
            _check_tokenizer_fits(tokenizer, own_tokenizer, _local_vocab_size(model))
        read_tokenizer = own_tokenizer is None and not skip_tokenizer_init
        check_tensor_parallel_size(tensor_parallel_size)
        check_executor_backend(distributed_executor_backend, tensor_parallel_size)
        if not isinstance(offload_experts, bool):
            raise ValueError(f"offload_experts={short_repr(offload_experts)} must be True or False")
        spec = speculative_settings(speculative_config, speculative_model, num_speculative_tokens, speculative_ngram)
        for name, value in (("revision", revision), ("download_dir", download_dir)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name}={short_repr(value)} must be a non-empty string")
        if revision is not None or download_dir is not None:  # (after every check above: a download takes long)
            model = resolve_model_path(model, revision, download_dir, weights=not dummy)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.engine_config = EngineConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_chunked_prefill=enable_chunked_prefill,
            block_size=block_size,
            kv_cache_memory=kv_cache_memory,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_dtype=kv_cache_dtype or "auto",
            enable_prefix_caching=enable_prefix_caching,
            max_model_len=max_model_len,
            seed=seed,
            num_speculative_tokens=spec.num_tokens,
            speculative_ngram=spec.ngram_max,
            speculative_ngram_min=spec.ngram_min,
            enforce_eager=enforce_eager,
            batch_invariant=batch_invariant,
            enable_lora=enable_lora,
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
            scheduling_policy=scheduling_policy,
            max_logprobs=max_logprobs,
        )
        if spec.draft_model is not None:  # before any model loads (the engine checks it again)
            check_draft_config(self.engine_config)
        # threads: CPU threads for the products (llama.cpp's -t), set for this whole process; None: the
        # cores this process may use, cut to a cgroup CPU quota (pangu_infer.cpu_threads). Set before
        # loading: the kernels measured once per machine are measured per thread count.
        configure_threads(threads)
        self.parallel = None  # rank 0's driver of the worker ranks, with tensor_parallel_size > 1
        if tensor_parallel_size > 1:
            self.loaded, self.parallel = load_tensor_parallel(
                model, tensor_parallel_size, self.dtype, self.device, quantization, offload_experts,
                bf16_weights=not batch_invariant, load_tokenizer=read_tokenizer, dummy=dummy,
            )
            self.device = self.parallel.device
        else:
            self.loaded = load_serving_model(
                model, self.dtype, self.device, load_tokenizer=read_tokenizer, quantization=quantization,
                offload_experts=offload_experts, bf16_weights=not batch_invariant,  # (the kernel's many-row path is BLAS's, not row-tiled)
                dummy=dummy,
            )
        if own_tokenizer is not None:
            try:  # (a hub model's config is known only now)
                _check_tokenizer_fits(tokenizer, own_tokenizer, self.loaded.config.vocab_size)
            except ValueError:
                if self.parallel is not None:  # the workers stop with the failed start
                    self.parallel.shutdown()
                raise
            self.loaded.tokenizer = own_tokenizer
        if kv_cache_dtype is None and dtype in (None, "auto"):  # nothing asked: the compact cache where it costs nothing
            kv = default_kv_cache_dtype(self.loaded.model, self.dtype, self.device)
            self.engine_config = replace(self.engine_config, kv_cache_dtype=kv)
        self.model = self.loaded.model
        self.config = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        if template is not None and self.tokenizer is not None:
            self.tokenizer.chat_template = template
        self.generation_config = self.loaded.generation_config  # (its eos_token_id ends sequences)
        if chosen_config is None and not own_checked:
            check_model_file(self.generation_config, "the model's generation_config.json")
        # SamplingParams keyword arguments of a request that omits them (default_sampling_params)
        self.sampling_defaults = sampling_defaults(
            self.generation_config if chosen_config is None else chosen_config, override
        )
        # The server's ceiling on every reply's length, a request's own max_tokens included (vLLM's
        # since its PR #34063): max_new_tokens of a generation config the operator chose (a
        # folder, with the override over it) or of the override; the model's own file's is only
        # the default of a request that gives no length.
        self.max_tokens_ceiling: Optional[int] = (
            override.get("max_new_tokens") if chosen_config is None else self.sampling_defaults.get("max_tokens")
        )
        # The draft model of speculative decoding (engine/draft_model.py), loaded like the target;
        # under tensor parallelism whole, on rank 0 only (vLLM's draft_tensor_parallel_size=1): its
        # forwards are rank 0's alone, and only the target's verifying forwards are mirrored.
        self.draft = None
        try:
            if spec.draft_model is not None:
                self.draft = _load_draft(spec, self.loaded, self.dtype, self.device, self.engine_config)
            self.engine = LLMEngine(
                self.model, self.tokenizer, self.engine_config, self.generation_config,
                draft_model=self.draft.model if self.draft is not None else None,
                draft_name=self.draft.source if self.draft is not None else "draft model",
            )
            self.engine_config = self.engine.engine_config  # with what the engine chose for what was left out
            if self.parallel is not None:
                self.parallel.attach(self.engine.runner)
        except BaseException as e:
            if self.parallel is not None:  # the workers stop with the failed start (no process group left behind)
                self.parallel.shutdown()
            if isinstance(e, RuntimeError) and _out_of_memory(e):  # buffers sized by the engine's settings
                ec = self.engine_config
                raise ValueError(
                    f"the engine's buffers for max_num_seqs={ec.max_num_seqs}, max_num_batched_tokens={ec.max_num_batched_tokens or 'default'}, "
                    f"num_speculative_tokens={ec.num_speculative_tokens}"
                    + (f", max_loras={ec.max_loras}, max_lora_rank={ec.max_lora_rank}" if ec.enable_lora else "")
                    + f" need more memory than there is: {str(e).splitlines()[0]}"
                ) from None
            raise
        if self.parallel is not None:
            # Stops the workers when this LLM is collected or the interpreter exits.
            self._finalizer = weakref.finalize(self, self.parallel.shutdown)
        # A background build still running when this LLM is collected would hold the model (and keep
        # another LLM's build waiting) until it ends: let it go at its next stopping point.
        self._stop_compiles = weakref.finalize(self, self.engine.stop_compile)
        self._ids = itertools.count()
        # Calls from several threads (generate, stream, embed, ...) share the engine: one steps it at
        # a time, and each step's outputs go to the mailbox of the request's own call (_outputs_for),
        # never to whichever call happened to step. Request id -> its call's mailbox (one per call).
        self._stepping = threading.Lock()
        self._mail: dict[str, list[RequestOutput]] = {}
        # Seconds from the call to a ready engine: reading weights, packing, KV cache (the compiled
        # decode step is built on a background thread meanwhile; see wait_compiled).
        self.load_seconds = time.perf_counter() - start

    def wait_compiled(self, timeout: Optional[float] = None) -> bool:
        """Wait until the compiled decode step, built on a background thread from load on, is ready
        (at most `timeout` seconds). Nothing needs to: until it is ready, decode steps run eagerly.
        Benchmarks and tests of compiled decode wait. True when decode steps now run compiled;
        False where they cannot (`enforce_eager`, no compiler, a failed compile,
        the time ran out). With a draft model, its compiled step too, within the same `timeout`;
        under tensor parallelism, every rank's (call it from the thread that runs the steps)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        ready = self.engine.runner.wait_compiled(timeout)
        if self.parallel is not None:  # every worker rank's own step too
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = all(built for built, _ in self.parallel.wait_compiled(left)) and ready
        if self.engine.speculator is not None:  # a draft model's own compiled step
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = self.engine.speculator.wait_compiled(left) and ready
        return ready

    # ------------------------------------------------------------------ generation
    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def default_sampling_params(self) -> SamplingParams:
        """The defaults of a request that gives no sampling values, like vLLM's: the release's
        generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens
        as max_tokens; do_sample false: greedy), or what generation_config chose instead, with
        override_generation_config over them."""
        return SamplingParams(**self.sampling_defaults)

    @property
    def default_max_tokens(self) -> Optional[int]:
        """max_new_tokens of the chosen generation config (or its override): the length of a reply
        whose request gives none (None: SamplingParams' default offline, the rest of the context
        on the server)."""
        return self.sampling_defaults.get("max_tokens")

    def generate(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = True,
        lora_request: Union[LoRARequest, Sequence[Optional[LoRARequest]], None] = None,
        priority: Optional[Sequence[int]] = None,
    ) -> list[RequestOutput]:
        """Prompts: a string, a list of strings, or dicts {"prompt": text} or {"prompt_token_ids": [...]},
        either with "cache_salt" (vLLM's: its blocks in the prefix cache serve only the same salt).
        lora_request: the LoRA adapter of every prompt, or one per prompt (None: the base model);
        it needs enable_lora=True. priority (vLLM's): one integer per prompt, lower served first;
        it needs scheduling_policy="priority"."""
        items = self._normalize_prompts(prompts)
        params = self._normalize_params(sampling_params, len(items))
        loras = self._normalize_loras(lora_request, len(items))
        if priority is None:
            priorities = [0] * len(items)
        elif isinstance(priority, (list, tuple)) and len(priority) == len(items):
            priorities = list(priority)
        else:
            raise ValueError(f"priority={short_repr(priority)} must be a list of integers, one per prompt ({len(items)})")
        requests = []
        for (text, ids, salt), p, lora, rank in zip(items, params, loras, priorities):
            requests.append((text, ids, p, lora, salt, rank))
        return self._run(requests, use_tqdm)

    def chat(
        self,
        messages: Union[list[dict], list[list[dict]]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        *,
        enable_thinking: Union[bool, str, None] = None,
        tools: Optional[list[dict]] = None,
        chat_template_kwargs: Optional[dict] = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        use_tqdm: bool = True,
        lora_request: Union[LoRARequest, Sequence[Optional[LoRARequest]], None] = None,
        chat_template: Optional[str] = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or several; the reply's thinking goes to .reasoning.
        continue_final_message (with add_generation_prompt=False): the reply goes on writing the
        last message, the assistant's. chat_template (vLLM's argument): a Jinja template (or its
        file's path) for these conversations instead of the model's."""
        from pangu_infer.chat import is_pangu_template, split_reasoning

        template = None if chat_template is None else _chat_template(chat_template)

        # one conversation (a list of message dicts) or several (a list of them); anything else is
        # render_chat's error about messages
        several = isinstance(messages, list) and messages and isinstance(messages[0], list)
        conversations = messages if several else [messages]
        params = self._normalize_params(sampling_params, len(conversations))
        loras = self._normalize_loras(lora_request, len(conversations))
        requests = []
        for c, (conv, p, lora) in enumerate(zip(conversations, params, loras)):
            text = self.render_chat(
                conv, enable_thinking=enable_thinking, tools=tools, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, chat_template=template, **(chat_template_kwargs or {}),
            )
            # Keep the thinking markers in the text so the reasoning can be split off below.
            p = replace(p, skip_special_tokens=False)
            if enable_thinking is not False and is_pangu_template(self.tokenizer, template):
                p = replace(p, allow_thinking=True)  # a constraint starts after the thinking part
            where = "messages" if conv is messages else f"messages[{c}]"  # (one conversation, or the c-th)
            requests.append((text, self._encode_chat(text, conv, where, tools), p, lora, None, 0))
        outputs = self._run(requests, use_tqdm)
        for out in outputs:
            for comp in out.outputs:
                reasoning, comp.text = split_reasoning(comp.text)
                if comp.index == 0:
                    out.reasoning = reasoning
        return outputs

    def beam_search(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        params: BeamSearchParams,
        lora_request: Union[LoRARequest, Sequence[Optional[LoRARequest]], None] = None,
        use_tqdm: bool = False,
        concurrency_limit: Optional[int] = None,
    ) -> list[BeamSearchOutput]:
        """vLLM's LLM.beam_search: per prompt, the params.beam_width best sequences (best first) of up
        to params.max_tokens tokens (BeamSearchParams; engine/beam_search.py). Each sequence's
        `tokens` and `text` hold the prompt and the generated tokens, as vLLM's do
        (`output_token_ids`: the generated ones). The prompts' beams run together, each step one
        engine request per beam (concurrency_limit: at most this many prompts at once). ValueError
        (RequestError naming the field) for bad params, or a prompt that with max_tokens does not
        fit the context; nothing stays queued in the engine after an error or an interrupt."""
        from pangu_infer.engine.beam_search import BeamSearch, check_prompt, step_entry, step_params

        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params={short_repr(params)} must be a BeamSearchParams")
        if concurrency_limit is not None and (not isinstance(concurrency_limit, int) or isinstance(concurrency_limit, bool)
                                              or concurrency_limit < 1):
            raise ValueError(f"concurrency_limit={short_repr(concurrency_limit)} must be a positive integer or None")
        items = self._normalize_prompts(prompts)
        loras = self._normalize_loras(lora_request, len(items))
        for i, (_, ids, _) in enumerate(items):
            try:
                check_prompt(ids, params, self.engine.limits)
            except RequestError as e:
                raise RequestError(f"prompt {i}: {e}" if len(items) > 1 else str(e), param=e.param) from None
        searches = [BeamSearch(ids, params, self.engine.eos_token_ids) for _, ids, _ in items]
        each = step_params(params)
        limit = concurrency_limit or len(items)
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(items), desc="beam search", unit="prompt", leave=False)
        try:
            for start in range(0, len(items), limit):
                group = list(range(start, min(start + limit, len(items))))
                while True:
                    live = [k for k in group if not searches[k].done]
                    if not live:
                        break
                    runs = [(k, ids) for k in live for ids in searches[k].inputs()]
                    outs = self._run([(None, ids, each, loras[k], items[k][2], 0) for k, ids in runs], use_tqdm=False,
                                     share_prefix=True)
                    entries: dict[int, list] = {k: [] for k in live}
                    for (k, _), out in zip(runs, outs):
                        entries[k].append(step_entry(out))
                    for k in live:
                        searches[k].advance(entries[k])
                if bar is not None:
                    bar.update(len(group))
        finally:
            if bar is not None:
                bar.close()
        tok = self.tokenizer
        decode = None if tok is None else (lambda ids: tok.decode(ids, skip_special_tokens=params.skip_special_tokens))
        return [s.output(decode) for s in searches]

    def stream(
        self, prompt: PromptType, sampling_params: Optional[SamplingParams] = None, lora_request: Optional[LoRARequest] = None
    ) -> Iterator[RequestOutput]:
        """Generate one prompt, yielding each step's incremental output (`text_delta`, ...)."""
        items = self._normalize_prompts(prompt)
        if len(items) != 1:
            raise ValueError(f"stream() takes one prompt, got {len(items)}")
        (text, ids, salt), = items
        driver = getattr(self.engine, "driver", None)
        if driver is not None and driver.is_running:
            raise RuntimeError("this LLM's engine is driven by a running server (AsyncEngine) in this process: stream "
                               "through it (`async for out in AsyncEngine.generate(...)`), or use LLM.generate")
        rid, box = str(next(self._ids)), []
        self._add_request(rid, box, ids, sampling_params or self.default_sampling_params(), prompt=text, lora_request=lora_request,
                          cache_salt=salt)
        finished = False
        try:
            while not finished:
                for out in self._outputs_for(box):
                    finished = out.finished
                    yield out
        finally:
            self._release([rid], [] if finished else [rid])

    def embed(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        *,
        pooling: Optional[str] = None,
        use_tqdm: bool = True,
        lora_request: Union[LoRARequest, Sequence[Optional[LoRARequest]], None] = None,
        truncate_prompt_tokens: Optional[int] = None,
        normalize: bool = True,
    ) -> list[EmbeddingRequestOutput]:
        """vLLM's LLM.embed: each prompt's embedding (`out.outputs.embedding`, a list of floats of the
        hidden size): the model's final hidden states (after its final norm, before the LM head)
        pooled over the prompt, "last" token or "mean" (`pooling`, else the LLM's), and L2-normalized.
        Prompts as generate takes them; they run through the engine as prompt-only requests, batched
        with whatever else it runs. A generative model's embeddings, not a trained embedding model's
        (README, Embeddings). ValueError (RequestError naming the prompt and field) for an empty
        prompt, one longer than the context or ids outside the vocabulary. truncate_prompt_tokens
        (vLLM's): embed each prompt's last k tokens (-1: as many as fit the context); normalize
        False (vLLM's PoolingParams.normalize): the pooled hidden state as it is."""
        try:
            how = self.pooling if pooling is None else check_pooling(pooling)
        except RequestError as e:
            raise ValueError(str(e)) from None
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize={normalize!r} must be True or False")
        params = embedding_params(truncate_prompt_tokens)
        items = self._normalize_prompts(prompts)
        empty = next((i for i, (text, ids, _) in enumerate(items) if text == "" or not ids), None)
        if empty is not None:
            raise RequestError(f"prompts[{empty}] is empty: an embedding needs at least one token", param="prompt")
        loras = self._normalize_loras(lora_request, len(items))
        requests = [(text, ids, params, lora, salt, 0) for (text, ids, salt), lora in zip(items, loras)]
        return self._run(requests, use_tqdm, pooling=how, normalize=normalize)  # type: ignore[return-value]

    def render_chat(self, messages: list[dict], *, enable_thinking=None, tools=None, chat_template=None, **template_kwargs) -> str:
        from pangu_infer.chat import render_chat

        self._need_tokenizer("a chat")
        return render_chat(
            self.tokenizer, messages, enable_thinking=enable_thinking, tools=tools, chat_template=chat_template, **template_kwargs
        )

    def encode_prompt(self, text: str) -> list[int]:
        """Tokenize a rendered prompt; BOS is added unless the text already starts with it."""
        if not isinstance(text, str):
            raise ValueError(f"encode_prompt() takes a text, got {short_repr(text)}")
        self._need_tokenizer("encode_prompt()")
        tok = self.tokenizer
        bos_text = None if tok.bos_token_id is None else tok.convert_ids_to_tokens([tok.bos_token_id])[0]
        return tok.encode(text, add_special_tokens=not (bos_text and text.startswith(bos_text)))

    @torch.inference_mode()
    def logits(self, token_ids: Sequence[int], lora_request: Optional[LoRARequest] = None) -> torch.Tensor:
        """Full forward of one sequence without the KV cache: float32 [len(token_ids), vocab]; with
        `lora_request` (an engine started with enable_lora=True), that adapter's, loaded if needed."""
        if hasattr(token_ids, "tolist"):  # a tensor or an array of ids: its Python integers
            token_ids = token_ids.tolist()
        if isinstance(token_ids, (str, bytes, dict)) or not hasattr(token_ids, "__iter__"):
            raise ValueError(f"logits() takes a list of token ids, got {short_repr(token_ids)}")
        ids = list(token_ids)
        if not ids:
            raise ValueError("logits() needs at least one token id")
        odd = next((t for t in ids if not isinstance(t, int) or isinstance(t, bool)), None)
        if odd is not None:  # (a float was cut to an integer by torch.tensor, a bool read as 0 or 1)
            raise ValueError(f"token id {short_repr(odd)} is not an integer")
        vocab = self.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {short_repr(bad[0])} is outside the vocabulary [0, {vocab})")
        engine = self.engine
        lora = self.model.__dict__.get("_lora_state")  # (models/lora.py) the adapters' per-row slots
        slot = -1
        if lora_request is not None:
            engine.add_lora(lora_request)  # (a ValueError where LoRA is off or the adapter is bad)
            slot = engine.loras.add(lora_request)[1]
        inputs = (torch.tensor(ids, dtype=torch.long, device=self.device), torch.arange(len(ids), device=self.device), None)
        with engine.runner.bind():  # the model's lock, as a step holds it
            if lora is not None:  # this call's rows, never the last step's
                lora.set_rows(None if slot < 0 else [slot] * len(ids))
            if engine.runner.mirror is not None:  # tensor parallel: every rank's shard
                engine.runner.mirror("forward", inputs)
            hidden = self.model(*inputs)
            return self.model.compute_logits(hidden).cpu()

    def moe_stats(self) -> dict:
        """Per-layer tokens per expert (and per group for MoGE), and imbalance scores (MoE models only)."""
        if not self.config.is_moe:
            return {}
        return self.model.moe_stats()

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes, and a background build of the compiled decode
        step still running (steps keep working, eagerly where it was not ready)."""
        self._stop_compiles()
        if self.parallel is not None:
            self._finalizer()

    # ------------------------------------------------------------------ internals
    def _normalize_prompts(self, prompts) -> list[tuple[Optional[str], list[int], Optional[str]]]:
        """(text, token ids, cache salt) per prompt."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        elif isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts):
            prompts = [{"prompt_token_ids": list(prompts)}]
        elif isinstance(prompts, (list, tuple)) and any(isinstance(t, int) for t in prompts) and all(
            isinstance(t, (int, float)) for t in prompts
        ):  # token ids, one of them not an integer (not a list of prompts, the first of them a number)
            bad = next(i for i, t in enumerate(prompts) if not isinstance(t, int))
            raise ValueError(f"prompt token ids must be integers: [{bad}] is {short_repr(prompts[bad])}")
        elif not isinstance(prompts, (list, tuple)):
            try:
                prompts = list(prompts)
            except TypeError:  # (None, a number: had been a TypeError from the loop below)
                raise ValueError(f"prompts must be a string, {{'prompt_token_ids': [...]}}, token ids or a list of them, "
                                 f"got {short_repr(prompts)}") from None
        items = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                items.append((p, self._encode(p, f"prompts[{i}]"), None))
            elif isinstance(p, dict) and "prompt_token_ids" in p:
                ids = p["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) for t in ids):
                    raise ValueError(f"prompts[{i}]['prompt_token_ids'] must be a list of integers")
                items.append((p.get("prompt"), list(ids), p.get("cache_salt")))
            elif isinstance(p, dict) and isinstance(p.get("prompt"), str):
                items.append((p["prompt"], self._encode(p["prompt"], f"prompts[{i}]['prompt']"), p.get("cache_salt")))
            elif isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p):  # a batch of token-id lists, as vLLM takes
                items.append((None, list(p), None))
            elif isinstance(p, (list, tuple)) and any(isinstance(t, int) for t in p):
                bad = next(j for j, t in enumerate(p) if not isinstance(t, int))
                raise ValueError(f"prompt token ids must be integers: prompts[{i}][{bad}] is {short_repr(p[bad])}")
            else:
                raise ValueError(f"prompts[{i}] must be a string, {{'prompt_token_ids': [...]}} or a list of token ids, "
                                 f"got {type(p).__name__}")
        if not items:
            raise ValueError("no prompts given")
        return items

    def _need_tokenizer(self, what: str) -> None:
        if self.tokenizer is None:
            raise ValueError(f"{what} needs the model's tokenizer, and this LLM has none (skip_tokenizer_init=True): "
                             "give token ids, {'prompt_token_ids': [...]}")

    def _encode(self, text: str, where: str, param: str = "prompt") -> list[int]:
        """A prompt's token ids; the tokenizer's ValueError (a lone surrogate) names the prompt (the field at `where`)."""
        self._need_tokenizer(f"{where}, a text,")
        try:
            return self.tokenizer.encode(text)
        except ValueError as e:
            raise RequestError(f"{where}: {e}", param=param) from None

    def _encode_chat(self, text: str, conversation: list[dict], where: str, tools: Optional[list[dict]]) -> list[int]:
        """A rendered conversation's token ids; the tokenizer's ValueError (a lone surrogate, counted in
        the rendered text) names the message field or tool that holds it, as _encode names a prompt."""
        try:
            return self.encode_prompt(text)
        except ValueError:
            found = _lone_surrogate_field(conversation, where, "messages") or _lone_surrogate_field(tools, "tools", "tools")
            if found is None:
                raise
            self._encode(*found)  # (raises: the field's own error, its character counted in the field)
            raise

    def _normalize_params(self, params, n: int) -> list[SamplingParams]:
        if params is None:
            params = self.default_sampling_params()
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} sampling params for {n} prompts")
        return params

    def _normalize_loras(self, lora_request, n: int) -> list[Optional[LoRARequest]]:
        if lora_request is None or isinstance(lora_request, LoRARequest):
            return [lora_request] * n
        if isinstance(lora_request, (list, tuple)):
            if len(lora_request) != n:
                raise ValueError(f"got {len(lora_request)} LoRA requests for {n} prompts")
            return list(lora_request)
        raise ValueError(f"lora_request={lora_request!r} must be a LoRARequest, a list of them (one per prompt) or None")

    def _run(
        self, requests: list[tuple[Optional[str], list[int], SamplingParams, Optional[LoRARequest], Optional[str], int]], use_tqdm: bool,
        pooling: Optional[str] = None,
        normalize: bool = True,
        share_prefix: bool = False,
    ) -> list[RequestOutput]:
        """Generate every request to the end; if one is rejected (RequestError naming the prompt and the
        field) or the caller interrupts, none of them stays queued in the engine. `pooling`: they are
        embedding requests (embed), their vectors L2-normalized unless `normalize` is off.
        `share_prefix`: LLMEngine.add_request's (beam search's steps)."""
        engine = self.engine
        driver = getattr(engine, "driver", None)
        if driver is not None and driver.is_running:
            # A server (AsyncEngine) in this process steps this engine from its own thread.
            return driver.run_blocking(
                [(f"llm-{next(self._ids)}", tokens, p, text, lora, salt, rank) for text, tokens, p, lora, salt, rank in requests],
                pooling=pooling, normalize=normalize, share_prefix=share_prefix,
            )
        ids: list[str] = []
        box: list[RequestOutput] = []  # this call's mailbox
        final: dict[str, RequestOutput] = {}
        bar = None
        try:
            for i, (text, tokens, p, lora, salt, rank) in enumerate(requests):
                rid = str(next(self._ids))
                try:
                    self._add_request(rid, box, tokens, p, prompt=text, lora_request=lora, cache_salt=salt, priority=rank, pooling=pooling,
                                      normalize=normalize, share_prefix=share_prefix)
                except RequestError as e:
                    if len(requests) == 1:
                        raise
                    raise RequestError(f"prompt {i}: {e}", param=e.param) from None
                ids.append(rid)
            if use_tqdm and len(requests) > 1:
                from tqdm import tqdm

                bar = tqdm(total=len(requests), desc="embedding" if pooling else "generating", unit="req", leave=False)
            while len(final) < len(ids):
                for out in self._outputs_for(box):
                    if out.finished:
                        final[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            self._release(ids, [rid for rid in ids if rid not in final])  # (after an error or an interrupt: abort them)
            if bar is not None:
                bar.close()
        return [final[rid] for rid in ids]

    def _add_request(self, rid: str, box: list[RequestOutput], *args, **kwargs) -> None:
        """LLMEngine.add_request, its outputs to `box` (its call's mailbox) from now on."""
        with self._stepping:
            self.engine.add_request(rid, *args, **kwargs)
            self._mail[rid] = box

    def _outputs_for(self, box: list[RequestOutput]) -> list[RequestOutput]:
        """A call's outputs, emptied from its mailbox: those another call's steps left there, else
        those of one more engine step (whose outputs for other calls' requests go to theirs). Work
        per step: its outputs, not the call's requests."""
        with self._stepping:
            if not box:
                for out in self.engine.step():
                    mailbox = self._mail.get(out.request_id)
                    if mailbox is not None:  # (None: a request no call waits for any more)
                        mailbox.append(out)
            got = box[:]
            box.clear()
            return got

    def _release(self, rids: Sequence[str], unfinished: Sequence[str]) -> None:
        """A call's end: its unfinished requests aborted (nothing stays queued), its mailboxes gone."""
        with self._stepping:
            for rid in unfinished:
                self.engine.abort_request(rid)
            for rid in rids:
                self._mail.pop(rid, None)


def _lone_surrogate_field(value: Any, where: str, param: str) -> Optional[tuple[str, str, str]]:
    """(the text, where it is, param) of the first string in `value` (messages or tools: dicts and
    lists) that holds a lone UTF-16 surrogate; None if none does."""
    from pangu_infer.tokenizer import lone_surrogate_at

    if isinstance(value, str):
        return (value, where, param) if lone_surrogate_at(value) is not None else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, child in items:
        found = _lone_surrogate_field(child, f"{where}[{key!r}]", param)
        if found is not None:
            return found
    return None


def _out_of_memory(e: RuntimeError) -> bool:
    """torch's allocation failure: the CPU allocator's "can't allocate memory", a device's out of memory."""
    text = str(e)
    return "can't allocate memory" in text or "out of memory" in text.lower()


def _hub_model_for_tokenizer(model: Optional[str], revision: str) -> str:
    """The model's hub id, where tokenizer_revision names a revision of the model's own tokenizer."""
    if model is None:
        raise ModelNotFoundError(f"tokenizer_revision={revision!r} applies to a tokenizer on the hub; the demo model is a local file")
    if os.path.exists(os.path.expanduser(model)):  # (model is a string: LLM checked it first)
        raise ModelNotFoundError(
            f"tokenizer_revision={revision!r} applies to a tokenizer on the hub; {model!r} is a local path "
            "(name the tokenizer's hub id with tokenizer=)"
        )
    return model


def _local_vocab_size(model: Optional[str]) -> Optional[int]:
    """The vocabulary of a local model folder or .gguf file (the demo model's for None), read from its
    config.json or GGUF header; None for a hub id, or a config that does not read (the load then says
    what is wrong with it)."""
    path = demo_model_path() if not model else os.path.expanduser(model)
    if not is_local_model(path):
        return None
    try:
        return read_config(path).vocab_size
    except Exception:
        return None


def _check_tokenizer_fits(name: str, tokenizer: Any, vocab_size: Optional[int]) -> None:
    """A tokenizer given by name (LLM(tokenizer=...)) with more tokens than the model's vocabulary
    would produce ids the model has no row for: a ValueError naming both (vocab_size None: not known yet)."""
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise ValueError(f"tokenizer={name!r} has {tokenizer.vocab_size} tokens, more than the model's "
                         f"vocabulary (vocab_size {vocab_size})")


def _tokenizer(name: str, revision: Optional[str] = None) -> Any:
    """LLM(tokenizer=...)'s tokenizer (at tokenizer_revision `revision` on the hub), or a ValueError
    naming the argument."""
    from pangu_infer.tokenizer import load_tokenizer

    if not isinstance(name, (str, os.PathLike)) or not str(name).strip():
        raise ValueError(f"tokenizer={short_repr(name)} must be a folder or a hub id")
    folder = resolve_tokenizer_path(str(name), revision)
    try:
        return load_tokenizer(folder)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"tokenizer={str(name)!r}: {e}") from None


def _chat_template(value: str) -> str:
    from pangu_infer.tokenizer import load_chat_template  # sentencepiece and tokenizers: imported when used

    return load_chat_template(value)


# Encoded by the target's and the draft's tokenizers: a draft model whose token ids mean other
# tokens would never be accepted (and only slow decoding down).
DRAFT_TOKENIZER_PROBE = "Hello, world! 你好，世界。 def f(x):\n    return x ** 2  # 123 émigré"


def _load_draft(
    spec: SpeculativeSettings, target: LoadedModel, dtype: torch.dtype, device: torch.device, ec: EngineConfig
) -> LoadedModel:
    """The draft model of speculative decoding, in the target's dtype and on its device; a ValueError
    naming it when it cannot serve as the target's draft."""
    name = f"speculative draft model {spec.draft_model!r}"
    try:
        draft = load_serving_model(spec.draft_model, dtype, device, quantization=spec.draft_quantization)
    except ModelNotFoundError as e:  # its message names --model: say it is the draft
        raise ModelNotFoundError(f"{name}: {str(e).replace('--model ', '', 1)}") from None
    if target.tokenizer is not None and draft.tokenizer is not None:
        want = target.tokenizer.encode(DRAFT_TOKENIZER_PROBE, add_special_tokens=False)
        got = draft.tokenizer.encode(DRAFT_TOKENIZER_PROBE, add_special_tokens=False)
        if want != got:
            raise ValueError(f"{name}: its tokenizer differs from the target model's (a draft must share the target's tokens)")
    if draft.config.max_position_embeddings < min(ec.max_model_len or target.config.max_position_embeddings, target.config.max_position_embeddings):
        raise ValueError(
            f"{name}: its context ({draft.config.max_position_embeddings} tokens) is shorter than the target's; "
            "set max_model_len to at most that"
        )
    return draft

