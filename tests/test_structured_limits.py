"""The grammar cache as a hostile client meets it (pangu_infer.engine.structured.GrammarCache, on
the tiny byte-level Pangu tokenizer): what a 400 says when xgrammar refuses a constraint, grammars
that match nothing, the limits on what a constraint may hold, the cache bounded by bytes, and a slow
compile that holds up no other request."""

from __future__ import annotations

import gc
import re
import threading
import time

import pytest
import torch

from pangu_infer.engine import structured
from pangu_infer.engine.structured import GrammarCache, StructuredState, _xgrammar_message, allocate_bitmask, pattern_repetition
from pangu_infer.errors import RequestError
from pangu_infer.sampling_params import StructuredOutputsParams

# what must never reach a client: xgrammar's log prefix, C++ source paths, internal checks
INTERNALS = re.compile(r"\[\d\d:\d\d:\d\d\]|/project/|\.cc\b|Check failed|std::|holds_alternative")


@pytest.fixture()
def grammars(pangu_tokenizer):
    return GrammarCache(pangu_tokenizer, pangu_tokenizer.vocab_size, [pangu_tokenizer.eos_token_id])


def _refusal(grammars: GrammarCache, **spec) -> RequestError:
    with pytest.raises(RequestError) as info:
        grammars.compile(StructuredOutputsParams(**spec))
    return info.value


@pytest.mark.parametrize(
    "spec, param, message",
    [
        ({"json": {"type": "object", "properties": {"a": {"type": "nope"}}}}, "structured_outputs.json", 'Unsupported type "nope"'),
        ({"json": {"type": "integer", "minimum": 10, "maximum": 1}}, "structured_outputs.json", "Invalid range: minimum greater than maximum"),
        ({"json": {"type": "string", "pattern": "(("}}, "structured_outputs.json", "Regex parsing error at position 3: The parenthesis is not closed."),
        ({"regex": "(("}, "structured_outputs.regex", "Regex parsing error at position 3: The parenthesis is not closed."),
        # the position xgrammar gives is in the EBNF it made of the regex, not in the regex: left out
        ({"regex": "a{5,1}"}, "structured_outputs.regex", "Lower bound is larger than upper bound: 5 > 1"),
        # in a grammar the client wrote, line and column are theirs: kept
        ({"grammar": "root ::= undefined_rule"}, "structured_outputs.grammar", 'EBNF parser error at line 1, column 10: Rule "undefined_rule" is not defined'),
        ({"structural_tag": {"type": "nope"}}, "structured_outputs.structural_tag", "Structural tag's type must be a string \"structural_tag\""),
        ({"structural_tag": {"type": "structural_tag", "format": {"type": "nope"}}}, "structured_outputs.structural_tag", "Format type not recognized: nope"),
    ],
)
def test_xgrammar_errors_say_what_is_wrong_without_its_internals(grammars, spec, param, message):
    error = _refusal(grammars, **spec)
    assert error.param == param
    assert str(error) == f"{param} is invalid: {message}"
    assert not INTERNALS.search(str(error)), str(error)


def test_xgrammar_message_cleans_any_prefix_path_check_and_stack():
    raw = RuntimeError(
        "[06:21:41] /project/cpp/grammar_compiler.cc:1318: Check failed: (std::holds_alternative<Grammar>(result)) "
        "is false: Invalid structural tag error: Format type not recognized: x\nStack trace:\n  File \"/project/cpp/a.cc\", line 3\n"
    )
    assert _xgrammar_message(raw, "structural_tag") == "Format type not recognized: x"
    assert _xgrammar_message(RuntimeError("[06:21:41] /project/cpp/x.cc:5: Check failed: (a) is false"), "json") == "xgrammar cannot compile it"
    assert _xgrammar_message(RuntimeError("x" * 1000), "json") == "x" * 297 + "..."


