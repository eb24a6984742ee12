"""What the parties state about a session in the handshake: the model fingerprint and the share configuration.

Layer: runtime (above :mod:`permllm.model` and :mod:`permllm.protocols`); the
handshake itself (:func:`~permllm.net.open_channel`) compares these values as
opaque terms. The **model fingerprint** hashes everything public about the
masked-weight setup: the architecture, the share configuration, each
private weight's name, shape and scale, and the calibrated mask magnitudes. The
model party computes it at start-up from its weights; the user and the helper
recompute it from what the setup phase delivered and check it against what the
model party stated (:func:`received_fingerprint`), so a model party cannot state
one model and set up another.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping

import numpy as np

from ..model import Arch, ModelWeights, weight_names
from ..model.forward import RING_TABLE, ring_table_meta
from ..protocols import Party, ShareConfig
from ..protocols.linear import public_scale

__all__ = ["model_fingerprint", "weights_fingerprint", "received_fingerprint", "share_terms"]


def share_terms(config: ShareConfig) -> dict[str, Any]:
    """The handshake terms every party states: the share configuration (dtype, mask ratio, attention route)."""
    terms = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    terms["ratio"] = float(terms["ratio"])
    terms["route"] = config.attention_route  # "auto" and the route it stands for agree
    return terms


def model_fingerprint(arch: Arch, config: ShareConfig, weights: Mapping[str, tuple[tuple[int, ...], float]],
                      mags: Mapping[str, Any]) -> str:
    """The fingerprint (32 hex digits) of a masked-weight setup; ``weights`` maps name → (shape, scale)."""
    h = hashlib.sha256()
    h.update(json.dumps({"arch": arch.to_dict(), "config": share_terms(config),
                         "weights": [[n, list(map(int, weights[n][0])), float(weights[n][1]).hex()]
                                     for n in sorted(weights)]}, sort_keys=True).encode())
    for k in sorted(mags):
        a = np.ascontiguousarray(mags[k], dtype=np.float64)
        h.update(k.encode() + b"\0" + repr(a.shape).encode() + a.tobytes())
    return h.hexdigest()[:32]


def weights_fingerprint(weights: ModelWeights, config: ShareConfig, mags: Mapping[str, Any]) -> str:
    """The model party's fingerprint, from its weights (each weight's scale as the setup computes it)."""
    meta = {}
    for name, _ in weight_names(weights.arch, config.attention_route, config.offline):
        w = np.asarray(weights[name], dtype=np.float64)
        meta[name] = (w.shape, public_scale(w))
    if config.offline != "he":
        meta[RING_TABLE] = ring_table_meta(weights)
    return model_fingerprint(weights.arch, config, meta, mags)


def received_fingerprint(p: Party, arch: Arch, mags: Mapping[str, Any]) -> str:
    """The fingerprint of the setup the user or the helper received (after its setup phase)."""
    names = [n for n, _ in weight_names(arch, p.config.attention_route, p.config.offline)]
    names += [RING_TABLE] if p.config.offline != "he" else []
    meta = {name: (p.weights[name].shape, p.weights[name].scale) for name in names}
    return model_fingerprint(arch, p.config, meta, mags)
