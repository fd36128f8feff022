"""Llama-family decoders whose layers each have their own size: the transformers side of a tyr-jax export.

tyr-jax copies this file next to the config.json of every export that transformers' own Llama, Qwen2
and Mistral classes cannot hold (they build every layer from one global head count and MLP width), so

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

loads it. config.json names the base architecture (`tyr_base_model_type`) and, per layer, the KV groups
(`tyr_kv_groups`; query heads = KV groups · num_attention_heads / num_key_value_heads) and MLP channels
(`tyr_mlp_widths`); 0 removes the sublayer (a residual pass-through plus its output bias, if any).
`tyr_biases` names the projections that carry a bias. A PBS²P export (`tyr_binary`) keeps its 1-bit
projections packed and unpacks them in every forward, so the model stays as small in memory as on disk:
ŵ = α·(±1) + μ where kept, else 0.

The layers are transformers' Mistral modules (Llama's, with a sliding window where the base model has
one) given per-layer sizes; their forward passes are transformers' own. Needs transformers ≥ 5.
"""

from __future__ import annotations

import warnings

import torch
import transformers
from torch import nn
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.models.mistral.modeling_mistral import (
    MistralAttention, MistralDecoderLayer, MistralForCausalLM, MistralMLP, MistralModel, MistralPreTrainedModel,
    MistralRMSNorm, MistralRotaryEmbedding)

BASE_MODEL_TYPES = ("llama", "mistral", "qwen2")
PACKED_FORMAT = 1

if int(transformers.__version__.split(".")[0]) < 5:
    # Configs as dataclasses (`__post_init__`) and the `cache` keyword of the layers are transformers 5's.
    raise ImportError(f"modeling_tyr.py needs transformers >= 5, found {transformers.__version__}: "
                      "pip install -U 'transformers>=5'")


