"""POST /v1/embeddings: OpenAI's embeddings API over the engine's embedding requests.

Each input is one prompt-only engine request (LLMEngine.add_request(pooling=...)), submitted like a
completion's prompts (streaming.start_requests: batched with the generation requests, the LoRA adapter
`model` names, --enable-log-requests), whose one output is its embedding: the model's final hidden
states pooled as serve --pooling says, L2-normalized (unless the request's normalize is false; its
truncate_prompt_tokens keeps each input's last tokens, as a completion's does). Inputs are checked with the engine's own
admission before anything is submitted, so a bad one is a 400 naming `input` (and which one).
"""

from __future__ import annotations

import asyncio
import base64
from typing import Optional

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pangu_infer.engine.admission import admit
from pangu_infer.engine.engine import embedding_params
from pangu_infer.errors import RequestError, short_repr
from pangu_infer.outputs import EmbeddingRequestOutput
from pangu_infer.server.errors import APIError
from pangu_infer.server.params import check_model, log_ignored_fields
from pangu_infer.server.protocol import EmbeddingRequest
from pangu_infer.server.state import ServerState
from pangu_infer.server.streaming import close_all, start_requests, unless_gone

# Inputs of one request, as OpenAI allows: each is a request of its own in the engine, which runs
# --max-num-seqs at once and queues the rest (LangChain's OpenAIEmbeddings sends 1000 at a time).
MAX_INPUTS = 2048


async def handle(state: ServerState, req: EmbeddingRequest, request: Request) -> Response:
    lora = check_model(state, req.model)
    hidden = state.llm.config.hidden_size
    if req.dimensions is not None and req.dimensions != hidden:
        raise APIError(
            400,
            f"dimensions={short_repr(req.dimensions)}: this model's embeddings have {hidden} dimensions (its hidden size) "
            "and cannot be shortened (it was not trained for shortened embeddings); leave dimensions out or give "
            f"{hidden}",
            param="dimensions",
        )
    log_ignored_fields(req)  # (user)
    params = _params(req)
    prompts = await asyncio.to_thread(_inputs, state, req, params)
    pooling = getattr(state.llm, "pooling", "last")
    started = await unless_gone(request, start_requests(state, prompts, params, "embd", lora, pooling=pooling, normalize=req.normalize),
                                state.metrics)
    if isinstance(started, Response):
        return started
    _, gens, outputs = started
    await close_all(gens)  # (each stream has given its one output: nothing is left to abort)
    data = []
    for i, out in enumerate(outputs):
        assert isinstance(out, EmbeddingRequestOutput) and out.finished
        state.metrics.observe_request(out.metrics, ["stop"])
        vector = out.outputs.embedding
        value = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii") if req.encoding_format == "base64" else vector
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = sum(out.num_prompt_tokens for out in outputs)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return JSONResponse({"object": "list", "data": data, "model": state.reply_model(lora), "usage": usage})


def _params(req: EmbeddingRequest):
    """The inputs' engine parameters: embedding_params with the request's truncate_prompt_tokens and
    truncation_side, checked as a completion's are (an integer >= 1, or -1): a 400 naming it."""
    try:
        return embedding_params(req.truncate_prompt_tokens, req.truncation_side or "left")
    except RequestError as e:
        raise APIError(400, str(e), param=e.param) from None


def _inputs(state: ServerState, req: EmbeddingRequest, params) -> list[tuple[Optional[str], list[int]]]:
    """(text, token ids) of each input, checked as the engine admits it: not empty, no longer than the
    context (after truncate_prompt_tokens), ids in the vocabulary; at most MAX_INPUTS inputs (counted
    before any is tokenized)."""
    given = req.input
    if isinstance(given, list) and not given:
        raise APIError(400, "input is empty: give a text, a list of texts, token ids, or a list of token-id lists", param="input")
    single = isinstance(given, str) or all(isinstance(t, int) for t in given)  # one text, or one input's token ids
    items: list = [given] if single else list(given)
    if len(items) > MAX_INPUTS:
        raise APIError(400, f"input holds {len(items)} inputs; one request may embed at most {MAX_INPUTS}", param="input")
    limits = state.llm.engine.limits
    out = []
    for i, item in enumerate(items):
        where = "input" if single else f"input[{i}]"
        if not item:
            kind = "an empty string" if isinstance(item, str) else "an empty list of token ids"
            raise APIError(400, f"{where} is {kind}: an embedding needs at least one token", param="input")
        text = item if isinstance(item, str) else None
        ids = state.llm.tokenizer.encode(item, add_special_tokens=req.add_special_tokens) if text is not None else list(item)
        try:
            admit(ids, params, limits, prompt_only=True)
        except RequestError as e:
            raise APIError(400, f"{where}: {e}", param="input") from None
        out.append((text, ids))
    return out
