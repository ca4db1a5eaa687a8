"""LLMEngine: requests in, one scheduled step at a time, incremental outputs out."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch

from pangu_infer.config import ModelConfig
from pangu_infer.device import free_memory_bytes, process_memory_bytes, total_memory_bytes
from pangu_infer.engine import output
from pangu_infer.engine.admission import Limits, admit, check_cache_salt, compile_structured, outside_vocabulary
from pangu_infer.engine.kv_cache import BlockPool
from pangu_infer.engine.runner import ModelRunner
from pangu_infer.engine.sampler import BadWords, SampleResult, Sampler, SamplingRow
from pangu_infer.engine.scheduler import POLICIES as SCHEDULING_POLICIES
from pangu_infer.engine.scheduler import ScheduledBatch, Scheduler, scheduling_rank
from pangu_infer.engine.sequence import Logprob, Sequence
from pangu_infer.engine.lora import LoRAManager, LoRASlotsBusy
from pangu_infer.engine.draft_model import DraftModelSpeculator
from pangu_infer.engine.spec_decode import Prediction, PredictionSpeculator, PromptLookupSpeculator, Speculator
from pangu_infer.engine.structured import GrammarCache, GrammarDeadEnd, StructuredState, allocate_bitmask, apply_bitmask, think_markers
from pangu_infer.errors import RequestError, short_repr
from pangu_infer.lora import LoRAAdapter, LoRARequest
from pangu_infer.models.dense import DecoderForCausalLM
from pangu_infer.models.lora import enable_lora
from pangu_infer.outputs import EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
from pangu_infer.sampling_params import MAX_LOGPROBS, SEED_MAX, SEED_MIN, SamplingParams, valid_seed

logger = logging.getLogger("pangu_infer.engine")

DEFAULT_CPU_KV_BYTES = 4 << 30
MAX_BAD_WORD_TOKENS = 4096  # tokens of one request's bad_words, both spellings: what each step matches
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2")
# vLLM's fp8 names: "fp8" is e4m3 (as vLLM's on CUDA), each with scale 1 (vLLM's without calibration)
FP8_KV_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# A step's token budget where max_num_batched_tokens is not given (vLLM's, with chunked prefill)
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
# How an embedding request pools its prompt's final hidden states (add_request(pooling=...)):
# the last position's (vLLM's default for a decoder, what decoder embedding models train), or their mean
POOLING_TYPES = ("last", "mean")


@dataclass
class EngineConfig:
    """Everything a user tunes about serving; each field has a CLI flag of the same name."""

    max_num_seqs: int = 64
    # tokens one step forwards, decodes and prefill chunks together; None: DEFAULT_MAX_NUM_BATCHED_TOKENS,
    # or, with enable_chunked_prefill=False, at least max_model_len (vLLM's defaults)
    max_num_batched_tokens: Optional[int] = None
    # vLLM's: True, a prompt longer than what is left of a step's budget is prefilled in chunks beside
    # the decodes; False, each prompt in one step (it waits for a step whose budget holds it whole),
    # so max_num_batched_tokens must be at least max_model_len
    enable_chunked_prefill: bool = True
    block_size: int = 16
    # bytes (int), a fraction of free memory (float in (0, 1]), or None: 4 GiB on CPU, 90% elsewhere
    kv_cache_memory: Union[None, int, float] = None
    # vLLM's: the share of a GPU's (NPU's) whole memory this engine may fill, weights, activations and
    # KV cache together; the KV cache gets what the weights and an activation reserve leave of it
    gpu_memory_utilization: Optional[float] = None
    enable_prefix_caching: bool = True
    max_model_len: Optional[int] = None
    seed: Optional[int] = None
    # speculative decoding: draft tokens per step (0 = off), from a draft model given to the engine
    # or else by prompt lookup, matching n-grams of speculative_ngram down to speculative_ngram_min tokens
    num_speculative_tokens: int = 0
    speculative_ngram: int = 3
    speculative_ngram_min: int = 1
    # True: never torch.compile. By default decode-only steps run a compiled forward + head, compiled
    # when the engine starts (engine/compiled.py; eager, with one line saying why, where it cannot be)
    enforce_eager: bool = False
    # True: every request's tokens and logprobs are bitwise the same whatever else is in the batch
    # (concurrency, arrival order, chunked prefill, preemption, prefix-cache hits):
    # pangu_infer/models/batch_invariant.py. Costs speed (benchmarks/batch_invariant.py).
    batch_invariant: bool = False
    # The KV cache's dtype: "auto" (the model's dtype, as vLLM) or float32 / bfloat16 / float16
    # (float16 not on CPU, whose attention kernel reads float32 and bfloat16 caches)
    kv_cache_dtype: str = "auto"
    # LoRA adapters (PEFT folders) per request, like vLLM's: how many are held at once, their highest rank
    enable_lora: bool = False
    max_loras: int = 4
    max_lora_rank: int = 16
    # vLLM's: "fcfs" (arrival order) or "priority" (each request's priority, lower first; the running
    # request of lowest priority is the one preempted when blocks run out): engine/scheduler.py
    scheduling_policy: str = "fcfs"
    # vLLM's: the most top logprobs a request's token may ask for (logprobs, prompt_logprobs, the
    # server's top_logprobs); -1: no limit (a token's whole vocabulary)
    max_logprobs: int = MAX_LOGPROBS

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "speculative_ngram", "speculative_ngram_min", "max_loras", "max_lora_rank"):
            v = getattr(self, name)
            if name == "max_num_batched_tokens" and v is None:
                continue  # the default, chosen once max_model_len is known (LLMEngine)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"num_speculative_tokens={k!r} must be an integer >= 0 (0 turns speculation off)")
        if self.speculative_ngram_min > self.speculative_ngram:
            raise ValueError(
                f"speculative_ngram_min={self.speculative_ngram_min} must not exceed speculative_ngram={self.speculative_ngram}"
            )
        kv = self.kv_cache_memory
        if kv is not None:
            if isinstance(kv, bool) or not isinstance(kv, (int, float)):
                raise ValueError(f"kv_cache_memory={kv!r} must be bytes (int) or a fraction of free memory (float)")
            if isinstance(kv, float) and not 0 < kv <= 1:
                raise ValueError(f"kv_cache_memory={kv!r}: a fraction must be in (0, 1]")
            if isinstance(kv, int) and kv <= 0:
                raise ValueError(f"kv_cache_memory={kv!r} bytes must be positive")
        util = self.gpu_memory_utilization
        if util is not None:
            if isinstance(util, bool) or not isinstance(util, (int, float)) or not 0 < util <= 1:
                raise ValueError(f"gpu_memory_utilization={util!r} must be a fraction in (0, 1] of the GPU's memory")
            if kv is not None:
                raise ValueError(
                    f"gpu_memory_utilization={util!r} and kv_cache_memory={kv!r} both size the KV cache: give one"
                )
        for name in ("batch_invariant", "enforce_eager", "enable_prefix_caching", "enable_chunked_prefill"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        if not valid_seed(self.seed):
            raise ValueError(f"seed={short_repr(self.seed)} must be an integer in [{SEED_MIN}, {SEED_MAX}] or None")
        if self.batch_invariant and (self.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS) < self.block_size:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} must be at least block_size={self.block_size} "
                "with batch_invariant (prefill chunks end on block boundaries)"
            )
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or isinstance(self.max_model_len, bool) or self.max_model_len < 1):
            raise ValueError(f"max_model_len={self.max_model_len!r} must be a positive integer")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype={self.kv_cache_dtype!r} is not supported: expected one of {', '.join(KV_CACHE_DTYPES)}"
            )
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(
                f"scheduling_policy={self.scheduling_policy!r} must be one of {', '.join(SCHEDULING_POLICIES)}"
            )
        if self.batch_invariant and self.kv_cache_dtype in FP8_KV_DTYPES:
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} with batch_invariant=True: not supported together "
                             "(the batch-invariant attention kernel reads float32 and bfloat16 caches)")
        if not isinstance(self.enable_lora, bool):
            raise ValueError(f"enable_lora={self.enable_lora!r} must be True or False")
        if not isinstance(self.max_logprobs, int) or isinstance(self.max_logprobs, bool) or self.max_logprobs < -1:
            raise ValueError(f"max_logprobs={short_repr(self.max_logprobs)} must be an integer >= 0, or -1 (no limit)")
        if self.enable_lora and self.batch_invariant:
            raise ValueError("enable_lora=True with batch_invariant=True: not supported together (adapters' products are not batch-invariant)")


@dataclass
class _Request:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    error: Optional[str] = None  # set when the request failed inside the engine
    error_param: Optional[str] = None  # the request field at fault, when its own input made it fail
    lora_key: int = 0  # the installed LoRA adapter it runs with (engine/lora.py), 0 for none
    pooling: Optional[str] = None  # an embedding request's pooling ("last", "mean"); None: generation

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


def step_budget(ec: EngineConfig, max_model_len: int) -> int:
    """The step's token budget: max_num_batched_tokens, or its default (DEFAULT_MAX_NUM_BATCHED_TOKENS;
    without chunked prefill at least max_model_len, as vLLM). Without chunked prefill a prompt runs in
    one step, so a budget below max_model_len would leave the longest prompts waiting forever: a
    ValueError naming both."""
    budget = ec.max_num_batched_tokens
    if budget is None:
        return DEFAULT_MAX_NUM_BATCHED_TOKENS if ec.enable_chunked_prefill else max(max_model_len, DEFAULT_MAX_NUM_BATCHED_TOKENS)
    if not ec.enable_chunked_prefill and budget < max_model_len:
        raise ValueError(
            f"max_num_batched_tokens={budget} is less than max_model_len={max_model_len} with enable_chunked_prefill=False: "
            "each prompt is then prefilled in one step, so the step's budget must hold the longest; raise "
            "max_num_batched_tokens, lower max_model_len, or leave chunked prefill on"
        )
    return budget


class LLMEngine:
    def __init__(
        self,
        model: DecoderForCausalLM,
        tokenizer: Any,
        engine_config: Optional[EngineConfig] = None,
        generation_config: Optional[dict] = None,
        draft_model: Optional[DecoderForCausalLM] = None,
        draft_name: str = "draft model",
    ):
        """draft_model: a smaller model of the same tokenizer whose argmax drafts
        engine_config.num_speculative_tokens tokens per step (engine/draft_model.py)."""
        self.model = model
        self.config: ModelConfig = model.config
        self.tokenizer = tokenizer
        self.engine_config = ec = engine_config or EngineConfig()
        # The AsyncEngine stepping this engine from its own thread, if one runs (it sets this);
        # LLM.generate/chat then send their requests through it.
        self.driver = None
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype if param.is_floating_point() else torch.bfloat16
        self.kv_dtype = kv_torch_dtype(ec.kv_cache_dtype, self.dtype)
        if self.kv_dtype == torch.float16 and self.device.type == "cpu":
            raise ValueError("kv_cache_dtype='float16' is not supported on CPU (its attention kernel reads float32 and bfloat16 caches): use bfloat16")
        context = self.config.max_position_embeddings
        if ec.max_model_len is not None and ec.max_model_len > context:  # (vLLM refuses it too)
            raise ValueError(
                f"max_model_len={ec.max_model_len} is more than the model's context of {context} tokens "
                "(max_position_embeddings; a GGUF file's context_length): give at most that, or leave it out"
            )
        self.max_model_len = ec.max_model_len or context
        self.engine_config = ec = replace(ec, max_num_batched_tokens=step_budget(ec, self.max_model_len))
        self.draft_model = draft_model
        if draft_model is not None:
            check_draft_config(ec)
        # LoRA: the projections wrapped before the runner builds its compiled step (models/lora.py), and
        # the adapters' slots allocated before the KV cache is sized from what memory is left;
        # engines sharing a model share its adapters' slots and their manager.
        self.loras: Optional[LoRAManager] = None
        if ec.enable_lora:
            # the most rows a step forwards: its token budget, plus the drafts of speculation
            rows = ec.max_num_batched_tokens + ec.max_num_seqs * (ec.num_speculative_tokens + 1)
            state = enable_lora(model, ec.max_loras, ec.max_lora_rank, rows, self.dtype, self.device)
            if state.manager is None:
                state.manager = LoRAManager(state)
            self.loras = state.manager
        num_blocks = self._num_blocks()
        self.pool = BlockPool(num_blocks, ec.block_size, ec.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.pool, ec.max_num_seqs, ec.max_num_batched_tokens, ec.block_size if ec.batch_invariant else 1,
            ec.scheduling_policy, ec.enable_chunked_prefill,
        )
        self.limits = Limits(self.config.vocab_size, self.max_model_len, num_blocks * ec.block_size, ec.max_num_seqs, ec.max_logprobs)
        self.runner = ModelRunner(
            model, num_blocks, ec.block_size, self.kv_dtype, self.device,
            enforce_eager=ec.enforce_eager, max_model_len=self.max_model_len, batch_invariant=ec.batch_invariant,
            max_num_seqs=ec.max_num_seqs,
        )
        self.sampler = Sampler(seed=ec.seed, batch_invariant=ec.batch_invariant)
        self.speculator: Optional[Speculator] = None
        if draft_model is not None:
            self.speculator = DraftModelSpeculator(
                draft_model, ec.num_speculative_tokens, num_blocks, ec.block_size, self.kv_dtype, self.device, ec.seed,
                vocab_size=self.config.vocab_size, max_model_len=self.max_model_len, max_num_seqs=ec.max_num_seqs,
                max_num_batched_tokens=ec.max_num_batched_tokens, enforce_eager=ec.enforce_eager, name=draft_name,
            )
        elif ec.num_speculative_tokens:
            self.speculator = PromptLookupSpeculator(
                ec.speculative_ngram, ec.num_speculative_tokens, self.device, ec.seed, ec.speculative_ngram_min
            )
        # Drafts from the requests' predicted outputs, beside (and before) prompt lookup's. A draft
        # model's cache follows every token its own drafts lead to: with one, predictions go unused.
        self.predictions = PredictionSpeculator(self.device, ec.seed) if draft_model is None else None
        self._said_predictions_unused = False
        self.eos_token_ids = self._eos_ids(generation_config or {})
        self._eos_list = sorted(self.eos_token_ids)  # handed to the sampler every step
        # structured outputs: xgrammar's compiler is built on the first constrained request
        self.grammars = GrammarCache(tokenizer, self.config.vocab_size, self._eos_list) if tokenizer is not None else None
        self.think_markers = think_markers(tokenizer)
        self.requests: dict[str, _Request] = {}
        # Requests whose LoRA adapter cannot load yet (max_loras loaded and busy), with the adapter
        # read: they join the scheduler in order as adapters free up (_admit_lora_waiting).
        self._lora_waiting: deque[tuple[_Request, LoRARequest, Optional[LoRAAdapter]]] = deque()
        self._next_seq_id = 0
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0
        self.num_prefill_tokens = 0  # prompt tokens forwarded (prefill chunks; a preempted sequence's recomputation too)
        self.num_steps = 0
        self.finished_requests = 0
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens (%.1f MiB)",
            num_blocks, ec.block_size, num_blocks * ec.block_size,
            num_blocks * ec.block_size * self._kv_bytes_per_token() / 2**20,
        )

    # ------------------------------------------------------------------ setup
    def _kv_bytes_per_token(self) -> int:
        """The target's KV bytes per token, and the draft model's, which pages by the same blocks."""
        per_token = self.config.kv_bytes_per_token(self.kv_dtype)
        if self.draft_model is not None:
            per_token += self.draft_model.config.kv_bytes_per_token(self.kv_dtype)
        return per_token

    def _num_blocks(self) -> int:
        ec = self.engine_config
        per_block = ec.block_size * self._kv_bytes_per_token()
        kv = ec.kv_cache_memory
        if ec.gpu_memory_utilization is not None:
            if self.device.type == "cpu":
                raise ValueError(
                    f"gpu_memory_utilization={ec.gpu_memory_utilization} takes a share of a GPU's memory, and this "
                    "engine runs on the CPU: size its KV cache with kv_cache_memory (--kv-cache-memory, e.g. 8GiB or 0.5)"
                )
            budget = utilization_kv_budget(
                ec.gpu_memory_utilization, total_memory_bytes(self.device), free_memory_bytes(self.device),
                process_memory_bytes(self.device), self._activation_reserve(),
            )
        elif kv is None:
            budget = min(DEFAULT_CPU_KV_BYTES, free_memory_bytes(self.device) // 4) if self.device.type == "cpu" else int(0.9 * free_memory_bytes(self.device))
        elif isinstance(kv, float):
            budget = int(kv * free_memory_bytes(self.device))
        else:
            budget = kv
        needed_for_max_len = -(-self.max_model_len // ec.block_size) * ec.max_num_seqs
        blocks = budget // per_block
        if not isinstance(kv, int):
            # A share of free memory changes from run to run, and the KV cache's shape is static in
            # the compiled decode graphs: keep 3 significant bits (at most 1/8 less), so that the
            # next start finds its graphs in the compile cache instead of compiling anew.
            blocks = blocks >> max(blocks.bit_length() - 3, 0) << max(blocks.bit_length() - 3, 0)
        num_blocks = min(blocks, needed_for_max_len)
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory={kv!r} gives {budget} bytes, less than one KV block ({per_block} bytes "
                f"for block_size={ec.block_size})"
            )
        return int(num_blocks)

    def _activation_reserve(self) -> int:
        """Bytes kept out of a gpu_memory_utilization share for a step's activations: a prefill
        chunk's hidden and MLP rows a few times over, and the logits of a full batch in float32."""
        cfg, ec = self.config, self.engine_config
        width = cfg.hidden_size + 2 * (cfg.intermediate_size or cfg.hidden_size)
        element = torch.empty((), dtype=self.dtype).element_size()
        return 4 * ec.max_num_batched_tokens * width * element + ec.max_num_seqs * cfg.vocab_size * 4

    def _eos_ids(self, generation_config: dict) -> set[int]:
        ids: set[int] = set(self.config.eos_token_ids)
        gen_eos = generation_config.get("eos_token_id")
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif isinstance(gen_eos, list):
            ids.update(i for i in gen_eos if isinstance(i, int))
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if tok_eos is not None:
            ids.add(tok_eos)
        # an id no token can be (warned of as the file was read: config.token_ids) ends nothing,
        # and the sampler indexes the logits with these
        return {i for i in ids if 0 <= i < self.config.vocab_size}

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: Optional[str] = None,
        grammar: Optional[object] = None,
        lora_request: Optional[LoRARequest] = None,
        lora_adapter: Optional[LoRAAdapter] = None,
        cache_salt: Optional[str] = None,
        priority: int = 0,
        bad_words_ids: Optional[list[list[int]]] = None,
        prediction_ids: Optional[list[int]] = None,
        pooling: Optional[str] = None,
        normalize: bool = True,
        share_prefix: bool = False,
    ) -> None:
        """Queue a request; RequestError (a ValueError naming the field) when it can never be served.
        `grammar`: what compile_grammar(params) returned for it, compiled beforehand on another
        thread (else it is compiled here). `lora_request`: the adapter it runs with, loaded here
        if it is not yet (add_lora; `lora_adapter`: what read_lora returned for it, read beforehand
        on another thread, else it is read here). `cache_salt` (vLLM's): its prompt's blocks in the
        prefix cache serve only requests with the same salt (tenants that cannot see each other's
        prompts, not even by timing). `priority` (vLLM's): with scheduling_policy "priority", lower
        values are served first (0 by default; any integer); with "fcfs" only 0 is accepted.
        `bad_words_ids`: what bad_words_ids(params.bad_words) returned, tokenized beforehand on
        another thread (else it is tokenized here); `prediction_ids` likewise, prediction_ids(params.prediction).
        `pooling` ("last" or "mean"): an embedding request instead (embedding_params gives its
        `params`): its prompt is computed like any other's, in the same steps, and it ends with its
        final hidden states pooled and L2-normalized (an EmbeddingRequestOutput), generating nothing;
        `normalize` False (vLLM's PoolingParams.normalize): the pooled vector as it is.
        `share_prefix`: its prompt is looked up in the prefix cache even with enable_prefix_caching
        off, as the forks of an n>1 request are (a beam search's steps: engine/beam_search.py)."""
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use", param="request_id")
        self._check_priority(priority)
        if pooling is not None:
            check_pooling(pooling)
            if params.n != 1 or params.prompt_logprobs is not None or params.structured_outputs is not None or params.prediction is not None:
                raise RequestError("an embedding request takes no sampling parameters: give embedding_params()", param="sampling_params")
        ids, params = admit(prompt_token_ids, params, self.limits, prompt_only=pooling is not None)
        if params.stop and self.tokenizer is None:  # (matched in the detokenized text: there would be none)
            raise RequestError("stop strings need the model's tokenizer, and this engine has none: give stop_token_ids", param="stop")
        check_cache_salt(cache_salt)
        if bad_words_ids is None:
            bad_words_ids = self.bad_words_ids(params.bad_words) if params.bad_words else []
        bad_words = BadWords(bad_words_ids) if bad_words_ids else None
        if params.prediction is not None and prediction_ids is None:
            prediction_ids = self.prediction_ids(params.prediction)
        if prediction_ids and self.predictions is None and not self._said_predictions_unused:
            self._said_predictions_unused = True
            logger.info("requests' predicted outputs go unused: this engine drafts with its draft model (%s)", self.speculator.describe())
        compiled = grammar if grammar is not None else compile_structured(params, self.grammars)
        lora_key, lora_slot, waits = 0, -1, False
        if lora_request is not None:
            lora_key, lora_slot, lora_adapter = self._lora_key(lora_request, lora_adapter)
            waits = lora_key == 0  # max_loras adapters are loaded and busy: it waits for one to be free
        req = _Request(request_id, prompt, ids, params, lora_key=lora_key, pooling=pooling)
        # the prediction's tokens, one array the request's sequences share (each has its own cursor)
        predicted = np.asarray(prediction_ids, dtype=np.int64) if prediction_ids and self.predictions is not None else None
        parent = None
        for i in range(params.n):
            seq = Sequence(
                self._next_seq_id,
                request_id,
                i,
                req.prompt_token_ids,
                params,
                self._detokenizer(req.prompt_token_ids, params),
                self._generator(params, i),
                parent=parent,
            )
            seq.user_salt = cache_salt
            seq.priority = priority
            seq.bad_words = bad_words
            seq.set_lora(lora_key, lora_slot)  # (and the prefix-cache salt of both)
            seq.pooling = pooling
            seq.normalize = normalize
            seq.share_prefix = share_prefix
            if predicted is not None:
                seq.prediction = Prediction(predicted)
            if compiled is not None or (params.max_reasoning_tokens is not None and self.think_markers is not None):
                seq.structured = StructuredState(
                    compiled, self.think_markers, ids, params.max_reasoning_tokens, params.allow_thinking,
                    param=params.structured_outputs.param if params.structured_outputs is not None else "structured_outputs",
                )
            self._next_seq_id += 1
            parent = parent or seq
            req.seqs.append(seq)
        if waits:
            self._lora_waiting.append((req, lora_request, lora_adapter))
        else:
            if lora_key:
                self.loras.acquire(lora_key)  # given back when the request ends (_release_lora)
            for seq in req.seqs:  # only once every sequence is built: nothing half-added on an error
                self.scheduler.add(seq)
        self.requests[request_id] = req
        self.num_prompt_tokens += len(ids)

    def bad_words_ids(self, words: list[str]) -> list[list[int]]:
        """vLLM's bad_words as token sequences: each word as written (leading spaces stripped) and,
        where that gives another first token and as many tokens, with one leading space (how the
        word reads inside a text)."""
        if self.tokenizer is None:
            raise RequestError("bad_words needs the model's tokenizer, and this engine has none", param="bad_words")
        out: list[list[int]] = []
        for k, word in enumerate(words):
            try:
                bare = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
            except ValueError as e:  # (a lone surrogate)
                raise RequestError(f"bad_words[{k}]: {e}", param="bad_words") from None
            if bare:
                out.append(bare)
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            if spaced and (not bare or (spaced[0] != bare[0] and len(spaced) == len(bare))):
                out.append(spaced)
        vocab = self.config.vocab_size
        outside = outside_vocabulary((t for w in out for t in w), vocab)
        if outside is not None:  # an added token of the tokenizer's past the model's logits
            raise RequestError(f"bad_words holds a word with the token id {outside}, outside the model's vocabulary [0, {vocab})", param="bad_words")
        total = sum(len(w) for w in out)
        if total > MAX_BAD_WORD_TOKENS:
            raise RequestError(
                f"bad_words come to {total} tokens; at most {MAX_BAD_WORD_TOKENS} are allowed (every step matches them)",
                param="bad_words",
            )
        return out

    def prediction_ids(self, prediction: Union[str, list[int]]) -> list[int]:
        """A predicted output's token ids (a text tokenized as the reply would be), checked against
        the model: ids in its vocabulary, and no more of them than its context holds."""
        if isinstance(prediction, str):
            if self.tokenizer is None:
                raise RequestError("a prediction given as text needs the model's tokenizer, and this engine has none", param="prediction")
            try:
                ids = self.tokenizer.encode(prediction, add_special_tokens=False)
            except ValueError as e:  # (a lone surrogate)
                raise RequestError(f"prediction: {e}", param="prediction") from None
        else:
            ids = list(prediction)
        vocab = self.config.vocab_size
        outside = outside_vocabulary(ids, vocab)
        if outside is not None:
            raise RequestError(f"prediction holds the token id {short_repr(outside)}, outside the model's vocabulary [0, {vocab})",
                               param="prediction")
        if len(ids) > self.max_model_len:
            raise RequestError(
                f"prediction is {len(ids)} tokens, more than the model's context of {self.max_model_len} tokens holds",
                param="prediction",
            )
        return ids

    def _check_priority(self, priority: object) -> None:
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise RequestError(f"priority={short_repr(priority)} must be an integer", param="priority")
        if priority != 0 and self.engine_config.scheduling_policy != "priority":
            raise RequestError(
                f"priority={priority} needs priority scheduling: this engine serves requests in arrival order "
                "(start it with --scheduling-policy priority, or LLM(..., scheduling_policy='priority'))",
                param="priority",
            )

    # ------------------------------------------------------------------ LoRA adapters
    def read_lora(self, request: LoRARequest) -> LoRAAdapter:
        """Read and check an adapter's folder against this model (ValueError naming what does not
        fit). Changes nothing, so safe from any thread: the server reads on a worker thread and
        adds what it read on the engine's (add_lora)."""
        return self._lora_manager().read(request)

    def add_lora(self, request: LoRARequest, adapter: Optional[LoRAAdapter] = None) -> None:
        """Load an adapter (`adapter`: what read_lora returned for it, else it is read here). At most
        max_loras are held: the least recently used one that no unfinished request runs with makes
        room. A name already loaded from the same folder is kept as it is."""
        self._lora_manager().add(request, adapter)

    def remove_lora(self, lora_name: str) -> bool:
        """Unload an adapter; False if none of that name is loaded, ValueError while a request runs with it."""
        return self._lora_manager().remove(lora_name)

    def list_loras(self) -> list[LoRARequest]:
        return self.loras.list() if self.loras is not None else []

    def _lora_manager(self) -> LoRAManager:
        if self.loras is None:
            raise ValueError("LoRA adapters are off for this engine: start it with enable_lora=True (--enable-lora)")
        return self.loras

    def lora_loaded(self, request: LoRARequest) -> bool:
        """Whether the adapter is loaded (safe from any thread: AsyncEngine reads one that is not on a
        worker thread before it queues the request)."""
        return self.loras is not None and self.loras.holds(request)

    def _lora_key(self, request: LoRARequest, adapter: Optional[LoRAAdapter]) -> tuple[int, int, Optional[LoRAAdapter]]:
        """(key, slot, None) of the request's adapter, loaded here if needed; (0, -1, the adapter
        read) when max_loras adapters are loaded and busy (the request waits: _admit_lora_waiting)."""
        if not isinstance(request, LoRARequest):
            raise RequestError(f"lora_request={request!r} must be a LoRARequest", param="lora_request")
        try:
            manager = self._lora_manager()
            if adapter is None and not manager.holds(request):
                adapter = manager.read(request)  # an adapter that is no adapter fails now, even if it must wait
            return (*manager.add(request, adapter), None)
        except LoRASlotsBusy:
            return 0, -1, adapter
        except ValueError as e:
            raise RequestError(str(e), param="lora_request") from None

    def _admit_lora_waiting(self, touched: dict[str, "_Request"]) -> None:
        """Requests waiting for their adapter join the scheduler as their adapters load: in arrival
        order, or by priority then arrival under the priority policy. One that still finds every slot
        busy stays, without holding back those after it whose adapter is loaded by now (vLLM skips
        such a request too); the slot that frees next goes to the first that needs one."""
        if not self._lora_waiting:
            return
        waiting = list(self._lora_waiting)
        if self.scheduler.policy == "priority":
            waiting.sort(key=lambda w: scheduling_rank(w[0].seqs[0]))
        still = []
        for req, lora_request, adapter in waiting:
            try:
                key, slot = self.loras.add(lora_request, adapter)
            except LoRASlotsBusy:
                still.append((req, lora_request, adapter))
                continue
            except ValueError as e:  # the name loaded meanwhile from another folder (a runtime reload)
                self._fail(req, e, touched)
                continue
            req.lora_key = key
            self.loras.acquire(key)
            for seq in req.seqs:
                seq.set_lora(key, slot)
                self.scheduler.add(seq)
        self._lora_waiting = deque(still)

    def _release_lora(self, req: "_Request") -> None:
        """An ended request gives its adapter back (it may be unloaded or replaced from now on)."""
        if req.lora_key:
            self.loras.release(req.lora_key)
            req.lora_key = 0

    def compile_grammar(self, params: SamplingParams) -> Optional[object]:
        """The compiled grammar of params.structured_outputs (None without one), or RequestError.
        Safe from any thread (the grammar cache has its own lock): the first constrained request
        of a model takes seconds here (xgrammar's tokenizer info), which the server spends on a
        worker thread instead of the engine's."""
        return compile_structured(params, self.grammars)

    def abort_request(self, request_id: str) -> Optional[RequestOutput]:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if self._lora_waiting:
            self._lora_waiting = deque(w for w in self._lora_waiting if w[0] is not req)
        self._release_lora(req)
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
        self.finished_requests += 1
        return self._output(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def _generator(self, params: SamplingParams, index: int) -> Optional[torch.Generator]:
        if params.seed is None:
            return None
        g = torch.Generator(device=self.device)
        g.manual_seed(params.seed + index)
        return g

    def _detokenizer(self, prompt_ids: list[int], params: SamplingParams):
        if self.tokenizer is None:
            return None
        from pangu_infer.tokenizer import IncrementalDetokenizer

        return IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens, prompt_ids=prompt_ids)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; returns the outputs of the requests it moved.

        A failure of one request's own work (its forward, sampling, detokenizing, stop check) ends
        that request alone with finish_reason "error" and frees its blocks; the others go on.
        """
        touched: dict[str, _Request] = {}
        if self._lora_waiting:
            self._admit_lora_waiting(touched)
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return self._outputs(touched)
        batch = self._copy_partials(batch, touched)
        if not batch.seqs:
            return self._outputs(touched)
        drafts, predicted = self._propose(batch)
        if drafts:
            drafts = self._grammar_drafts(batch, drafts, touched)
        prefill = sum(n for s, n in zip(batch.seqs, batch.num_tokens) if s.num_computed_tokens < s.num_prompt_tokens)
        parts = self._forward(batch, drafts, touched)
        self.num_steps += 1
        self.num_prefill_tokens += prefill
        for seqs, num_tokens, (sampled, logits, prompt_logprobs, pooled) in parts:
            for seq, n in zip(seqs, num_tokens):
                if seq.seq_id in drafts or seq.is_finished:
                    continue  # drafted: advanced in _accept_drafts, once it is known how much holds
                try:  # its own bookkeeping: a failure ends this request alone
                    if seq.seq_id in prompt_logprobs:
                        seq.add_prompt_logprobs(*prompt_logprobs[seq.seq_id])
                    if seq.seq_id in pooled:
                        seq.add_pooled(*pooled[seq.seq_id])
                except Exception as e:
                    self._fail(self.requests[seq.request_id], e, touched)
                    continue
                seq.num_computed_tokens += n
                self.pool.register_full_blocks(seq)
                if seq.pooling is not None and seq.num_computed_tokens == seq.num_prompt_tokens:
                    self._finish_embedding(seq, touched)
            if drafts:
                sampled, logits = self._accept_drafts(sampled, logits, drafts, predicted, touched)
            if sampled:
                self._sample(sampled, logits, touched)
        return self._outputs(touched)

    def _copy_partials(self, batch: ScheduledBatch, touched: dict[str, "_Request"]) -> ScheduledBatch:
        """Before the forward: the KV of the partly filled blocks that sequences matched (a beam
        search's steps: BlockPool._match_partial) copied into their own blocks. If the copy fails,
        those sequences' requests end (a fault of the engine) and the step goes on without them."""
        copies = self.pool.take_partial_copies(batch.seqs)
        if not copies:
            return batch
        try:
            self.runner.copy_slots(copies)
        except Exception as e:
            for seq in batch.seqs:
                if seq.partial_source is not None:
                    # its block holds no valid slots past the full ones: not named as holding them when released
                    seq.num_computed_tokens -= seq.partial_source[1]
                    self._fail(self.requests[seq.request_id], e, touched)  # (its hold on the source is released)
            kept = [(s, n) for s, n in zip(batch.seqs, batch.num_tokens) if not s.is_finished]
            batch = ScheduledBatch([s for s, _ in kept], [n for _, n in kept], batch.preempted)
        self.pool.release_partial_sources(batch.seqs)
        return batch

    def _propose(self, batch: ScheduledBatch) -> tuple[dict[int, list[int]], set[int]]:
        """The step's drafts (seq_id -> tokens, their KV blocks reserved), and which of them came
        from predicted outputs: those first, then the speculator's for the other sequences."""
        budget = self.engine_config.max_num_batched_tokens - batch.total_tokens
        drafts: dict[int, list[int]] = {}
        if self.predictions is not None and any(s.prediction is not None for s in batch.seqs):
            drafts = self.predictions.propose(batch, self.pool, self.max_model_len, budget)
            budget -= sum(len(d) for d in drafts.values())
        predicted = set(drafts)
        if self.speculator is not None:
            if predicted:
                rest = [(s, n) for s, n in zip(batch.seqs, batch.num_tokens) if s.seq_id not in predicted]
                batch = ScheduledBatch([s for s, _ in rest], [n for _, n in rest])
            drafts.update(self.speculator.propose(batch, self.pool, self.max_model_len, budget))
        return drafts, predicted

    def _outputs(self, touched: dict[str, "_Request"]) -> list[RequestOutput]:
        outputs = []
        for req in touched.values():
            out = self._output(req)
            if req.finished:
                del self.requests[req.request_id]
                self._release_lora(req)
                self.finished_requests += 1
            outputs.append(out)
        return outputs

    def _forward(
        self, batch: ScheduledBatch, drafts: dict[int, list[int]], touched: dict[str, "_Request"]
    ) -> list[tuple[list[Sequence], list[int], tuple[list[Sequence], torch.Tensor, dict]]]:
        """The step's forward as [(sequences, tokens each, runner output)]: the whole batch at once,
        or, when that fails, each sequence alone, so that only a sequence that fails alone fails.
        A failed forward changed no sequence (only KV slots the retry writes again)."""
        try:
            return [(batch.seqs, batch.num_tokens, self.runner.run(batch, drafts))]
        except Exception:
            logger.exception("the forward of a %d-sequence step failed; running each sequence alone", len(batch.seqs))
        parts = []
        for seq, n in zip(batch.seqs, batch.num_tokens):
            if seq.is_finished:
                continue  # another sequence of its request failed
            own = {seq.seq_id: drafts[seq.seq_id]} if seq.seq_id in drafts else {}
            try:
                parts.append(([seq], [n], self.runner.run(ScheduledBatch([seq], [n]), own)))
            except Exception as e:
                self._fail(self.requests[seq.request_id], e, touched)
        return [part for part in parts if not part[0][0].is_finished]

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, touched: dict[str, "_Request"]) -> None:
        """Sample the next token of every sequence and append it; a row whose sampling or appending
        fails ends its own request only."""
        rows = [
            SamplingRow(
                params=s.params,
                generator=s.generator,
                prompt_token_ids=s.prompt_token_ids,
                output_token_ids=s.output_token_ids,
                eos_token_ids=self._eos_list,  # the sampler itself skips eos under ignore_eos
                bad_words=s.bad_words,
            )
            for s in seqs
        ]
        # Seeded rows are drawn again from the same state if the batch has to be sampled row by row.
        states = [r.generator.get_state() if r.generator is not None else None for r in rows]
        picked: list[Optional[tuple[int, Optional[Logprob]]]]
        masked: list[int] = []
        bitmask = None
        try:
            masked = [i for i, s in enumerate(seqs) if s.structured is not None and s.structured.needs_mask()]
            if masked:
                bitmask = allocate_bitmask(len(seqs), logits.shape[1])
                for i in masked:
                    try:
                        seqs[i].structured.fill_mask(bitmask, i)
                    except GrammarDeadEnd as e:  # its grammar allows nothing more: it ends, a client error
                        self._fail(self.requests[seqs[i].request_id], e, touched)
                        bitmask[i].fill_(-1)  # its row is sampled unmasked with the rest; the pick is dropped
            result = self.sampler(logits, rows, bitmask, masked) if masked else self.sampler(logits, rows)
            picked = list(_picks(result, seqs))
            for i in result.blocked:  # its own restrictions left no token: a client error, it ends
                self._fail(self.requests[seqs[i].request_id], _no_token_allowed(seqs[i]), touched)
        except Exception:
            logger.exception("sampling a batch of %d rows failed; sampling each row alone", len(rows))
            picked = []
            for i, (seq, row, state) in enumerate(zip(seqs, rows, states)):
                if state is not None:
                    row.generator.set_state(state)
                try:
                    if bitmask is not None and i in masked:
                        result = self.sampler(logits[i : i + 1], [row], bitmask[i : i + 1], [0])
                    else:
                        result = self.sampler(logits[i : i + 1], [row])
                    picked.extend(_picks(result, [seq]))
                    if result.blocked:
                        self._fail(self.requests[seq.request_id], _no_token_allowed(seq), touched)
                except Exception as e:
                    self._fail(self.requests[seq.request_id], e, touched)
                    picked.append(None)
        for seq, pick in zip(seqs, picked):
            if pick is None or seq.is_finished:
                continue
            req = self.requests[seq.request_id]
            try:
                self._append(seq, *pick)
            except Exception as e:
                self._fail(req, e, touched)
            touched[seq.request_id] = req

    def _finish_embedding(self, seq: Sequence, touched: dict[str, "_Request"]) -> None:
        """An embedding request's prompt is computed: its embedding, and it ends (its blocks freed)."""
        req = self.requests[seq.request_id]
        try:
            seq.embedding = seq.pooled_embedding()
        except Exception as e:
            self._fail(req, e, touched)
            return
        seq.pooled = None
        seq.finish_reason = "stop"
        self.scheduler.finish(seq)
        touched[seq.request_id] = req

    def _fail(self, req: "_Request", error: BaseException, touched: dict[str, "_Request"]) -> None:
        """End one request whose own work failed; its blocks go back. A RequestError is the request's
        own input at fault (a grammar with a dead end): its message and field go to the client. Any
        other error is a fault of the engine: a generic message, the traceback to the log."""
        if isinstance(error, RequestError):
            logger.info("request %s ended: %s", req.request_id, error)
            req.error, req.error_param = str(error), error.param
        else:
            logger.error("request %s failed inside the engine; ending it alone", req.request_id, exc_info=error)
            req.error = f"request {req.request_id} failed inside the engine"
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish_reason = "error"
                self.scheduler.finish(seq)
        touched[req.request_id] = req

    def _grammar_drafts(
        self, batch: ScheduledBatch, drafts: dict[int, list[int]], touched: dict[str, _Request]
    ) -> dict[int, list[int]]:
        """Constrained sequences' drafts cut to the prefix their grammar allows (none left: no draft)."""
        for seq in batch.seqs:
            draft = drafts.get(seq.seq_id)
            if draft is None or seq.structured is None:
                continue
            try:
                n = seq.structured.valid_prefix(draft)
            except Exception as e:  # its own grammar state: this request alone ends
                self._fail(self.requests[seq.request_id], e, touched)
                n = 0
            if n:
                drafts[seq.seq_id] = draft[:n]
            else:
                del drafts[seq.seq_id]
        return drafts

    def _accept_drafts(
        self,
        sampled: list[Sequence],
        logits: torch.Tensor,
        drafts: dict[int, list[int]],
        predicted: set[int],
        touched: dict[str, _Request],
    ) -> tuple[list[Sequence], torch.Tensor]:
        """Verify the drafted sequences (their logits rows: the last token, then each draft token) and
        append what holds; returns the other sequences with their logits rows, for the sampler.
        `predicted`: the sequences whose draft came from their predicted output."""
        rest: list[Sequence] = []
        rest_rows: list[int] = []
        row = 0
        for seq in sampled:
            draft = drafts.get(seq.seq_id)
            if draft is None:
                rest.append(seq)
                rest_rows.append(row)
                row += 1
                continue
            rows = logits[row : row + len(draft) + 1]
            row += len(draft) + 1
            if seq.is_finished:
                continue  # another sequence of its request failed
            req = self.requests[seq.request_id]
            try:
                if seq.structured is not None:  # verified under the grammar's masks at each position
                    bitmask = allocate_bitmask(len(draft) + 1, rows.shape[1])
                    masked, keep = seq.structured.draft_masks(draft, bitmask)
                    if keep < len(draft):  # the draft's tail runs into a dead end of the grammar: not verified
                        draft, rows, bitmask = draft[:keep], rows[: keep + 1], bitmask[: keep + 1]
                    if masked:
                        apply_bitmask(rows, bitmask, masked)
                tokens = (self.predictions if seq.seq_id in predicted else self.speculator).verify(seq, rows, draft)
                # The last input token and the accepted draft tokens now have valid KV entries.
                seq.num_computed_tokens += len(tokens)
                for token in tokens:
                    self._append(seq, token, None)
                    if seq.is_finished:
                        break
                if not seq.is_finished:
                    self.pool.register_full_blocks(seq)
            except Exception as e:
                self._fail(req, e, touched)
            touched[seq.request_id] = req
        return rest, logits[torch.tensor(rest_rows, dtype=torch.long, device=logits.device)]

    def _append(self, seq: Sequence, token: int, lp: Optional[Logprob]) -> None:
        if seq.structured is not None:
            seq.structured.accept(token)  # ValueError (this request fails) if its grammar forbids the token
        seq.append_token(token)
        self.num_generated_tokens += 1
        if lp is not None:
            seq.logprobs.append(lp)
            seq.cumulative_logprob += lp.logprob
        reason = output.finish_reason(seq, token, self.eos_token_ids, self.max_model_len)
        if reason is not None:
            seq.finish_reason = reason
            self.scheduler.finish(seq)

    def _output(self, req: _Request) -> Union[RequestOutput, EmbeddingRequestOutput]:
        if req.pooling is not None:
            seq = req.seqs[0]
            return EmbeddingRequestOutput(
                req.request_id, EmbeddingOutput(seq.embedding or []), req.prompt_token_ids, req.finished, prompt=req.prompt,
                metrics={"e2e": time.monotonic() - seq.arrival_time if req.finished else None, "num_cached_tokens": seq.num_cached_tokens},
                error=req.error, error_param=req.error_param,
            )
        return output.request_output(
            req.request_id, req.prompt, req.prompt_token_ids, req.seqs, req.finished, req.error, req.error_param
        )

    # ------------------------------------------------------------------ stats
    def stop_compile(self) -> None:
        """Let the background builds of the compiled decode steps go: the runner's, and a draft
        model's (ModelRunner.stop_compile)."""
        self.runner.stop_compile()
        if self.speculator is not None:
            self.speculator.stop_compile()

    def stats(self) -> dict:
        pool = self.pool
        running = {s.request_id: s.lora_key for s in self.scheduler.running}
        waiting = {s.request_id: s.lora_key for s in self.scheduler.waiting if s.request_id not in running}
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            # requests, not sequences (a request with n=2 counts once), as vLLM counts them
            "num_requests_running": len(running),
            "num_requests_waiting": len(waiting) + len(self._lora_waiting),
            "max_loras": self.loras.max_loras if self.loras is not None else 0,
            "lora_running": self._lora_names(running.values()),
            "lora_waiting": sorted(set(self._lora_names(waiting.values())) | {w[1].lora_name for w in self._lora_waiting}),
            "kv_blocks_total": pool.num_blocks,
            "kv_blocks_used": pool.num_used_blocks,
            "kv_blocks_free": pool.num_free_blocks,
            "kv_usage": pool.num_used_blocks / pool.num_blocks,
            "block_size": pool.block_size,
            "prefix_cache_queries": pool.prefix_queries,
            "prefix_cache_hits": pool.prefix_hits,
            "prefix_cache_hit_rate": pool.hit_rate(),
            "num_preemptions": self.scheduler.num_preemptions,
            "prompt_tokens": self.num_prompt_tokens,
            "prefill_tokens": self.num_prefill_tokens,
            "generation_tokens": self.num_generated_tokens,
            "num_steps": self.num_steps,
            "finished_requests": self.finished_requests,
            "spec_draft_tokens": self.speculator.num_draft_tokens if self.speculator else 0,
            "spec_accepted_tokens": self.speculator.num_accepted_tokens if self.speculator else 0,
            "spec_acceptance_rate": self.speculator.acceptance_rate() if self.speculator else 0.0,
        }

    def _lora_names(self, keys) -> list[str]:
        if self.loras is None:
            return []
        return sorted({name for name in (self.loras.name_of(k) for k in set(keys) if k) if name is not None})



