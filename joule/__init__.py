"""Joule: an LLM inference engine that knows what every token costs."""

from joule.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from joule.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"


def __getattr__(name: str):
    # Heavy imports (torch, models) only when the engine is actually used.
    if name == "LLM":
        from joule.llm import LLM

        return LLM
    if name == "LLMEngine":
        from joule.llm_engine import LLMEngine

        return LLMEngine
    if name == "EngineConfig":
        from joule.config import EngineConfig

        return EngineConfig
    raise AttributeError(f"module 'joule' has no attribute {name!r}")


__all__ = [
    "LLM",
    "LLMEngine",
    "EngineConfig",
    "SamplingParams",
    "StructuredOutputsParams",
    "RequestOutputKind",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "RequestMetrics",
]
