import json
import random
import re
from typing import Any

import pytest

from pangu_infer.chat import (
    THINK_END,
    THINK_START,
    TOOL_CALL_END,
    TOOL_CALL_START,
    ChatStreamParser,
    is_pangu_template,
    parse_tool_calls,
    render_chat,
    split_reasoning,
    tools_system_prompt,
)
from pangu_infer.tokenizer import IncrementalDetokenizer, Tokenizer

from fixtures_tokenizer import real_pangu_tokenizer_config

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "当前天气",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_tiny_tokenizer_carries_the_real_pangu_chat_template(pangu_tokenizer: Tokenizer) -> None:
    assert pangu_tokenizer.chat_template == real_pangu_tokenizer_config()["chat_template"]
    assert is_pangu_template(pangu_tokenizer)


def test_real_template_renders_system_user_assistant_tool_conversation(pangu_tokenizer: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "北京今天天气怎么样？"},
        {"role": "assistant", "content": "我查一下。"},
        {"role": "tool", "content": '{"temperature": 20}'},
        {"role": "function", "content": "ok"},
    ]
    expected = (
        "[unused9]系统：你是一个乐于助人的助手。[unused10]"
        "[unused9]用户：北京今天天气怎么样？[unused10]"
        "[unused9]助手：我查一下。[unused10]"
        '[unused9]工具：{"temperature": 20}[unused10]'
        "[unused9]方法：ok[unused10]"
        "[unused9]助手："
    )
    assert render_chat(pangu_tokenizer, messages) == expected
    without_prompt = render_chat(pangu_tokenizer, messages, add_generation_prompt=False)
    assert without_prompt == expected.removesuffix("[unused9]助手：")


def test_conversation_without_system_gets_the_empty_system_turn(pangu_tokenizer: Tokenizer) -> None:
    rendered = render_chat(pangu_tokenizer, [{"role": "user", "content": "Hi"}])
    assert rendered == "[unused9]系统：[unused10][unused9]用户：Hi[unused10][unused9]助手："


def test_rendered_prompt_encodes_turn_markers_as_single_ids(pangu_tokenizer: Tokenizer) -> None:
    ids = pangu_tokenizer.encode(render_chat(pangu_tokenizer, [{"role": "user", "content": "Hi"}]))
    tokens = pangu_tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:5] == ["<s>", "[unused9]", "▁系统", "：", "[unused10]"]
    assert tokens[-3:] == ["[unused9]", "▁助手", "："]


@pytest.mark.parametrize(("enable_thinking", "suffix"), [(False, " /no_think"), ("auto", " /auto_think"),
                                                         (True, ""), (None, "")])
def test_thinking_switch_lands_at_the_end_of_the_last_user_message(
    pangu_tokenizer: Tokenizer, enable_thinking: Any, suffix: str
) -> None:
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "reply"},
        {"role": "user", "content": "second"},
        {"role": "tool", "content": "result"},
    ]
    rendered = render_chat(pangu_tokenizer, messages, enable_thinking=enable_thinking)
    assert "[unused9]用户：first[unused10]" in rendered
    assert f"[unused9]用户：second{suffix}[unused10][unused9]工具：result[unused10]" in rendered
    assert messages[2]["content"] == "second"  # the caller's messages are left alone


def test_thinking_switch_needs_a_user_message_and_a_known_value(pangu_tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="needs a user message"):
        render_chat(pangu_tokenizer, [{"role": "system", "content": "s"}], enable_thinking=False)
    with pytest.raises(ValueError, match="enable_thinking must be"):
        render_chat(pangu_tokenizer, [{"role": "user", "content": "u"}], enable_thinking="fast")


def test_other_templates_get_enable_thinking_as_a_template_variable(llama_tokenizer: Tokenizer) -> None:
    assert not is_pangu_template(llama_tokenizer)
    messages = [{"role": "user", "content": "Hi"}]
    fast = render_chat(llama_tokenizer, messages, enable_thinking=False)
    assert fast.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "/no_think" not in fast
    assert render_chat(llama_tokenizer, messages).endswith("<|im_start|>assistant\n")


