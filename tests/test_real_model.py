"""The real SmolLM2-135M-Instruct GGUF (Llama architecture) end to end: text must make sense."""

from __future__ import annotations

import pytest
import torch

from pangu_infer import LLM, SamplingParams
from pangu_infer.cli import main


@pytest.fixture(scope="module")
def smollm(smollm2_gguf_path):
    return LLM(str(smollm2_gguf_path), dtype="float32", device="cpu", kv_cache_memory=64 << 20, enforce_eager=True)


def test_capital_of_france_continues_with_paris(smollm):
    out = smollm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0]
    assert out.outputs[0].text.startswith(" Paris")


def test_chat_question_gets_a_sensible_english_answer(smollm):
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    out = smollm.chat(messages, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0]
    comp = out.outputs[0]
    assert "Paris" in comp.text
    assert comp.finish_reason == "stop"  # the model ends its turn with <|im_end|>
    assert "<|im_end|>" not in comp.text


def test_stream_concatenates_to_the_full_text(smollm):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = smollm.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0].text
    streamed = "".join(step.outputs[0].text_delta for step in smollm.stream("Once upon a time", params))
    assert streamed == full


def test_seeded_sampling_repeats_and_top_k_1_is_greedy(smollm):
    seeded = SamplingParams(temperature=0.8, max_tokens=12, seed=42, ignore_eos=True)
    a = smollm.generate("My favourite food is", seeded, use_tqdm=False)[0].outputs[0].text
    b = smollm.generate("My favourite food is", seeded, use_tqdm=False)[0].outputs[0].text
    assert a == b
    greedy = smollm.generate("My favourite food is", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    top1 = smollm.generate("My favourite food is", SamplingParams(temperature=1.0, top_k=1, max_tokens=12, seed=1, ignore_eos=True), use_tqdm=False)
    # top_k keeps the tokens tied with its last survivor (as vLLM does), so top_k=1 draws among
    # tokens tied for the top where greedy takes the lowest id; the logits are bf16-valued here (the
    # int8 head), and ties happen. Up to the first tie the two agree, and where they part it was one.
    g, t = greedy[0].outputs[0].token_ids, top1[0].outputs[0].token_ids
    if g != t:
        i = next(i for i in range(len(g)) if g[i] != t[i])
        row = smollm.logits(greedy[0].prompt_token_ids + g[:i])[-1]
        assert row[g[i]] == row[t[i]] == row.max(), (i, g[i], t[i], row.topk(3))


def test_cli_generate_prints_the_completion(smollm2_gguf_path, capsys):
    code = main(["generate", "--model", str(smollm2_gguf_path), "--prompt", "The capital of France is",
                 "--max-tokens", "4", "--temperature", "0", "--dtype", "float32", "--enforce-eager"])
    assert code == 0
    assert "Paris" in capsys.readouterr().out


def test_cli_chat_streams_an_answer(smollm2_gguf_path, capsys):
    # "Answer in one word": for the bare question the first reply token is a near tie between "The"
    # and "L" (aten's int4 kernel: "The" by 0.375 logits; the own kernel, int8 activations: "L" by
    # 0.125, then "L'Etoile, la Marseillaise..."), so which valid int4 path a machine measures as
    # fastest decided the answer; with this prompt every path says Paris (checked at 1 and 2
    # threads with both kernels, converted and not).
    code = main(["chat", "--model", str(smollm2_gguf_path), "--message", "What is the capital of France? Answer in one word.",
                 "--max-tokens", "24", "--temperature", "0", "--stats", "--enforce-eager"])  # bf16, kept Q4_1/Q8_0
    assert code == 0
    out = capsys.readouterr().out
    assert "Paris" in out and "tokens/s" in out


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "./no/such/model", "--prompt", "x"], "no/such/model"),
    (["generate", "--prompt", "x", "--dtype", "float8"], "float8"),
    (["generate", "--prompt", "x", "--top-p", "1.5", "--temperature", "1"], "top_p"),
    pytest.param(["generate", "--prompt", "x", "--device", "cuda"], "cuda",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")),
])
def test_cli_user_errors_are_one_clear_line(argv, message, capsys, smollm2_gguf_path):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bf16_with_packed_weights_and_a_packed_tied_head_still_says_paris(smollm2_gguf_path):
    from pangu_infer.models.packed import PackedLinear, can_pack

    llm = LLM(str(smollm2_gguf_path), dtype="bfloat16", device="cpu", quantization="none",  # dequantized to bf16
              kv_cache_memory=16 << 20, enforce_eager=True)
    if can_pack(torch.device("cpu"), torch.bfloat16):
        assert isinstance(llm.model.lm_head, PackedLinear)  # tied: a packed copy of the embedding
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=4))
    assert out[0].outputs[0].text.startswith(" Paris")


