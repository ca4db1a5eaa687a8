"""Shared fixtures, built once per session: tiny tokenizers, tiny checkpoints, the demo model."""

import os

import torch

# Small shapes run fastest on one thread, and tests must not fight over the 2 cores.
torch.set_num_threads(int(os.environ.get("PANGU_TEST_THREADS", "2")))

pytest_plugins = ["fixtures_tokenizer", "fixtures_gguf", "fixtures_models", "fixtures_server"]
