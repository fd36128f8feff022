"""Model configuration: one frozen dataclass for the Llama family, mapped to and from the HF config.

The Hugging Face `config.json` of Llama 2/3/3.x, Mistral, Qwen2 and SmolLM2 maps onto `ModelConfig`.
Attributes that change the forward pass and that we do not implement are an error naming the
attribute; attributes that do not change it are listed in `_INERT_HF_KEYS` and dropped on purpose.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# Keys of an HF config.json that never change the forward pass (bookkeeping, generation, training).
_INERT_HF_KEYS = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache",
    "attention_dropout", "pretraining_tp", "max_position_embeddings", "output_attentions",
    "output_hidden_states", "return_dict", "tokenizer_class", "is_llama_config", "auto_map",
    "generation_config", "chunk_size_feed_forward", "id2label", "label2id", "problem_type",
    "task_specific_params", "finetuning_task", "prefix", "sep_token_id", "decoder_start_token_id",
    "max_length", "min_length", "do_sample", "num_beams", "temperature", "top_k", "top_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "tie_encoder_decoder", "is_decoder", "is_encoder_decoder",
    "add_cross_attention", "cross_attention_hidden_size", "torchscript", "use_bfloat16",
    "pruned_heads", "tf_legacy_loss", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "early_stopping", "diversity_penalty", "num_beam_groups",
    "typical_p", "encoder_no_repeat_ngram_size", "output_scores", "return_dict_in_generate",
    "mlp_only_layers", "rope_interleaved",
})
_ROPE_TYPES = ("default", "linear", "llama3")
# Projections that may carry a bias, as `tyr_biases` in config.json names them.
_BIAS_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `rope_type` is one of `default`, `linear`, `llama3`."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in _ROPE_TYPES:
            raise ValueError(
                f"rope_type {self.rope_type!r} is not supported (supported: {', '.join(_ROPE_TYPES)}); "
                "its scaling changes the logits, so the model cannot be loaded faithfully."
            )
        if self.theta <= 0 or self.factor <= 0:
            raise ValueError(f"rope theta and factor must be positive, got {self.theta}, {self.factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a Llama-family decoder.

    `kv_groups` and `mlp_widths` give per-layer sizes for pruned models (None: every layer dense).
    A KV group is one key/value head together with its `num_heads // num_kv_heads` query heads;
    a layer with 0 KV groups (or 0 MLP channels) has that sublayer removed: a residual pass-through.
    `o_bias` may be set without `qkv_bias`, and `down_bias` is a down_proj bias without gate/up biases
    (`mlp_bias` gives all three): the compensation biases that FLAP-style pruning adds.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    down_bias: bool = False
    sliding_window: int | None = None
    kv_groups: tuple[int, ...] | None = None
    mlp_widths: tuple[int, ...] | None = None
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "intermediate_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.mlp_bias and self.down_bias:
            raise ValueError("down_bias is a down_proj bias without gate/up biases; mlp_bias already has one")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not a Llama-family architecture "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        for name, full in (("kv_groups", self.num_kv_heads), ("mlp_widths", self.intermediate_size)):
            sizes = getattr(self, name)
            if sizes is None:
                continue
            if len(sizes) != self.num_layers:
                raise ValueError(f"{name} has {len(sizes)} entries for {self.num_layers} layers")
            if any(not 0 <= s <= full for s in sizes):
                raise ValueError(f"{name} entries must lie in [0, {full}], got {sizes}")

    @property
    def q_per_kv(self) -> int:
        """Query heads per KV group (fixed under pruning)."""
        return self.num_heads // self.num_kv_heads

    def layer_kv_groups(self, layer: int) -> int:
        return self.num_kv_heads if self.kv_groups is None else self.kv_groups[layer]

    def layer_mlp_width(self, layer: int) -> int:
        return self.intermediate_size if self.mlp_widths is None else self.mlp_widths[layer]

    @property
    def is_pruned(self) -> bool:
        return any(self.layer_kv_groups(i) != self.num_kv_heads or
                   self.layer_mlp_width(i) != self.intermediate_size for i in range(self.num_layers))

    def with_layer_sizes(self, kv_groups, mlp_widths) -> ModelConfig:
        """The same model with per-layer KV-group counts and MLP widths (a pruned model)."""
        return dataclasses.replace(self, kv_groups=tuple(int(k) for k in kv_groups),
                                   mlp_widths=tuple(int(f) for f in mlp_widths))

    def num_params(self) -> int:
        """Parameter count of the model with its per-layer sizes (tied embeddings counted once)."""
        return self.embedding_params() + sum(self.layer_params(i) for i in range(self.num_layers))

    def embedding_params(self) -> int:
        d = self.hidden_size
        return self.vocab_size * d * (1 if self.tie_word_embeddings else 2) + d

    def attention_params(self, kv_groups: int) -> int:
        """Parameters of one attention sublayer with `kv_groups` KV groups (norm excluded; an output bias
        stays, and is the whole sublayer, when no group is left)."""
        d, h, g = self.hidden_size, self.head_dim, self.q_per_kv
        per_group = d * h * (g + 2) + g * h * d + (h * (g + 2) if self.qkv_bias else 0)
        return kv_groups * per_group + (d if self.o_bias else 0)

    def mlp_params(self, width: int) -> int:
        """Parameters of one MLP sublayer with `width` intermediate channels (norm excluded; a down_proj
        bias stays when no channel is left)."""
        d = self.hidden_size
        down_bias = self.mlp_bias or self.down_bias
        return width * (3 * d + (2 if self.mlp_bias else 0)) + (d if down_bias else 0)

    def layer_params(self, layer: int) -> int:
        return (2 * self.hidden_size + self.attention_params(self.layer_kv_groups(layer)) +
                self.mlp_params(self.layer_mlp_width(layer)))

    def bias_projections(self) -> list[str]:
        """Names of the projections that carry a bias (HF naming)."""
        has = {"q_proj": self.qkv_bias, "k_proj": self.qkv_bias, "v_proj": self.qkv_bias, "o_proj": self.o_bias,
               "gate_proj": self.mlp_bias, "up_proj": self.mlp_bias, "down_proj": self.mlp_bias or self.down_bias}
        return [p for p in _BIAS_PROJECTIONS if has[p]]

    # -- Hugging Face mapping -------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Builds the config from an HF `config.json` dict; unsupported math is an error."""
        hf = dict(hf)
        model_type = hf.pop("model_type", None)
        if model_type == "tyr":  # our exports for transformers' remote code: the base type is named
            model_type = hf.pop("tyr_base_model_type", None)
            if model_type is None:
                raise ValueError("config.json has model_type 'tyr' but no tyr_base_model_type (llama, mistral or "
                                 "qwen2); it was not written by tyr-jax's export: export the model again")
        if model_type not in SUPPORTED_MODEL_TYPES:
            arch = hf.get("architectures") or model_type
            raise ValueError(f"architecture {arch!r} (model_type {model_type!r}) is not supported; tyr-jax "
                             f"loads Llama-family decoders: {', '.join(SUPPORTED_MODEL_TYPES)}")
        act = hf.pop("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only 'silu' gated MLPs)")
        if hf.pop("quantization_config", None) is not None:
            raise ValueError("quantization_config is set: load the unquantized checkpoint instead")
        rope = _rope_from_hf(hf)
        sliding = _sliding_window_from_hf(hf, model_type)
        num_heads = hf.pop("num_attention_heads")
        hidden = hf.pop("hidden_size")
        head_dim = hf.pop("head_dim", None) or hidden // num_heads
        attention_bias = bool(hf.pop("attention_bias", False))
        qkv_bias, o_bias = attention_bias or model_type == "qwen2", attention_bias
        mlp_bias, down_bias = bool(hf.pop("mlp_bias", False)), False
        biases = hf.pop("tyr_biases", None)
        if biases is not None:  # our exports: biases that the model type's own keys cannot say
            qkv_bias, o_bias, mlp_bias, down_bias = _biases_from_names(biases)
        kv_groups = hf.pop("tyr_kv_groups", None)
        mlp_widths = hf.pop("tyr_mlp_widths", None)
        eos = hf.pop("eos_token_id", None)
        cfg = cls(
            vocab_size=hf.pop("vocab_size"),
            hidden_size=hidden,
            num_layers=hf.pop("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=hf.pop("num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            intermediate_size=hf.pop("intermediate_size"),
            rms_norm_eps=hf.pop("rms_norm_eps", 1e-6),
            rope=rope,
            tie_word_embeddings=bool(hf.pop("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            down_bias=down_bias,
            sliding_window=sliding,
            kv_groups=None if kv_groups is None else tuple(kv_groups),
            mlp_widths=None if mlp_widths is None else tuple(mlp_widths),
            model_type=model_type,
            bos_token_id=hf.pop("bos_token_id", None),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        )
        unknown = sorted(k for k in hf if k not in _INERT_HF_KEYS)
        if unknown:
            raise ValueError(
                f"config attribute(s) {', '.join(unknown)} are not supported by tyr-jax's {model_type} "
                "model; they may change the forward pass, so loading would not be faithful. Remove "
                "them from config.json only if you know they are inert.")
        return cfg

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict; pruned sizes and biases that the model type's own keys cannot
        express (`o_proj` without q/k/v, `down_proj` alone, any bias on Mistral) go under `tyr_*` keys."""
        rope = {"rope_type": self.rope.rope_type, "rope_theta": self.rope.theta}
        if self.rope.rope_type == "linear":
            rope["factor"] = self.rope.factor
        elif self.rope.rope_type == "llama3":
            rope.update(factor=self.rope.factor, low_freq_factor=self.rope.low_freq_factor,
                        high_freq_factor=self.rope.high_freq_factor,
                        original_max_position_embeddings=self.rope.original_max_position_embeddings)
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        out = {
            "architectures": [arch[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
        }
        if self.model_type == "llama":
            out.update(attention_bias=self.qkv_bias or self.o_bias, mlp_bias=self.mlp_bias or self.down_bias)
        elif self.model_type == "qwen2":
            out.update(use_sliding_window=self.sliding_window is not None)
            if self.sliding_window is not None:  # else transformers' max_window_layers default (28) applies
                out["layer_types"] = ["sliding_attention"] * self.num_layers
        own_keys_suffice = {"llama": self.qkv_bias == self.o_bias and not self.down_bias,
                            "qwen2": self.bias_projections() == ["q_proj", "k_proj", "v_proj"],
                            "mistral": not self.bias_projections()}
        if not own_keys_suffice[self.model_type]:
            out["tyr_biases"] = self.bias_projections()
        if self.sliding_window is not None or self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        if self.kv_groups is not None:
            out["tyr_kv_groups"] = list(self.kv_groups)
        if self.mlp_widths is not None:
            out["tyr_mlp_widths"] = list(self.mlp_widths)
        return out


def _biases_from_names(names) -> tuple[bool, bool, bool, bool]:
    """`tyr_biases` → (qkv_bias, o_bias, mlp_bias, down_bias); q/k/v and gate/up come in sets."""
    names = set(names)
    unknown = sorted(names - set(_BIAS_PROJECTIONS))
    qkv, gate_up = names & {"q_proj", "k_proj", "v_proj"}, names & {"gate_proj", "up_proj"}
    if unknown or len(qkv) not in (0, 3) or (gate_up and len(gate_up | names & {"down_proj"}) != 3):
        raise ValueError(f"tyr_biases {sorted(names)} is not supported: biases come on q/k/v together, o_proj, "
                         "gate/up/down together, or down_proj alone")
    mlp = bool(gate_up)
    return bool(qkv), "o_proj" in names, mlp, "down_proj" in names and not mlp


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`.
    params = dict(hf.pop("rope_parameters", None) or {})
    theta = hf.pop("rope_theta", None)
    scaling = hf.pop("rope_scaling", None)
    if scaling:
        params.update(scaling)
    if theta is not None:
        params.setdefault("rope_theta", theta)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    kwargs = {"theta": float(params.pop("rope_theta", 10000.0)), "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        kwargs["factor"] = float(params.pop("factor"))
    if rope_type == "llama3":
        kwargs.update(low_freq_factor=float(params.pop("low_freq_factor")),
                      high_freq_factor=float(params.pop("high_freq_factor")),
                      original_max_position_embeddings=int(params.pop("original_max_position_embeddings")))
    if rope_type == "default" and params.get("factor", 1.0) == 1.0:
        params.pop("factor", None)
    if params.get("partial_rotary_factor", 1.0) == 1.0:
        params.pop("partial_rotary_factor", None)
    if params and rope_type in _ROPE_TYPES:
        raise ValueError(f"rope parameter(s) {', '.join(sorted(params))} are not supported for rope_type "
                         f"{rope_type!r}")
    return RopeConfig(**kwargs)


def _sliding_window_from_hf(hf: dict[str, Any], model_type: str) -> int | None:
    window = hf.pop("sliding_window", None)
    use = hf.pop("use_sliding_window", model_type == "mistral")
    max_window_layers = hf.pop("max_window_layers", None)
    layer_types = hf.pop("layer_types", None)
    if not use or window is None:
        return None
    if model_type == "qwen2" and (max_window_layers is not None or layer_types is not None):
        kinds = set(layer_types or [])
        if kinds != {"sliding_attention"}:
            raise ValueError("use_sliding_window with a mix of sliding and full attention layers "
                             "(max_window_layers / layer_types) is not supported")
    return int(window)
