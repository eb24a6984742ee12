"""Model layer: architecture descriptions, loaders, and the forward pass written once.

Above :mod:`permllm.protocols` (the private backend calls its ops), below the
runtime. Families: LLaMA (RMSNorm, RoPE, GQA, SwiGLU), GPT-2 (LayerNorm, GeLU,
learned positions) and ChatGLM-6B (α-scaled LayerNorm residual, 2-D RoPE,
bidirectional prefix).
"""
from .arch import Arch, ModelWeights
from .forward import (Forward, PlainOps, PrivateOps, StepShape, calibrate, public_bounds, setup_embedding,
                      weight_names, weight_shape)
from .loaders import DEFAULT_MODEL, LoadedModel, ModelFileError, from_chatglm, from_transformers, load_model

__all__ = ["Arch", "ModelWeights", "Forward", "PlainOps", "PrivateOps", "StepShape", "calibrate", "public_bounds",
           "setup_embedding", "weight_names", "weight_shape", "DEFAULT_MODEL", "LoadedModel", "ModelFileError", "from_chatglm", "from_transformers", "load_model"]