@pytest.mark.parametrize(
    "spec, param",
    [
        ({"regex": "[^\\s\\S]"}, "structured_outputs.regex"),
        ({"grammar": "root ::= [^\\x00-\\U0010ffff]"}, "structured_outputs.grammar"),
        # the opening quote is the only token allowed, then nothing: found by following it
        ({"json": {"type": "string", "pattern": "[^\\s\\S]"}}, "structured_outputs.json"),
        ({"structural_tag": {"type": "structural_tag", "format": {"type": "regex", "pattern": "[^\\s\\S]"}}}, "structured_outputs.structural_tag"),
    ],
)
def test_a_grammar_that_matches_nothing_is_refused_when_it_compiles(grammars, spec, param):
    error = _refusal(grammars, **spec)
    assert error.param == param
    assert str(error) == f"{param} matches no output: no text (not even an empty one) satisfies it"


@pytest.mark.parametrize(
    "spec",
    [{"grammar": 'root ::= ""'}, {"regex": "(abc)*"}, {"regex": "a"}, {"regex": "x" * 100}, {"choice": ["yes", "no"]}, {"json_object": True}],
)
def test_grammars_that_match_something_compile(grammars, spec):
    assert grammars.compile(StructuredOutputsParams(**spec)) is not None


# ---------------------------------------------------------------------- limits on what a constraint holds
def _object(n_properties: int, required: bool) -> dict:
    props = {f"p{i}": {"type": "integer"} for i in range(n_properties)}
    return {"type": "object", "properties": props, **({"required": list(props)} if required else {})}


@pytest.mark.parametrize(
    "spec, param, message",
    [
        ({"choice": [f"c{i}" for i in range(10_001)]}, "structured_outputs.choice", "has 10001 choices; at most 10000"),
        ({"choice": ["x" * 60_000, "y" * 60_001]}, "structured_outputs.choice", "has 120001 characters of choices; at most 120000"),
        ({"regex": "a" * 120_001}, "structured_outputs.regex", "has 120001 characters; at most 120000"),
        ({"grammar": 'root ::= "' + "a" * 120_000 + '"'}, "structured_outputs.grammar", "has 120011 characters; at most 120000"),
        ({"json": {"enum": list(range(10_001))}}, "structured_outputs.json", "has 10001 enum values; at most 10000"),
        ({"json": {"type": "object", "properties": {"a": {"enum": ["v" * 60_000]}, "b": {"const": "w" * 60_000}}}},
         "structured_outputs.json", "has 120031 characters of literal text (names, enum and const values, patterns); at most 120000"),
        ({"json": _object(5_001, required=True)}, "structured_outputs.json", "has 5001 properties; at most 5000"),
        ({"json": {"type": "object", "properties": {"a": _object(300, False), "b": _object(201, False)}, "required": ["a", "b"]}},
         "structured_outputs.json", "has 501 optional properties (not in their object's required); at most 500"),
        ({"json": {"type": "string", "pattern": "[a-z]{1,2001}"}}, "structured_outputs.json",
         "has a pattern that repeats up to 2001 characters ('[a-z]{1,2001}'); at most 2000"),
        ({"json": {"type": "string", "pattern": "([a-z]{1,100}[0-9]{1,100}){1,100}"}}, "structured_outputs.json",
         "has a pattern that repeats up to 20000 characters ('([a-z]{1,100}[0-9]{1,100}){1,100}'); at most 2000"),
        ({"structural_tag": {"type": "structural_tag", "format": {"type": "json_schema", "json_schema": _object(501, False)}}},
         "structured_outputs.structural_tag", "has 501 optional properties (not in their object's required); at most 500"),
    ],
)
def test_a_constraint_over_the_limits_is_refused_before_it_compiles(grammars, spec, param, message):
    start = time.perf_counter()
    error = _refusal(grammars, **spec)
    assert error.param == param
    assert str(error).startswith(f"{param} {message}"), str(error)
    assert time.perf_counter() - start < 2
    assert grammars.stats()["misses"] == 0