def check_pooling(pooling: object) -> str:
    """An embedding request's pooling, "last" or "mean"; else a RequestError naming pooling."""
    if pooling not in POOLING_TYPES:
        raise RequestError(f"pooling={short_repr(pooling)} must be one of {', '.join(map(repr, POOLING_TYPES))}", param="pooling")
    return pooling  # type: ignore[return-value]


def check_draft_config(ec: "EngineConfig") -> None:
    """What an engine with a draft model needs of its settings (LLM checks it before loading anything)."""
    if ec.num_speculative_tokens < 1:
        raise ValueError(f"a draft model needs num_speculative_tokens >= 1 (got {ec.num_speculative_tokens})")
    if ec.batch_invariant:
        raise ValueError("a draft model with batch_invariant=True: not supported together (the draft's batches are not batch-invariant)")


def embedding_params(truncate_prompt_tokens: Optional[int] = None, truncation_side: str = "left") -> SamplingParams:
    """The SamplingParams an embedding request runs with (nothing of them is read but
    truncate_prompt_tokens: it never samples). truncate_prompt_tokens (vLLM's): embed the prompt's
    last k tokens (truncation_side "right": its first k); -1: as many as fit the context. A
    RequestError naming the field where it is not one."""
    return SamplingParams(temperature=0.0, max_tokens=1, truncate_prompt_tokens=truncate_prompt_tokens,
                          truncation_side=truncation_side)


