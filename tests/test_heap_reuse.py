"""The engine keeps freed heap memory for its next step (pangu_infer.memory.keep_freed_heap): an eager
forward's activations of several MB are reused, not faulted in afresh from the kernel on every
layer. Counted with the kernel's own minor page fault counter (getrusage), in fresh processes (the
malloc settings are process-wide)."""

import os
import subprocess
import sys

import pytest

from fixtures_models import build_tiny_model
from pangu_infer.loader.random import pangu_dense_config
from pangu_infer.memory import _libc
from pangu_infer.tokenizer import load_tokenizer

# Five prefills of 1024 different tokens each; prints the minor page faults of each. The heap kept
# still grows now and then after the first: the second by about 48 MB (12,000 faults) once in three
# runs, the third by 17 MB (4,300 faults) once in four here and in CI, so the test reads the median
# of the last three.
PREFILLS = """
import random, resource, sys
from pangu_infer import LLM, SamplingParams
llm = LLM(sys.argv[1], enforce_eager=True, max_model_len=2048)
rng = random.Random(0)
counts = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    prompt = {"prompt_token_ids": [rng.randrange(3, llm.config.vocab_size) for _ in range(1024)]}
    llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print("FAULTS", *counts)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or _libc() is None, reason="glibc's malloc, Linux's fault counts")
def test_a_prefills_activations_are_reused_not_faulted_in_again_unless_turned_off(tmp_path, pangu_tokenizer_dir):
    # a narrow, wide model: each layer's [1024, 2 x 4096] float32 activations are 32 MB
    tok = load_tokenizer(pangu_tokenizer_dir)
    config = pangu_dense_config(vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id, intermediate_size=4096,
                                max_position_embeddings=2048)
    model = build_tiny_model(tmp_path / "wide", config, pangu_tokenizer_dir)

    def faults(**env) -> int:
        proc = subprocess.run([sys.executable, "-c", PREFILLS, str(model)], capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        counts = [int(n) for n in proc.stdout.split("FAULTS")[-1].split()]
        assert len(counts) == 5, proc.stdout[-1000:]
        return sorted(counts[2:])[1]

    kept, returned = faults(), faults(PANGU_INFER_KEEP_HEAP="0")
    # about 60 a prefill kept (the KV cache's new blocks); returned each time: 29,000-35,000 (about 128
    # MB) where the activations are float32 (an AVX2 EPYC), about 16,500 where they are bf16 (an AMX Xeon)
    assert kept < 1000 and returned > max(8000, 10 * kept), (kept, returned)