@pytest.mark.parametrize(
    "spec",
    [
        {"choice": [f"c{i}" for i in range(10_000)]},
        {"json": {"type": "string", "pattern": "[a-z]{1,100}", "description": "d" * 200_000}},  # annotations are not compiled
        {"json": _object(400, False)},
        {"json": {"type": "string", "pattern": "^\\d{3}-\\d{4}$"}},
    ],
)
def test_constraints_within_the_limits_compile(grammars, spec):
    assert grammars.compile(StructuredOutputsParams(**spec)) is not None


@pytest.mark.parametrize(
    "pattern, repetition",
    [("abc", 3), ("[a-z]+", 1), ("^[0-9]{5}$", 5), ("[a-z]{1,100}", 100), (".{0,2000}", 2000), ("\\d{3}-\\d{4}", 8),
     ("[]a{]{10}", 10), ("(a(b{10}){10}){10}", 1010), ("(ab|cd){1,500}", 2000), ("([a-z]{1,100}[0-9]{1,100}){1,100}", 20000)],
)
def test_pattern_repetition(pattern, repetition):
    assert pattern_repetition(pattern) == repetition


# ---------------------------------------------------------------------- the cache, bounded by bytes
def _choice(i: int) -> StructuredOutputsParams:
    return StructuredOutputsParams(choice=[f"answer {i} {j}" for j in range(40)])


def test_the_cache_is_bounded_by_bytes_evicting_the_least_recently_used(pangu_tokenizer):
    size = GrammarCache(pangu_tokenizer, pangu_tokenizer.vocab_size, [pangu_tokenizer.eos_token_id]).compile(_choice(0)).memory_size_bytes
    grammars = GrammarCache(pangu_tokenizer, pangu_tokenizer.vocab_size, [pangu_tokenizer.eos_token_id], max_bytes=int(size * 2.5))
    a = grammars.compile(_choice(0))
    grammars.compile(_choice(1))
    assert grammars.compile(_choice(0)) is a  # a hit: 0 is now the most recently used
    grammars.compile(_choice(2))  # over the budget: 1 goes
    assert grammars.stats()["entries"] == 2 and grammars.stats()["bytes"] <= grammars.max_bytes
    misses = grammars.misses
    assert grammars.compile(_choice(0)) is a and grammars.misses == misses
    grammars.compile(_choice(1))
    assert grammars.misses == misses + 1


def test_a_grammar_larger_than_the_cache_alone_is_refused(pangu_tokenizer):
    grammars = GrammarCache(pangu_tokenizer, pangu_tokenizer.vocab_size, [pangu_tokenizer.eos_token_id], max_bytes=4096)
    with pytest.raises(RequestError) as info:
        grammars.compile(_choice(0))
    assert info.value.param == "structured_outputs.choice"
    assert re.fullmatch(r"structured_outputs.choice compiles to a grammar of \d+ KiB; this server holds at most 4 KiB of grammars", str(info.value))


def test_an_evicted_grammar_serves_the_request_that_holds_it(pangu_tokenizer):
    grammars = GrammarCache(pangu_tokenizer, pangu_tokenizer.vocab_size, [pangu_tokenizer.eos_token_id], max_bytes=1 << 20, max_entries=1)
    state = StructuredState(grammars.compile(StructuredOutputsParams(choice=["hello world"])), None, [], None)
    for i in range(1, 4):
        grammars.compile(_choice(i))  # evicts it
    gc.collect()
    text = b""
    bitmask = allocate_bitmask(1, pangu_tokenizer.vocab_size)
    vocab = pangu_tokenizer.grammar_vocab()[1]
    while state.needs_mask():
        state.fill_mask(bitmask, 0)
        logits = torch.zeros(1, pangu_tokenizer.vocab_size)
        structured.apply_bitmask(logits, bitmask, [0])
        token = int(logits[0].argmax())
        state.accept(token)
        text += vocab[token]  # (the end: b"")
    assert text == b"hello world"


