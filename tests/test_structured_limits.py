"""The grammar cache as a hostile client meets it (pangu_infer.engine.structured.GrammarCache, on
the tiny byte-level Pangu tokenizer): what a 400 says when xgrammar refuses a constraint."""

from __future__ import annotations

import re

import pytest

from pangu_infer.engine.structured import GrammarCache, _xgrammar_message
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