def utilization_kv_budget(utilization: float, total: int, free: int, held: int, reserve: int) -> int:
    """The KV cache's bytes under vLLM's gpu_memory_utilization: this engine may fill `utilization`
    of the device's `total` memory; it already `held` (its weights), `reserve` stays for activations.
    A ValueError naming the fraction when other processes hold more than the rest of the device, or
    when nothing is left for the cache."""
    gib = float(1 << 30)
    share = int(utilization * total)
    others = max(0, total - free - held)
    if share > total - others:
        raise ValueError(
            f"gpu_memory_utilization={utilization} asks for {share / gib:.1f} GiB of the device's {total / gib:.1f} GiB, "
            f"but other processes hold {others / gib:.1f} GiB of it: lower it to at most {(total - others) / total:.2f}"
        )
    budget = share - held - reserve
    if budget <= 0:
        raise ValueError(
            f"gpu_memory_utilization={utilization} gives this engine {share / gib:.1f} GiB, and the weights already hold "
            f"{held / gib:.1f} GiB and activations need about {reserve / gib:.1f} GiB: nothing is left for the KV cache; raise it"
        )
    return budget


def _no_token_allowed(seq: Sequence) -> BaseException:
    """The error of a sequence whose own restrictions left no token to sample (SampleResult.blocked):
    a RequestError naming them, the first as the field at fault."""
    p = seq.params
    n = len(seq.output_token_ids)
    fields = [name for name, on in (
        ("allowed_token_ids", p.allowed_token_ids is not None),
        ("bad_words", seq.bad_words is not None),
        ("min_tokens", n < p.min_tokens),
        (seq.structured.param if seq.structured is not None else "", seq.structured is not None and seq.structured.constrains_answer),
    ) if on]
    if not fields:  # (nothing of its own masks tokens: not the request's fault)
        return RuntimeError(f"no token is allowed for sequence {seq.seq_id}")
    where = f"after the {n} tokens of the reply so far" if n else "at the reply's first token"
    verb = "allows" if len(fields) == 1 else "together allow"
    return RequestError(f"{' and '.join(fields)} {verb} no token {where}: each token is excluded by one of them",
                        param=fields[0])