class TyrConfig(LlamaConfig):
    """LlamaConfig plus the `tyr_*` keys of a tyr-jax export (module docstring)."""

    model_type = "tyr"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # MistralModel picks its mask by `sliding_window`; Qwen2 has one only with use_sliding_window.
        use = getattr(self, "tyr_base_model_type", None) == "mistral" or getattr(self, "use_sliding_window", False)
        self.sliding_window = getattr(self, "sliding_window", None) if use else None

    def validate_architecture(self):
        """`head_dim` is explicit, so hidden_size need not be a multiple of the head count (as in Mistral)."""

    def check_export_keys(self) -> None:
        """The `tyr_*` keys a model is built from must come from a tyr-jax export this file can read."""
        base = getattr(self, "tyr_base_model_type", None)
        if base not in BASE_MODEL_TYPES:
            raise ValueError(f"tyr_base_model_type is {base!r}; a tyr-jax export names one of "
                             f"{', '.join(BASE_MODEL_TYPES)}: export the model again with tyr-jax")
        binary = getattr(self, "tyr_binary", None)
        if binary is not None and (binary.get("format") != PACKED_FORMAT or "masked" not in binary):
            raise ValueError(f"tyr_binary (format {binary.get('format')!r}) is not what this modeling_tyr.py "
                             f"reads (format {PACKED_FORMAT} with `masked`): export the model again with tyr-jax")

    def layer_kv_groups(self, layer: int) -> int:
        groups = getattr(self, "tyr_kv_groups", None)
        return self.num_key_value_heads if groups is None else groups[layer]

    def layer_mlp_width(self, layer: int) -> int:
        widths = getattr(self, "tyr_mlp_widths", None)
        return self.intermediate_size if widths is None else widths[layer]

    def has_bias(self, proj: str) -> bool:
        return proj in getattr(self, "tyr_biases", ())

    def packing(self, layer: int) -> dict | None:
        """How `layer`'s projections are packed ({n, m, block_size, masked}), None if they are dense."""
        binary = getattr(self, "tyr_binary", None)
        if binary is None or binary["n_per_layer"][layer] is None:
            return None
        return {"n": binary["n_per_layer"][layer], "m": binary["m"], "block_size": binary["block_size"],
                "masked": binary["masked"][layer]}


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """uint8 [O, ⌈count/8⌉] → bool [O, count]; bits little-endian within a byte (numpy's bitorder="little")."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).flatten(-2)[:, :count].bool()


class PackedLinear(nn.Module):
    """A PBS²P projection kept as bits: ŵ_rj = α_r,b(j)·(±1) + μ_r,b(j) where kept, else 0; y = x ŵᵀ + bias.

    Buffers are named as the export names its tensors (`<proj>.weight_mask`, `_signs`, `_alpha`, `_mu`):
    the keep bits of every weight (absent when nothing is pruned), the signs of the kept weights of each
    row in column order, and α, μ per row and block of `block_size` input columns (float16).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, *, n: int, m: int, block_size: int,
                 masked: bool):
        super().__init__()
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        self.kept = in_features * n // m if masked else in_features  # weights kept per row
        bits = lambda count: torch.zeros(out_features, -(-count // 8), dtype=torch.uint8)  # noqa: E731
        scales = lambda: torch.zeros(out_features, -(-in_features // block_size), dtype=torch.float16)  # noqa: E731
        self.register_buffer("weight_mask", bits(in_features) if masked else None)
        self.register_buffer("weight_signs", bits(self.kept))
        self.register_buffer("weight_alpha", scales())
        self.register_buffer("weight_mu", scales())
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def dense_weight(self) -> torch.Tensor:
        """The [O, I] weight in fp32, exactly as tyr-jax unpacks it."""
        shape = (self.out_features, self.in_features)
        keep = (unpack_bits(self.weight_mask, self.in_features) if self.weight_mask is not None else
                torch.ones(shape, dtype=torch.bool, device=self.weight_signs.device))
        sign = torch.zeros(shape, dtype=torch.bool, device=keep.device)
        sign[keep] = unpack_bits(self.weight_signs, self.kept).reshape(-1)
        block_of = torch.arange(self.in_features, device=keep.device) // self.block_size
        alpha = self.weight_alpha.float()[:, block_of]
        mu = self.weight_mu.float()[:, block_of]
        return torch.where(keep, torch.where(sign, alpha, -alpha) + mu, torch.zeros((), device=keep.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dense_weight().to(x.dtype), self.bias)


def projection(config: TyrConfig, layer: int, name: str, in_features: int, out_features: int) -> nn.Module:
    """One projection of `layer` (`name` as HF names it, e.g. "q_proj"): nn.Linear, or PackedLinear."""
    bias, packing = config.has_bias(name), config.packing(layer)
    if packing is not None:
        return PackedLinear(in_features, out_features, bias, **packing)
    with warnings.catch_warnings():  # a removed sublayer's [0, D] weights have nothing to initialise
        warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op", UserWarning)
        return nn.Linear(in_features, out_features, bias=bias)


class TyrAttention(MistralAttention):
    """MistralAttention with this layer's number of KV groups and its own biases; with none, the sublayer
    is removed: it adds only o_proj's bias, and puts a zero key/value stand-in in the cache."""

    def __init__(self, config: TyrConfig, layer_idx: int):
        # MistralAttention's own set-up first: with the `kernels` package installed, transformers wraps it
        # to give each instance its kernel table, which forward reads. Its full-size projections are then
        # replaced (from_pretrained builds them on the meta device, so they cost nothing there).
        super().__init__(config, layer_idx)
        kv = config.layer_kv_groups(layer_idx) * self.head_dim
        q = kv * self.num_key_value_groups
        d = config.hidden_size
        self.q_proj = projection(config, layer_idx, "q_proj", d, q)
        self.k_proj = projection(config, layer_idx, "k_proj", d, kv)
        self.v_proj = projection(config, layer_idx, "v_proj", d, kv)
        self.o_proj = projection(config, layer_idx, "o_proj", q, d)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.config.layer_kv_groups(self.layer_idx):
            return super().forward(hidden_states, *args, **kwargs)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            # Every layer of a cache must grow by the new tokens, or its length (read from layer 0) and the
            # masks go wrong; one head of width 1 is the smallest stand-in that the cache counts.
            stand_in = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(stand_in, stand_in, self.layer_idx)
        return self.o_proj(hidden_states.new_zeros(*hidden_states.shape[:-1], 0)), None


class TyrMLP(MistralMLP):
    """MistralMLP with this layer's MLP width and its own biases (width 0: only down_proj's bias remains)."""

    def __init__(self, config: TyrConfig, layer_idx: int):
        nn.Module.__init__(self)
        self.config = config
        self.hidden_size, self.intermediate_size = config.hidden_size, config.layer_mlp_width(layer_idx)
        d, f = self.hidden_size, self.intermediate_size
        self.gate_proj = projection(config, layer_idx, "gate_proj", d, f)
        self.up_proj = projection(config, layer_idx, "up_proj", d, f)
        self.down_proj = projection(config, layer_idx, "down_proj", f, d)
        self.act_fn = ACT2FN[config.hidden_act]


class TyrDecoderLayer(MistralDecoderLayer):
    """MistralDecoderLayer (pre-norm attention, then MLP) built from the per-layer sublayers above."""

    def __init__(self, config: TyrConfig, layer_idx: int):
        nn.Module.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = TyrAttention(config, layer_idx)
        self.mlp = TyrMLP(config, layer_idx)
        self.input_layernorm = MistralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MistralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class TyrPreTrainedModel(MistralPreTrainedModel):
    config_class = TyrConfig
    _no_split_modules = ["TyrDecoderLayer"]
    _can_record_outputs = {"hidden_states": TyrDecoderLayer, "attentions": TyrAttention}


class TyrModel(TyrPreTrainedModel, MistralModel):
    """MistralModel (its forward picks the sliding-window mask when `sliding_window` is set) with Tyr layers."""

    def __init__(self, config: TyrConfig):
        config.check_export_keys()
        TyrPreTrainedModel.__init__(self, config)
        self.padding_idx, self.vocab_size = config.pad_token_id, config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(TyrDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MistralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MistralRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class TyrForCausalLM(TyrPreTrainedModel, MistralForCausalLM):
    """The causal LM (lm_head over TyrModel); generate() works with transformers' caches."""

    def __init__(self, config: TyrConfig):
        TyrPreTrainedModel.__init__(self, config)
        self.model = TyrModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
