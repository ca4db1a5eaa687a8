"""pangu-infer: inference for Huawei's open Pangu models on CPUs and GPUs."""

from pangu_infer.outputs import CompletionOutput, RequestOutput
from pangu_infer.sampling_params import SamplingParams

__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in the whole engine; import it lazily so `import pangu_infer` stays cheap.
    if name == "LLM":
        from pangu_infer.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
