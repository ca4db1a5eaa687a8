"""Names that are not local paths, fetched from the Hugging Face hub as vLLM fetches them: a model
(loader.resolve_model_path), a tokenizer (loader.resolve_tokenizer_path), a LoRA adapter
(lora.resolve_adapter_path). Each caller handles its local paths first and words its own errors."""

from __future__ import annotations

from typing import Optional


def looks_like_hub_id(name: str) -> bool:
    """org/name, and nothing that reads as a path (./x, /x, ~/x)."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def download(repo_id: str, where: str, allow_patterns: list[str], error: type[Exception], revision: Optional[str] = None,
             cache_dir: Optional[str] = None) -> str:
    """The local folder of `repo_id`'s files matching `allow_patterns`, downloaded with huggingface_hub
    (at `revision`, into `cache_dir`); network, auth and not-found errors all become
    `error(f"{where} and could not be downloaded from the hub: ...")`."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=allow_patterns)
    except Exception as e:  # noqa: BLE001
        raise error(f"{where} and could not be downloaded from the hub: {e}") from None
