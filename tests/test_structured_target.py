"""The issue's target on the demo model: response_format json_schema, 20 of 20 sampled replies parse and
validate (jsonschema) for three schemas (nested objects, arrays, enums). A real `pangu-infer serve`
process and the official `openai` client; one request with n=20 per schema (about 40 s each on a
loaded 2-core machine)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from fixtures_server import running_server
from test_structured import ARRAYS, ENUMS, MESSAGES, NESTED


@pytest.fixture(scope="module")
def server(smollm2_gguf_path, tmp_path_factory):
    with running_server(smollm2_gguf_path, "--max-num-seqs", "32", "--kv-cache-memory", "256MiB",
                        log_dir=tmp_path_factory.mktemp("structured_target")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.mark.parametrize("schema", [NESTED, ARRAYS, ENUMS], ids=["nested", "arrays", "enums"])
def test_20_of_20_sampled_replies_validate(client, server, schema):
    out = client.chat.completions.create(
        model=server.model, messages=MESSAGES, n=20, temperature=1.0, seed=7, max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}},
    )
    assert len(out.choices) == 20
    for choice in out.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), schema)