# ---------------------------------------------------------------------- a slow compile holds up no one else
def test_a_slow_compile_holds_up_no_other_grammar_and_compiles_once(pangu_tokenizer, monkeypatch):
    grammars = GrammarCache(pangu_tokenizer, pangu_tokenizer.vocab_size, [pangu_tokenizer.eos_token_id])
    cached = grammars.compile(_choice(0))
    inside, release = threading.Event(), threading.Event()
    compile_real = grammars._xgrammar_compile
    calls = []

    def slow(kind, text, spec):
        calls.append(text)
        if "slow" in text:
            inside.set()
            release.wait(30)
        return compile_real(kind, text, spec)

    monkeypatch.setattr(grammars, "_xgrammar_compile", slow)
    slow_spec = StructuredOutputsParams(choice=["slow"])
    results: dict[str, object] = {}

    def run(name, spec):
        results[name] = grammars.compile(spec)

    first = threading.Thread(target=run, args=("first", slow_spec))
    first.start()
    try:
        assert inside.wait(30)
        second = threading.Thread(target=run, args=("second", slow_spec))  # the same grammar: waits for that compile
        second.start()
        others = threading.Thread(target=lambda: (run("hit", _choice(0)), run("other", _choice(1))))
        others.start()
        others.join(10)
        assert not others.is_alive(), "a cache hit or another grammar's compile waited for the slow compile"
        assert results["hit"] is cached and results["other"] is not None
        assert "first" not in results and "second" not in results
    finally:
        release.set()
        first.join(30)
        second.join(30)
    assert results["first"] is results["second"]
    assert sum("slow" in text for text in calls) == 1


DEAD_END = {"type": "object", "properties": {"a": {"type": "string", "pattern": "[^\\s\\S]"}}, "required": ["a"]}


def test_a_dead_end_further_on_is_the_requests_error_and_drafts_stop_before_it(grammars, pangu_tokenizer):
    """The check at admission passes it (the first tokens branch); after `{"a": "` the grammar
    allows nothing. Filling that mask is a GrammarDeadEnd naming the field (a RequestError: the
    client's 400); a draft through it is verified only up to the token that leads there."""
    spec = StructuredOutputsParams(json=DEAD_END, param_name="response_format.json_schema")
    compiled = grammars.compile(spec)
    prefix = pangu_tokenizer.encode('{"a": "', add_special_tokens=False)[1:]  # (after SentencePiece's leading '▁')
    state = StructuredState(compiled, None, [], None, param=spec.param)
    bitmask = allocate_bitmask(len(prefix) + 1, pangu_tokenizer.vocab_size)
    rows, keep = state.draft_masks(prefix, bitmask)
    assert (rows, keep) == (list(range(len(prefix))), len(prefix) - 1)
    assert state.answer_tokens == 0  # the matcher is left as it was
    for token in prefix:
        state.accept(token)
    with pytest.raises(structured.GrammarDeadEnd) as info:
        state.fill_mask(allocate_bitmask(1, pangu_tokenizer.vocab_size), 0)
    assert isinstance(info.value, RequestError) and info.value.param == "response_format.json_schema"
    assert str(info.value).startswith(f"response_format.json_schema allows no next token after the {len(prefix)} tokens")
    with pytest.raises(structured.GrammarDeadEnd):
        state.draft_masks([prefix[0]], allocate_bitmask(2, pangu_tokenizer.vocab_size))


# Each keyword UNENFORCED_KEYWORDS (and the other refusals) names, with a reply that breaks it.
UNENFORCED = [
    ("not", {"type": "integer", "not": {"const": 3}}, "3"),
    ("if", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}}, '{"a": 1}'),
    ("contains", {"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}}, "[1]"),
    ("dependentRequired", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                           "dependentRequired": {"a": ["b"]}}, '{"a": 1}'),
    ("dependentSchemas", {"type": "object", "properties": {"a": {"type": "integer"}},
                          "dependentSchemas": {"a": {"required": ["b"]}}}, '{"a": 1}'),
    ("dependencies", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                      "dependencies": {"a": ["b"]}}, '{"a": 1}'),
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1, 1]"),
    ("allOf of several schemas", {"allOf": [{"type": "integer"}, {"minimum": 5}]}, "3"),
    ("allOf beside other keywords", {"type": "integer", "allOf": [{"minimum": 5}]}, "3"),
    ("a $ref outside the schema", {"$ref": "http://example.com/x.json"}, "1"),
]