def test_tools_go_into_a_new_system_turn(pangu_tokenizer: Tokenizer) -> None:
    rendered = render_chat(pangu_tokenizer, [{"role": "user", "content": "天气？"}], tools=[WEATHER_TOOL])
    spec = json.dumps(WEATHER_TOOL["function"], ensure_ascii=False)
    expected_system = (
        "# Tools\n\n"
        "You can call the following functions. Each line is one function, as JSON:\n"
        f"{spec}\n\n"
        "To call functions, reply with [unused11], then a JSON list of calls, then [unused12], e.g.\n"
        '[unused11][{"name": "function_name", "arguments": {"argument": "value"}}][unused12]\n'
        "Function results come back in a tool turn; then answer the user."
    )
    assert tools_system_prompt([WEATHER_TOOL]) == expected_system
    assert rendered == f"[unused9]系统：{expected_system}[unused10][unused9]用户：天气？[unused10][unused9]助手："


def test_tools_are_prepended_to_an_existing_system_message(pangu_tokenizer: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "天气？"}]
    rendered = render_chat(pangu_tokenizer, messages, tools=[WEATHER_TOOL])
    assert rendered.startswith(f"[unused9]系统：{tools_system_prompt([WEATHER_TOOL])}\n\nBe brief.[unused10]")
    assert rendered.count("[unused9]系统：") == 1


def test_assistant_tool_calls_render_in_the_marker_format(pangu_tokenizer: Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "北京天气？"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "晴，20度"},
    ]
    rendered = render_chat(pangu_tokenizer, messages)
    assert rendered == (
        "[unused9]系统：[unused10][unused9]用户：北京天气？[unused10]"
        '[unused9]助手：[unused11][{"name": "get_weather", "arguments": {"city": "北京"}}][unused12][unused10]'
        "[unused9]工具：晴，20度[unused10][unused9]助手："
    )


def test_list_of_text_parts_is_joined(pangu_tokenizer: Tokenizer) -> None:
    content = [{"type": "text", "text": "line one"}, {"type": "text", "text": "line two"}]
    rendered = render_chat(pangu_tokenizer, [{"role": "user", "content": content}])
    assert "[unused9]用户：line one\nline two[unused10]" in rendered


