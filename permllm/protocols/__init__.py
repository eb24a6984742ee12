"""Protocol ops of PermLLM, each an awaitable with one branch per party.

Layer: above :mod:`permllm.net` (it sends tagged messages on Channels), below
:mod:`permllm.model` (which calls the ops in a forward pass). Every op runs in a
:class:`Party` context whose ``phase`` selects the branch:

* ``setup`` — once per session: seeds (:meth:`Party.establish_seeds`), the
  masked weights (:func:`setup_weight`); in the light mode the user's CKKS keys.
* ``offline`` — the helper (the dealer) derives every correlation from the s_MH and
  s_UH streams and sends it to the model party (and the token-retrieval table to the
  user); the user sends its offline linear
  messages. Nothing here depends on the prompt or on M's shares. In the light mode
  (``ShareConfig.offline == "he"``) the linear layers' correlations come from CKKS
  products between U and M instead (:mod:`.he_matmul`, keys by :func:`setup_ckks`).
* ``online`` — M and U only. Linear layers are local; each non-linear costs one
  round trip; a shared×shared product two hops.

Each op's docstring says what each party learns.
"""
from .config import DEFAULT_RATIO, ShareConfig
from .attention import AttnMags, AttnSpec, attention_decode
from .embedding import embed
from .he_matmul import setup_ckks
from .linear import linear, reshare, setup_weight
from .matmul import matmul_shared
from .nonlinear import gelu, glu, layer_norm, rms_norm, silu, softmax, swiglu
from .party import Party, ProtocolError, Role
from .permute import Perm, apply_permuted, permute_reveal, reshare_unpermute
from .prg import stream, uniform_mask
from .sampling import Sampler, choose, make_rng
from .select import retrieve, select_token

__all__ = [
    "DEFAULT_RATIO", "ShareConfig", "Party", "ProtocolError", "Role",
    "setup_weight", "linear", "reshare", "matmul_shared", "embed", "AttnSpec", "AttnMags", "attention_decode",
    "Perm", "permute_reveal", "reshare_unpermute", "apply_permuted",
    "softmax", "layer_norm", "rms_norm", "gelu", "silu", "swiglu", "glu",
    "stream", "uniform_mask",
    "Sampler", "choose", "make_rng", "retrieve", "select_token", "setup_ckks",
]
