"""The default sampling values of a request that omits them, as vLLM chooses them.

generation_config (vLLM's --generation-config): "auto" (default) takes them from the model's
generation_config.json; "vllm" ignores that file (the engine's own defaults: SamplingParams');
a folder's path takes them from that folder's generation_config.json. override_generation_config
(vLLM's --override-generation-config): a dict of keys applied over whichever was chosen.

The keys read are vLLM's: temperature, top_p, top_k, min_p, repetition_penalty, and
max_new_tokens (the default max_tokens of a request that gives no length; the override's, or a
chosen folder's, also caps a server request's own max_tokens: LLM.max_tokens_ceiling); a file's
do_sample false means greedy. The model's own generation_config.json still gives the end-of-sequence
tokens whatever is chosen here.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Union

# key -> the type its value must have (an int is taken where a float is: 0 for 0.0)
SAMPLING_KEYS: dict[str, type] = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "repetition_penalty": float,
    "max_new_tokens": int,
}
# generation_config key -> SamplingParams field
_FIELD = {"max_new_tokens": "max_tokens"}
FILE_NAME = "generation_config.json"


def _well_typed(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind is int else isinstance(value, (int, float))


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_generation_config(value: Optional[str], name: str = "generation_config") -> Optional[dict]:
    """'auto' (or None) -> None (the model's file); 'vllm' -> {} (no file); a folder -> its
    generation_config.json, read. ValueError naming `name` (the flag or argument)."""
    if value is None or value == "auto":
        return None
    if value == "vllm":
        return {}
    if not isinstance(value, str):
        raise ValueError(f"{name}={value!r}: expected 'auto', 'vllm' or a folder holding {FILE_NAME}")
    folder = os.path.expanduser(value)
    if not os.path.isdir(folder):
        raise ValueError(f"{name} {value!r}: expected 'auto', 'vllm' or a folder holding {FILE_NAME}; no such folder")
    path = os.path.join(folder, FILE_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{name} {value!r}: the folder holds no {FILE_NAME}")
    try:
        config = _read_json(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{name} {value!r}: cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{name} {value!r}: {path} is not a JSON object")
    check_file_values(config, path)
    return config


def check_model_file(config: dict, path: str) -> None:
    """check_file_values of the model's own generation_config.json (generation_config 'auto'), with
    the way round it in the message: 'vllm' loads the model without the file's sampling values."""
    try:
        check_file_values(config, path)
    except ValueError as e:
        raise ValueError(f"{e} (generation_config='vllm', --generation-config vllm, leaves the file's sampling values out)") from None


def check_model_folder(model: str) -> bool:
    """check_model_file of a local model folder's generation_config.json, if it has one that reads
    as a JSON object (else the load names what is wrong with it); True when it was checked."""
    path = os.path.join(model, FILE_NAME)
    if not os.path.isfile(path):
        return False
    try:
        config = _read_json(path)
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    check_model_file(config, path)
    return True


def check_file_values(config: dict, path: str) -> None:
    """A generation_config.json's values of the keys read here: each of the type and in the range a
    request's own would be (null: not given; a max_new_tokens below 1 stays ignored, the engine's
    default length), do_sample true or false. ValueError naming the file and the key: a bad value
    would otherwise fail every request that omits it, naming a field the request never gave, or
    (an ill-typed one, or a do_sample "no") be dropped silently."""
    from pangu_infer.errors import RequestError
    from pangu_infer.sampling_params import SamplingParams

    for key, kind in SAMPLING_KEYS.items():
        given = config.get(key)
        if given is None:
            continue
        if not _well_typed(given, kind):
            raise ValueError(f"{path} field {key}={given!r} must be {'an integer' if kind is int else 'a number'}")
        if key == "max_new_tokens" and given < 1:
            continue
        try:
            SamplingParams(**{_FIELD.get(key, key): given})
        except RequestError as e:  # ("invalid sampling parameter top_p=5: expected ...")
            reason = str(e).partition(f"{_FIELD.get(key, key)}={given!r}: ")[2] or str(e)
            raise ValueError(f"{path} field {key}={given!r} is out of range: {reason}") from None
    if config.get("do_sample") not in (None, True, False):
        raise ValueError(f"{path} field do_sample={config['do_sample']!r} must be true or false")


def check_override(value: Union[None, str, dict], name: str = "override_generation_config") -> dict:
    """The override as a dict of known, well-typed keys with valid values (JSON text or a dict);
    ValueError naming `name` and the key."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(f"{name} {value!r}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} {value!r}: expected a JSON object, e.g. '{{\"temperature\": 0.5, \"top_p\": 0.9}}'")
    for key, given in value.items():
        kind = SAMPLING_KEYS.get(key)
        if kind is None:
            raise ValueError(f"{name}: unknown key {key!r}; the keys that set request defaults are {', '.join(SAMPLING_KEYS)}")
        if not _well_typed(given, kind):
            raise ValueError(f"{name}: {key} must be {'an integer' if kind is int else 'a number'}, got {given!r}")
    from pangu_infer.errors import RequestError
    from pangu_infer.sampling_params import SamplingParams

    for key, given in value.items():  # the ranges SamplingParams checks (top_p in (0, 1], ...)
        try:
            SamplingParams(**{_FIELD.get(key, key): given})
        except RequestError as e:
            raise ValueError(f"{name}: {key}={given!r}: {e}") from None
    return dict(value)


def sampling_defaults(config: dict, override: Optional[dict] = None) -> dict:
    """SamplingParams keyword arguments from a generation config (checked as it was read:
    check_file_values) with `override` (checked by check_override) over them."""
    kwargs: dict[str, Any] = {}
    for key, kind in SAMPLING_KEYS.items():
        if _well_typed(config.get(key), kind):
            kwargs[_FIELD.get(key, key)] = config[key]
    if config.get("do_sample") is False:
        kwargs["temperature"] = 0.0
    if kwargs.get("max_tokens") is not None and kwargs["max_tokens"] < 1:
        del kwargs["max_tokens"]
    for key, value in (override or {}).items():
        kwargs[_FIELD.get(key, key)] = value
    return kwargs
