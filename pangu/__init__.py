"""pangu-infer: inference for Huawei's open Pangu models on CPUs and GPUs."""

__version__ = "0.1.0"