@pytest.mark.parametrize(("messages", "error"), [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"role": "user", "content": "a"}, "b"], r"messages\[1\] must be a dict"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], r"messages\[1\] has role 'bot'"),
    ([{"content": "a"}], r"messages\[0\] has role None"),
    ([{"role": "user", "content": 3}], r"messages\[0\]\.content must be a string"),
    ([{"role": "user"}], r"messages\[0\]\.content must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], r"messages\[0\]\.content\[0\]"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}],
     r"messages\[0\]\.tool_calls\[0\]\.function\.arguments is not valid JSON"),
    # (Python's own message, which advised calling sys.set_int_max_str_digits, had named no field)
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": '{"a": 1%s}' % ("0" * 5000)}}]}],
     r"^messages\[0\]\.tool_calls\[0\]\.function\.arguments holds a number too long to read$"),
    # (the arguments had been echoed in full)
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{" + "x" * 100000}}]}],
     r"^messages\[0\]\.tool_calls\[0\]\.function\.arguments is not valid JSON: '\{x{75}\.\.\.$"),
])
def test_bad_messages_are_rejected_with_the_offending_index(
    pangu_tokenizer: Tokenizer, messages: Any, error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        render_chat(pangu_tokenizer, messages)


def test_bad_tools_are_rejected(pangu_tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"tools\[0\]"):
        render_chat(pangu_tokenizer, [{"role": "user", "content": "a"}], tools=[{"type": "function"}])


@pytest.mark.parametrize("which", ["pangu", "llama"])
def test_continue_final_message_matches_transformers(which: str, request, llama_tokenizer_dir) -> None:
    """The prompt ends right after the assistant's partial text, as transformers'
    apply_chat_template(continue_final_message=True) renders it with the same template (the Pangu
    folder's tokenizer needs remote code in transformers, so its template is passed by hand)."""
    from transformers import AutoTokenizer

    ours = request.getfixturevalue(f"{which}_tokenizer")
    reference = AutoTokenizer.from_pretrained(str(llama_tokenizer_dir))
    messages = [{"role": "user", "content": "The city, as JSON"}, {"role": "assistant", "content": '{"city": "Par'}]
    want = reference.apply_chat_template(
        messages, chat_template=ours.chat_template, tokenize=False, add_generation_prompt=False, continue_final_message=True
    )
    got = render_chat(ours, messages, add_generation_prompt=False, continue_final_message=True)
    assert got == want and got.endswith('{"city": "Par')
    with pytest.raises(ValueError, match="add_generation_prompt"):
        render_chat(ours, messages, continue_final_message=True)
    with pytest.raises(ValueError, match="the user's"):
        render_chat(ours, messages[:1], add_generation_prompt=False, continue_final_message=True)


@pytest.mark.parametrize(("text", "reasoning", "content"), [
    ("Just an answer.", None, "Just an answer."),
    ("[unused16]用户问天气，先想一想。[unused17]北京今天晴。", "用户问天气，先想一想。", "北京今天晴。"),
    ("[unused16]still thinking when the budget ran out", "still thinking when the budget ran out", ""),
    ("Sure. [unused16]plan[unused17] Done.", "plan", "Sure.  Done."),
    ("[unused16][unused17]", "", ""),
    ("[unused16]a[unused17]b[unused16]c[unused17]", "a", "b[unused16]c[unused17]"),
])
def test_split_reasoning(text: str, reasoning: str | None, content: str) -> None:
    assert split_reasoning(text) == (reasoning, content)


def call_names_and_args(calls: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_parse_tool_calls_reads_a_list_of_calls() -> None:
    text = ('Let me check.[unused11][{"name": "get_weather", "arguments": {"city": "北京"}}, '
            '{"name": "get_time", "arguments": {}}][unused12]')
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert call_names_and_args(calls) == [("get_weather", {"city": "北京"}), ("get_time", {})]
    for call in calls:
        assert re.fullmatch(r"call_[0-9a-f]{24}", call["id"]) and call["type"] == "function"
        assert isinstance(call["function"]["arguments"], str)
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "北京"}
    assert calls[0]["id"] != calls[1]["id"]


def test_parse_tool_calls_accepts_a_single_object_and_the_parameters_spelling() -> None:
    content, calls = parse_tool_calls('[unused11]{"name": "f", "parameters": {"x": 1}}[unused12]')
    assert content == "" and call_names_and_args(calls) == [("f", {"x": 1})]
    content, calls = parse_tool_calls('[unused11]{"name": "f", "arguments": "{\\"x\\": 2}"}[unused12] after')
    assert content == " after" and call_names_and_args(calls) == [("f", {"x": 2})]


def test_parse_tool_calls_without_end_marker_runs_to_the_end() -> None:
    content, calls = parse_tool_calls('ok [unused11][{"name": "f", "arguments": {}}]')
    assert content == "ok " and call_names_and_args(calls) == [("f", {})]


@pytest.mark.parametrize("text", [
    '[unused11][{"name": "f", "arguments": {]][unused12]',
    '[unused11][{"arguments": {}}][unused12]',
    '[unused11]["f"][unused12] tail',
    "[unused11]not json at all",
    "no markers here",
    # deeper than Python's json recurses (a reply a request's regex steered there): a RecursionError, a 500
    "[unused11]" + "[" * 5000 + "]" * 5000 + "[unused12]",
    '[unused11]{"name": "f", "arguments": "' + "[" * 5000 + "]" * 5000 + '"}[unused12]',
    '[unused11]{"name": "f", "arguments": {"x": 1' + "0" * 5000 + "}}[unused12]",  # (past int()'s digits)
])
def test_malformed_tool_calls_stay_in_the_content(text: str) -> None:
    assert parse_tool_calls(text) == (text, [])
    if "[unused12]" in text:  # the stream parser too
        assert parse_streamed([text[:15], text[15:]]) == ("", text, [])


def parse_whole(text: str) -> tuple[str, str, list]:
    reasoning, content = split_reasoning(text)
    content, calls = parse_tool_calls(content)
    return reasoning or "", content, call_names_and_args(calls)


def parse_streamed(chunks: list[str]) -> tuple[str, str, list]:
    parser = ChatStreamParser()
    events = [e for chunk in chunks for e in parser.feed(chunk)] + parser.finish()
    reasoning = "".join(e.text for e in events if e.kind == "reasoning")
    content = "".join(e.text for e in events if e.kind == "content")
    calls = [e.tool_call for e in events if e.kind == "tool_call"]
    return reasoning, content, call_names_and_args(calls)


STREAM_TEXTS = [
    "plain answer with [brackets] and [unused1] and [unus",
    "[unused16]思考：用户想知道天气 🌤[unused17]北京晴，20度。",
    "pre [unused16]reasoning with [unused11]inside[unused17]post [unused16] again",
    "[unused16]unfinished reasoning [unused1",
    '[unused16]call a tool[unused17]Checking.[unused11][{"name": "get_weather", "arguments": {"city": "上海"}}]'
    '[unused12] and [unused11]{"name": "f", "parameters": {"a": [1, 2]}}[unused12]done',
    '[unused11]{"broken": [unused12] text [unused11][{"name": "g", "arguments": {}}]',
    "[unused17] stray end marker [unused12] [unused11",
]


def random_chunks(text: str, rng: random.Random) -> list[str]:
    chunks, pos = [], 0
    while pos < len(text):
        size = rng.choice([1, 1, 2, 3, 5, 9])
        chunks.append(text[pos:pos + size])
        pos += size
    return chunks


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_parser_matches_non_stream_for_any_chunking(text: str) -> None:
    rng = random.Random(text)
    expected = parse_whole(text)
    assert parse_streamed([text]) == expected
    assert parse_streamed(list(text)) == expected
    for _ in range(200):
        assert parse_streamed(random_chunks(text, rng)) == expected


def test_stream_parser_holds_back_a_partial_marker() -> None:
    parser = ChatStreamParser()
    assert [(e.kind, e.text) for e in parser.feed("Hello [unus")] == [("content", "Hello ")]
    assert [(e.kind, e.text) for e in parser.feed("ed16]hmm [unused1")] == [("reasoning", "hmm ")]
    assert [(e.kind, e.text) for e in parser.feed("7]Hi")] == [("content", "Hi")]
    assert parser.finish() == []


def test_stream_parser_emits_a_tool_call_once_complete() -> None:
    parser = ChatStreamParser()
    assert parser.feed('[unused11][{"name": "f", "argum') == []
    events = parser.feed('ents": {"x": 1}}][unused12]')
    assert [e.kind for e in events] == ["tool_call"]
    assert events[0].tool_call["function"] == {"name": "f", "arguments": '{"x": 1}'}


def test_stream_parser_can_leave_markers_as_text() -> None:
    parser = ChatStreamParser(reasoning=False, tool_calls=False)
    text = "[unused16]a[unused17]b[unused11]{}[unused12]"
    events = parser.feed(text) + parser.finish()
    assert [(e.kind, e.text) for e in events] == [("content", text)]


def test_detokenized_stream_parses_like_the_whole_output(pangu_tokenizer: Tokenizer) -> None:
    output = ('[unused16]用户问北京天气 🌤，需要调用工具。[unused17]好的。'
              '[unused11][{"name": "get_weather", "arguments": {"city": "北京"}}][unused12][unused10]')
    ids = pangu_tokenizer.encode(output, add_special_tokens=False)
    detok = IncrementalDetokenizer(pangu_tokenizer, skip_special_tokens=False)
    deltas = [detok.step([i]) for i in ids] + [detok.flush()]
    assert "".join(deltas) == output
    assert parse_streamed(deltas) == parse_whole(output)
    assert parse_whole(output) == ("用户问北京天气 🌤，需要调用工具。", "好的。[unused10]",
                                   [("get_weather", {"city": "北京"})])


def test_marker_constants_are_the_pangu_special_tokens(pangu_tokenizer: Tokenizer) -> None:
    for marker in (THINK_START, THINK_END, TOOL_CALL_START, TOOL_CALL_END):
        assert pangu_tokenizer.encode(marker, add_special_tokens=False) == [pangu_tokenizer.token_to_id(marker)]
