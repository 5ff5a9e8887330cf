"""Model presets: real architectures, described by the ``config.json`` mlx-lm builds them from.

A preset is a model's configuration without its weights.  ``prefill``
builds it with mlx-lm's own model code and seeded random weights, so a
benchmark needs no download and no license acceptance, while every matmul,
attention and cache shape is the real model's.  Random weights change
nothing that timing or memory depends on: the work per token is fixed by
the shapes, not by the values (decoding is greedy over the whole
vocabulary, and no stop token ends it early).

Pure data: no MLX import here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_LLAMA3_ROPE = {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}


@dataclass(frozen=True)
class ModelPreset:
    """A named architecture.

    ``config`` is what the model's ``config.json`` holds (the fields mlx-lm's
    ``ModelArgs.from_dict`` reads); ``dtype`` is the dtype of its released
    weights, used for activations and for quantization scales; ``source`` names
    the checkpoint whose configuration this mirrors.
    """

    name: str
    config: dict[str, Any]
    dtype: str
    source: str
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        return str(self.config["model_type"])

    @property
    def context(self) -> int:
        """Longest sequence (prompt plus generated tokens) the model supports."""
        return int(self.config["max_position_embeddings"])

    def summary(self) -> dict[str, Any]:
        """The shape facts a report needs, in one flat dict."""
        c = self.config
        heads = int(c["num_attention_heads"])
        return {
            "model_type": self.model_type,
            "hidden_size": c["hidden_size"],
            "num_hidden_layers": c["num_hidden_layers"],
            "num_attention_heads": heads,
            "num_key_value_heads": c.get("num_key_value_heads", heads),
            "head_dim": c.get("head_dim") or c["hidden_size"] // heads,
            "intermediate_size": c["intermediate_size"],
            "vocab_size": c["vocab_size"],
            "tie_word_embeddings": c.get("tie_word_embeddings", False),
            "context": self.context,
            "dtype": self.dtype,
            "source": self.source,
        }


def _llama32(
    name: str, hidden: int, layers: int, heads: int, head_dim: int, source: str
) -> ModelPreset:
    return ModelPreset(
        name=name,
        config={
            "model_type": "llama",
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": 8,
            "head_dim": head_dim,
            "intermediate_size": 8192,
            "vocab_size": 128256,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": dict(_LLAMA3_ROPE),
            "max_position_embeddings": 131072,
            "tie_word_embeddings": True,
            "attention_bias": False,
            "mlp_bias": False,
        },
        dtype="bfloat16",
        source=source,
        description=f"Llama 3.2 {name.rsplit('-', 1)[1].upper()}: {layers} layers, "
        f"hidden {hidden}, {heads} heads / 8 KV heads, vocab 128256, tied embeddings",
    )


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        _llama32("llama-3.2-1b", 2048, 16, 32, 64, "meta-llama/Llama-3.2-1B-Instruct"),
        _llama32("llama-3.2-3b", 3072, 28, 24, 128, "meta-llama/Llama-3.2-3B-Instruct"),
        ModelPreset(
            name="qwen2.5-0.5b",
            config={
                "model_type": "qwen2",
                "hidden_size": 896,
                "num_hidden_layers": 24,
                "num_attention_heads": 14,
                "num_key_value_heads": 2,
                "intermediate_size": 4864,
                "vocab_size": 151936,
                "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0,
                "max_position_embeddings": 32768,
                "tie_word_embeddings": True,
            },
            dtype="bfloat16",
            source="Qwen/Qwen2.5-0.5B-Instruct",
            description="Qwen2.5 0.5B: 24 layers, hidden 896, 14 heads / 2 KV heads, "
            "vocab 151936, QKV biases, tied embeddings",
        ),
        # Test-sized models: every code path of the real ones (GQA, llama3 rope
        # scaling, tied embeddings, QKV biases) at dimensions that divide every
        # accepted group size (16..128).  float32 because MLX's CPU backend runs
        # half-precision quantized matmuls tens of times slower than float32.
        ModelPreset(
            name="tiny",
            config={
                "model_type": "llama",
                "hidden_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "intermediate_size": 256,
                "vocab_size": 1024,
                "rms_norm_eps": 1e-5,
                "rope_theta": 500000.0,
                "rope_scaling": {**_LLAMA3_ROPE, "original_max_position_embeddings": 1024},
                "max_position_embeddings": 4096,
                "tie_word_embeddings": True,
            },
            dtype="float32",
            source="test-sized llama",
            description="Llama architecture, 2 layers, hidden 128, vocab 1024: for CPU tests",
        ),
        ModelPreset(
            name="tiny-qwen2",
            config={
                "model_type": "qwen2",
                "hidden_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "intermediate_size": 256,
                "vocab_size": 1024,
                "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0,
                "max_position_embeddings": 4096,
                "tie_word_embeddings": False,
            },
            dtype="float32",
            source="test-sized qwen2",
            description="Qwen2 architecture (QKV biases, untied head), 2 layers, hidden 128: "
            "for CPU tests",
        ),
    )
}


def preset_names() -> list[str]:
    """Names of the built-in presets."""
    return list(PRESETS)


def get_preset(name: str) -> ModelPreset:
    """The preset called ``name``; ``KeyError`` listing the presets otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(
            f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}"
        ) from None