def _picks(result: SampleResult, seqs: list[Sequence]) -> Iterator[tuple[int, Optional[Logprob]]]:
    """(token, logprob entry or None) per row of a sampler result, for sequences in row order."""
    for i, seq in enumerate(seqs):
        lp = None
        if result.logprobs is not None and seq.params.logprobs is not None:
            top = result.top_logprobs[i] if result.top_logprobs is not None else None
            lp = Logprob(result.token_ids[i], result.logprobs[i], list(top or []))
        yield result.token_ids[i], lp


def kv_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's torch dtype for an EngineConfig.kv_cache_dtype ("auto": the model's)."""
    if kv_cache_dtype == "auto":
        return model_dtype
    return FP8_KV_DTYPES.get(kv_cache_dtype) or getattr(torch, kv_cache_dtype)


def default_kv_cache_dtype(model: DecoderForCausalLM, dtype: torch.dtype, device: torch.device) -> str:
    """The KV cache dtype when none is asked for, for a model whose dtype was chosen by default:
    "bfloat16" on a CPU without native bf16 products, where models run in float32 only for the
    products' sake (device.cpu_has_bf16), if the attention kernel that reads bf16 caches takes every
    layer and is the decode attention chosen here: half the memory (twice the context in the same
    budget, as llama.cpp's f16 cache), the same attention speed (benchmarks/RESULTS.md). Else
    "auto" (the model's dtype)."""
    from pangu_infer.device import cpu_has_bf16
    from pangu_infer.models.layers import Attention, decode_kernel_chosen, decode_kernel_takes

    if device.type != "cpu" or dtype != torch.float32 or cpu_has_bf16():
        return "auto"
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for m in layers:
        k_shape, v_shape = m.cache_shapes(1)  # (one slot: the kernel looks at shapes and dtypes only)
        k = torch.empty(k_shape, dtype=torch.bfloat16)
        v = None if v_shape is None else torch.empty(v_shape, dtype=torch.bfloat16)
        if not decode_kernel_takes(m, torch.bfloat16, k, v):
            return "auto"
    return "bfloat16" if layers and decode_kernel_chosen(torch.bfloat16) else "auto"

