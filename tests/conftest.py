"""Shared fixtures, built once per session: tiny tokenizers, tiny checkpoints, the demo model."""

import os

import torch

# Tiny shapes run fastest on one thread, and a thread that waits on a busy second core costs more than it gives.
torch.set_num_threads(int(os.environ.get("PANGU_TEST_THREADS", "1")))
# No converted-model cache in ~/.cache from test runs (tests/test_model_cache.py turns it on in a tmp folder).
os.environ.setdefault("PANGU_INFER_MODEL_CACHE", "0")

pytest_plugins = ["fixtures_tokenizer", "fixtures_gguf", "fixtures_models", "fixtures_server", "fixtures_lora"]
