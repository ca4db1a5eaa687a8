"""/metrics under vLLM's names: what routers, autoscalers and dashboards built for vLLM read
(`vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`, `vllm:lora_requests_info`, ...).
Parsed with prometheus_client's own parser."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from pangu_infer import LLM, SamplingParams
from pangu_infer.lora import LoRARequest
from pangu_infer.server.app import create_app
from pangu_infer.server.metrics import ServerMetrics


def samples(text: str) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value of every sample in a Prometheus exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture(scope="module")
def llm(tiny_dense_dir, lora_adapters):
    return LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20, enforce_eager=True,
               enable_lora=True, max_loras=2, max_lora_rank=8, max_num_seqs=2)


def test_a_served_request_moves_vllms_counters_and_histograms(llm):
    with TestClient(create_app(llm, served_model_name="m")) as http:
        for _ in range(2):
            r = http.post("/v1/completions", json={"model": "m", "prompt": "hello there", "max_tokens": 3, "temperature": 0})
            assert r.status_code == 200
        prompt_tokens = r.json()["usage"]["prompt_tokens"]
        got = samples(http.get("/metrics").text)
    m = (("model_name", "m"),)
    assert got[("vllm:request_success_total", (("finished_reason", "length"), ("model_name", "m")))] == 2
    assert got[("vllm:time_to_first_token_seconds_count", m)] == 2
    assert got[("vllm:e2e_request_latency_seconds_count", m)] == 2
    assert got[("vllm:e2e_request_latency_seconds_sum", m)] >= got[("vllm:time_to_first_token_seconds_sum", m)] > 0
    assert got[("vllm:request_time_per_output_token_seconds_count", m)] == 2
    assert got[("vllm:prompt_tokens_total", m)] == got[("pangu_prompt_tokens_total", (("model", "m"),))] >= 2 * prompt_tokens
    assert got[("vllm:generation_tokens_total", m)] == 6
    assert got[("vllm:num_requests_running", m)] == got[("vllm:num_requests_waiting", m)] == 0
    assert got[("vllm:kv_cache_usage_perc", m)] == got[("vllm:gpu_cache_usage_perc", m)] == 0
    assert ("vllm:num_preemptions_total", m) in got and ("vllm:prefix_cache_queries_total", m) in got


def test_requests_not_sequences_and_their_adapters_are_counted(llm, lora_adapters):
    engine = llm.engine
    full = LoRARequest("full", 1, str(lora_adapters["full"].path))
    attn = LoRARequest("attn", 2, str(lora_adapters["attn"].path))
    params = SamplingParams(temperature=0.8, max_tokens=4, n=2, seed=1)
    engine.add_request("a", [5, 6, 7], params, lora_request=full)  # two sequences, both running
    engine.add_request("b", [5, 6, 8], SamplingParams(max_tokens=4), lora_request=attn)  # waits: max_num_seqs=2
    engine.add_request("c", [5, 6, 9], SamplingParams(max_tokens=4))  # waits, base model
    try:
        engine.step()  # a's prompt
        engine.step()  # its second sequence joins from the prefix cache
        stats = engine.stats()
        assert (stats["num_running"], stats["num_requests_running"]) == (2, 1)
        assert stats["num_requests_waiting"] == 2
        assert stats["lora_running"] == ["full"] and stats["lora_waiting"] == ["attn"]
        got = samples(ServerMetrics("m").render(stats, {}).decode())
    finally:
        for rid in "abc":
            engine.abort_request(rid)
    m = (("model_name", "m"),)
    assert got[("vllm:num_requests_running", m)] == 1 and got[("vllm:num_requests_waiting", m)] == 2
    info = [labels for (name, labels) in got if name == "vllm:lora_requests_info"]
    assert info == [(("max_lora", "2"), ("running_lora_adapters", "full"), ("waiting_lora_adapters", "attn"))]


def test_the_engine_line_is_logged_while_requests_run_unless_disable_log_stats(llm, caplog, monkeypatch):
    """vLLM's periodic engine line (its default; --disable-log-stats turns it off): prompt tokens forwarded
    and tokens generated per second over the interval, requests running and waiting, KV cache use and
    the prefix cache's hit rate; nothing while the server is idle."""
    import logging
    import re
    import time

    from pangu_infer.server import metrics

    monkeypatch.setattr(metrics, "LOG_STATS_INTERVAL_S", 0.5)
    caplog.set_level(logging.INFO, logger=metrics.STATS_LOGGER)
    line = re.compile(r"Avg prompt throughput: ([\d.]+) tokens/s, Avg generation throughput: ([\d.]+) tokens/s, Running: (\d+) reqs, "
                      r"Waiting: (\d+) reqs, KV cache usage: ([\d.]+)%, Prefix cache hit rate: ([\d.]+)%")

    def lines() -> list:
        return [line.fullmatch(r.getMessage()) for r in caplog.records if r.name == metrics.STATS_LOGGER]

    for log_stats in (True, False):
        caplog.clear()
        with TestClient(create_app(llm, served_model_name="m", log_stats=log_stats)) as http:
            time.sleep(0.7)  # idle: no line
            assert lines() == []
            r = http.post("/v1/completions", json={"model": "m", "prompt": "hello there " * 8, "max_tokens": 40, "temperature": 0,
                                                   "ignore_eos": True})
            assert r.status_code == 200
            time.sleep(1.3)  # the interval that saw it, then an idle one
        got = lines()
        if not log_stats:
            assert got == []
            continue
        assert got and all(got), [r.getMessage() for r in caplog.records]
        prompt, generation = sum(float(m[1]) for m in got), sum(float(m[2]) for m in got)
        assert prompt > 0 and generation > 0
        assert all(float(m[5]) <= 100 and float(m[6]) <= 100 for m in got)
        assert len(got) <= 2  # the idle intervals after it log nothing


def test_serve_takes_disable_log_stats_and_disable_fastapi_docs(tiny_dense_dir, monkeypatch):
    """`pangu-infer serve` makes its app with the engine line and the API docs on, and each off with
    vLLM's --disable-log-stats and --disable-fastapi-docs."""
    import uvicorn

    from pangu_infer.cli import main
    from pangu_infer.server import app as server_app

    made = []
    monkeypatch.setattr(server_app, "create_app", lambda *a, **k: made.append((k["log_stats"], k["docs"])))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    base = ["serve", str(tiny_dense_dir), "--dtype", "float32", "--enforce-eager", "--max-model-len", "64", "--kv-cache-memory", "4MiB", "--port", "0"]
    for flags in ([], ["--disable-log-stats"], ["--disable-fastapi-docs"]):
        assert main([*base, *flags]) == 0
    assert made == [(True, True), (False, True), (True, False)]


def test_without_docs_the_api_docs_are_404_and_the_api_answers(llm):
    """create_app(docs=False) (vLLM's --disable-fastapi-docs): /docs, /redoc and /openapi.json are gone."""
    for docs in (True, False):
        with TestClient(create_app(llm, served_model_name="m", docs=docs)) as http:
            for path in ("/docs", "/redoc", "/openapi.json"):
                assert http.get(path).status_code == (200 if docs else 404), (docs, path)
            assert http.get("/v1/models").json()["data"][0]["id"] == "m"
