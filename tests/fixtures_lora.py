"""LoRA adapters written by PEFT itself (the library that writes the adapters people serve), over
the tiny dense checkpoint, with PEFT's own model as the reference each test compares against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pangu_infer.loader.random import random_state_dict, transformers_llama


@dataclass
class PeftAdapter:
    path: Path
    model: object  # the PEFT model (base + this adapter), the reference

    @torch.no_grad()
    def greedy(self, prompt_ids: list[int], max_tokens: int) -> list[int]:
        ids = torch.tensor([prompt_ids])
        out = self.model.generate(ids, max_new_tokens=max_tokens, do_sample=False, min_new_tokens=max_tokens)
        return out[0, len(prompt_ids):].tolist()

    @torch.no_grad()
    def logits(self, prompt_ids: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([prompt_ids])).logits[0].float()


def make_peft_adapter(directory: Path, config: dict, seed: int, **lora) -> PeftAdapter:
    """A PEFT LoRA adapter over the tiny dense model (weights of random_state_dict(config), seed 0),
    its B matrices random too (PEFT starts them at zero, which would change nothing), saved with
    save_pretrained: adapter_config.json and adapter_model.safetensors."""
    from peft import LoraConfig, get_peft_model

    base = transformers_llama(config, random_state_dict(config))
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(**lora)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(str(directory))
    return PeftAdapter(Path(directory), model)


ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def lora_adapters(tmp_path_factory, tiny_dense_config) -> dict[str, PeftAdapter]:
    """Two adapters over tiny_dense_dir's weights: "full" (rank 8, alpha 16, every projection) and
    "attn" (rank 4, rsLoRA scaling, attention q/v and down_proj only, one layer's q at rank 2)."""
    root = tmp_path_factory.mktemp("lora")
    return {
        "full": make_peft_adapter(root / "full", tiny_dense_config, 1, r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS),
        "attn": make_peft_adapter(
            root / "attn", tiny_dense_config, 2, r=4, lora_alpha=8, use_rslora=True,
            target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"layers.1.self_attn.q_proj": 2},
        ),
    }
