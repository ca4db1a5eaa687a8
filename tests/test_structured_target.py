"""The issue's target on the demo model: response_format json_schema, 20 of 20 sampled replies parse and
validate (jsonschema) for three schemas (nested objects, arrays, enums). The server app in this
process (test_structured.py runs a real `pangu-infer serve`) and the official `openai` client; one
request with n=20 per schema (about 40 s each on a loaded 2-core machine)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from fastapi.testclient import TestClient

from pangu_infer import LLM
from pangu_infer.server.app import create_app
from test_structured import ARRAYS, ENUMS, MESSAGES, NESTED
from fixtures_server import sdk_client


@pytest.fixture(scope="module")
def client(smollm2_gguf_path):
    llm = LLM(str(smollm2_gguf_path), dtype="float32", enforce_eager=True, max_num_seqs=32, kv_cache_memory=256 << 20)
    with TestClient(create_app(llm, served_model_name="demo")) as http:
        yield sdk_client(http)


@pytest.mark.parametrize("schema", [NESTED, ARRAYS, ENUMS], ids=["nested", "arrays", "enums"])
def test_20_of_20_sampled_replies_validate(client, schema):
    out = client.chat.completions.create(
        model="demo", messages=MESSAGES, n=20, temperature=1.0, seed=7, max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}},
    )
    assert len(out.choices) == 20
    for choice in out.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), schema)


