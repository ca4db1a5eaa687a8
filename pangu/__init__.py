"""pangu-infer: inference for Huawei's open Pangu models on CPUs and GPUs."""

from pangu.outputs import CompletionOutput, RequestOutput
from pangu.sampling_params import SamplingParams

__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in the whole engine; import it lazily so `import pangu` stays cheap.
    if name == "LLM":
        from pangu.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
