"""Output processing, after each accepted token: the detokenized text, the stop checks (stop ids,
EOS, stop strings, length), and a request's outputs as incremental RequestOutputs."""

from __future__ import annotations

from typing import Optional

from pangu_infer.engine.sequence import Sequence
from pangu_infer.outputs import CompletionOutput, RequestOutput


def finish_reason(seq: Sequence, token: int, eos_token_ids: set[int], max_model_len: int) -> Optional[str]:
    """After `token` joined `seq`: its new text, and why it stops now ("stop", "length") or None."""
    params = seq.params
    n_out = len(seq.output_token_ids)
    reason: Optional[str] = None
    if n_out >= params.min_tokens:
        if token in params.stop_token_ids:
            reason, seq.stop_reason = "stop", token
        elif token in eos_token_ids and not params.ignore_eos:
            reason = "stop"
    if reason is None and seq.detokenizer is not None:
        prev = len(seq.output_text)
        seq.output_text += seq.detokenizer.step([token])
        if params.stop and n_out >= params.min_tokens:
            reason = check_stop_strings(seq, prev)
    if reason is None and (n_out >= (params.max_tokens or 0) or seq.num_tokens >= max_model_len):
        reason = "length"
    if reason == "length" and seq.detokenizer is not None:
        seq.output_text += seq.detokenizer.flush()  # bytes no later token can complete
    return reason


def check_stop_strings(seq: Sequence, prev_len: int) -> Optional[str]:
    """Return "stop" when a stop string now appears in the text (cut there), else None."""
    longest = max(len(s) for s in seq.params.stop)
    search_from = max(0, prev_len - longest + 1)
    best = None
    for stop in seq.params.stop:
        idx = seq.output_text.find(stop, search_from)
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, stop)
    if best is None:
        return None
    idx, stop = best
    end = idx + len(stop) if seq.params.include_stop_str_in_output else idx
    seq.output_text = seq.output_text[:end]
    seq.stop_reason = stop
    return "stop"


def request_output(
    request_id: str, prompt: Optional[str], prompt_token_ids: list[int], seqs: list[Sequence], finished: bool,
    error: Optional[str], error_param: Optional[str] = None,
) -> RequestOutput:
    """What a request's sequences have produced since the last call, with the totals so far."""
    outs = []
    for seq in seqs:
        text = seq.output_text
        if not seq.is_finished and seq.params.stop:
            # Hold back what could still become a stop string, so streamed text is never retracted.
            hold = max(len(s) for s in seq.params.stop) - 1
            text = text[: max(len(text) - hold, seq.emitted_text_len)]
        want_lp = seq.params.logprobs is not None
        outs.append(
            CompletionOutput(
                index=seq.index,
                text=text,
                token_ids=list(seq.output_token_ids),
                cumulative_logprob=seq.cumulative_logprob if want_lp else None,
                logprobs=list(seq.logprobs) if want_lp else None,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
                text_delta=text[seq.emitted_text_len :],
                token_ids_delta=seq.output_token_ids[seq.emitted_token_len :],
                logprobs_delta=seq.logprobs[seq.emitted_token_len :] if want_lp else None,
            )
        )
        seq.emitted_text_len = len(text)
        seq.emitted_token_len = len(seq.output_token_ids)
    first = seqs[0]
    metrics = {
        "ttft": first.ttft(),
        "tpot": first.tpot(),
        # arrival in the engine to the latest token (the whole request's latency once finished)
        "e2e": None if first.last_token_time is None else first.last_token_time - first.arrival_time,
        "num_cached_tokens": first.num_cached_tokens,
        "num_preemptions": sum(s.num_preemptions for s in seqs),
    }
    if first.params.prediction is not None:  # its predicted output's draft tokens taken and not taken
        predictions = [s.prediction for s in seqs if s.prediction is not None]
        metrics["accepted_prediction_tokens"] = sum(p.accepted for p in predictions)
        metrics["rejected_prediction_tokens"] = sum(p.rejected for p in predictions)
    prompt_logprobs = list(first.prompt_logprobs) if first.prompt_logprobs is not None else None
    return RequestOutput(request_id, prompt, prompt_token_ids, outs, finished, metrics, error=error, error_param=error_param,
                         prompt_logprobs=prompt_logprobs)