def test_the_default_path_decodes_compiled_and_still_says_paris(smollm2_gguf_path):
    """What a user gets with no flags (`LLM(file.gguf)`): the decode step compiled and warmed up at
    load (C++ wrapper, the tied head inside the compiled step), and the decode steps did run compiled
    and each gave the eager full forward's token wherever its top two logits are clearly apart (bf16
    logits of ~20 step by 0.125, so bits may differ from eager), with its logprob. (A step that reads
    the KV cache wrongly gives garbage here: the tiny models' tests did not catch that once.)

    Between two paths that round apart (eager decode against the full forward, 5 prompts x 24
    tokens, Zen 1 EPYC) a token's logprob moved by at most 0.18 with the int4 kernel's activations in
    two int8 levels and 0.20 in one (the AVX2 default, llama.cpp's Q8_1 rounding), and the top token
    flipped at margins up to 0.125. (With the one-level rounding's error once shifting whole rows,
    0.48 and 0.5: this test failed at 0.277.) Garbage is off by nats."""
    llm = LLM(str(smollm2_gguf_path), kv_cache_memory=16 << 20)
    assert llm.wait_compiled()
    runner = llm.engine.runner
    compiled, calls = runner.decode_forward, []
    runner.decode_forward = lambda *a: calls.append(len(a[0])) or compiled(*a)
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8, logprobs=0))[0]
    assert out.outputs[0].text.startswith(" Paris")
    assert calls == [1] * 7  # the first token comes from the prefill
    ids = out.prompt_token_ids + out.outputs[0].token_ids
    eager = torch.log_softmax(llm.logits(ids), dim=-1)[len(out.prompt_token_ids) : -1]
    clear = 0
    for lp, row in zip(out.outputs[0].logprobs[1:], eager):
        assert abs(lp.logprob - row[lp.token_id].item()) < 0.25
        best, second = row.topk(2).values.tolist()
        if best - second > 0.3:
            assert lp.token_id == int(row.argmax())
            clear += 1
    assert clear >= 5


def test_continue_final_message_goes_on_with_the_assistants_own_words(smollm):
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is"}]
    params = SamplingParams(temperature=0, max_tokens=4)
    out = smollm.chat(messages, params, add_generation_prompt=False, continue_final_message=True, use_tqdm=False)[0]
    assert out.outputs[0].text.startswith(" Paris")
    assert smollm.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False).endswith("<|im_start|>assistant\nThe capital of France is")


def test_logit_bias_and_prompt_logprobs_on_the_capital_of_france(smollm):
    (paris,) = smollm.tokenizer.encode(" Paris", add_special_tokens=False)
    prompt = "The capital of France is"
    banned = smollm.generate(prompt, SamplingParams(temperature=0, max_tokens=3, logit_bias={paris: -100}), use_tqdm=False)[0]
    assert banned.outputs[0].token_ids[0] != paris and not banned.outputs[0].text.startswith(" Paris")
    scored = smollm.generate(prompt + " Paris", SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    last = scored.prompt_logprobs[-1]
    assert last.token_id == paris and last.top[0][0] == paris and last.logprob > -1.0  # the model's own best guess
