"""permllm: private inference of large language models (PermLLM).

The model owner and the user run a model together: the owner never sees the
prompt or the answer, the user never sees the weights, and a helper deals
correlated randomness offline. Non-linear layers run on randomly permuted values
the user sees in the clear (the PermLLM trade-off; see the README).

Layers: :mod:`permllm.net` ← :mod:`permllm.protocols` ← :mod:`permllm.model` ←
:mod:`permllm.runtime` ← the CLI. The async API::

    async with await permllm.local() as session:
        async for piece in session.generate("What is the capital of France?"):
            print(piece, end="")
"""
from .runtime.api import GenerationResult, Session, connect, local

__all__ = ["local", "connect", "Session", "GenerationResult"]
__version__ = "0.1.0"
