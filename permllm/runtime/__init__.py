"""Runtime: connecting the three parties and driving the setup, offline and online phases.

Layer: above :mod:`permllm.model` and :mod:`permllm.protocols`; the CLI sits on top.
"""
from .mesh import DealtInput, Trio, gather_fail_fast, local_trio, run_offline, run_online, run_setup

__all__ = ["Trio", "local_trio", "run_setup", "run_offline", "run_online", "gather_fail_fast", "DealtInput"]
