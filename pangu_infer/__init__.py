"""pangu-infer: inference for Huawei's open Pangu models on CPUs and GPUs."""

import gc as _gc

# Importing torch (which these pull in) creates several hundred thousand long-lived objects, and
# each full garbage collection while they are created walks them all: two or three of ~0.1 s in
# every start (benchmarks/RESULTS.md, startup). Collections are paused while the package imports
# and resume after, as they were.
_collecting = _gc.isenabled()
_gc.disable()
try:
    from pangu_infer.lora import LoRARequest
    from pangu_infer.outputs import BeamSearchOutput, BeamSearchSequence, CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
    from pangu_infer.sampling_params import BeamSearchParams, SamplingParams
finally:
    if _collecting:
        _gc.enable()

__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in the whole engine; import it lazily so `import pangu_infer` stays cheap.
    if name == "LLM":
        from pangu_infer.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence", "LoRARequest", "RequestOutput", "CompletionOutput", "EmbeddingRequestOutput", "EmbeddingOutput",
           "__version__"]