def _byte_compiler():
    import xgrammar as xgr

    info = xgr.TokenizerInfo([bytes([i]) for i in range(256)] + [b""], xgr.VocabType.RAW, vocab_size=257, stop_token_ids=[256])
    return xgr.GrammarCompiler(info, cache_enabled=False)


@pytest.mark.parametrize("keyword, schema, breaking", UNENFORCED, ids=[c[0] for c in UNENFORCED])
def test_xgrammar_still_ignores_each_keyword_that_is_refused(keyword, schema, breaking):
    """Why each is refused: xgrammar compiles the schema (as the engine does) and accepts a reply
    that breaks it. When this fails, xgrammar enforces the keyword now: drop it from the refusals."""
    import json

    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(_byte_compiler().compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True))
    assert all(matcher.accept_token(b) for b in breaking.encode()) and matcher.accept_token(256), keyword


@pytest.mark.parametrize("keyword, schema, breaking", UNENFORCED, ids=[c[0] for c in UNENFORCED])
def test_a_schema_keyword_xgrammar_ignores_is_refused_naming_it_and_where(grammars, keyword, schema, breaking):
    nested = {"type": "object", "properties": {"a/b": {"type": "array", "items": schema}}, "required": ["a/b"]}
    error = _refusal(grammars, json=nested, param_name="response_format.json_schema")
    assert error.param == "structured_outputs.json"
    assert str(error).startswith(f"structured_outputs.json uses {keyword}") and "(at #/properties/a~1b/items" in str(error), str(error)
    # in a structural tag's schema too, and where the server named it
    tag = {"type": "structural_tag", "format": {"type": "json_schema", "json_schema": schema}}
    assert "structural_tag uses" in str(_refusal(grammars, structural_tag=tag))


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"not": {"type": "integer"}, "if": {"type": "string"}}, "required": ["not"]},  # names
    {"$defs": {"X": {"type": "integer"}}, "title": "T", "description": "d", "allOf": [{"$ref": "#/$defs/X"}]},  # pydantic v1
    {"type": "array", "items": {"type": "integer"}, "uniqueItems": False},
    {"type": "string", "format": "regex"},  # an unknown format is an annotation (JSON Schema 2020-12)
])
def test_schemas_xgrammar_enforces_compile(grammars, schema):
    assert grammars.compile(StructuredOutputsParams(json=schema)) is not None


def test_tool_schemas_are_enforced_as_far_as_xgrammar_does_not_refused(grammars):
    """A function's parameters describe it to the model too; OpenAI refuses none of these unless strict."""
    tag = {"type": "structural_tag", "format": {"type": "json_schema", "json_schema": {c[0]: c[1] for c in UNENFORCED}["uniqueItems"]}}
    assert grammars.compile(StructuredOutputsParams(structural_tag=tag, param_name="tools")) is not None


def test_the_compiler_takes_the_engines_threads_not_eight(pangu_tokenizer, monkeypatch):
    """xgrammar compiles with 8 threads by default: on a machine (or a container's CPU quota) with
    fewer cores they fight the engine's steps; the compiler gets the products' thread count."""
    import xgrammar as xgr

    built = []
    real = xgr.GrammarCompiler

    def spy(*args, **kwargs):
        built.append(kwargs.get("max_threads"))
        return real(*args, **kwargs)

    monkeypatch.setattr(xgr, "GrammarCompiler", spy)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    GrammarCache(pangu_tokenizer, pangu_tokenizer.vocab_size, [pangu_tokenizer.eos_token_id]).compile(StructuredOutputsParams(regex="a+"))
    assert built == [1]
