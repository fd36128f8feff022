"""Run configuration: YAML files (`configs/`) → frozen, self-validating dataclasses.

A file has sections matching the dataclasses below; `key.sub=value` overrides from the command line
are applied before validation. Unknown keys are errors, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import typing
from typing import Any

import yaml

from tyr_jax.binarization.compress import Pbs2pConfig
from tyr_jax.export.gguf import GGUF_TYPES
from tyr_jax.pruning.policy_gradient import PolicyGradientConfig
from tyr_jax.search import SearchConfig
from tyr_jax.sharding import make_mesh
from tyr_jax.supernet import SupernetConfig

# `method:` → the local pruner that builds the copies, and whether a global search follows.
METHODS = {"tyr": ("tyr", True), "uniform": ("tyr", False), "flap": ("flap", False),
           "wanda_sp": ("wanda_sp", False), "magnitude": ("magnitude", False),
           "policy_gradient": ("tyr", False),  # learns masks instead (section policy_gradient:); no supernet
           "pbs2p": ("tyr", False)}            # binarizes every linear instead (section pbs2p:); no supernet
# Baselines that, as published, take their statistics from the dense model's activations at one sparsity
# (`supernet.baseline_stream: dense`); `expectation` gives them Týr's 9-level expectation stream ("+EA").
BASELINES = ("flap", "wanda_sp", "magnitude")


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """N calibration sequences of T tokens, sampled from a corpus with a seeded key."""

    corpus: str = "wiki-calib"
    num_sequences: int = 64
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.num_sequences < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise ValueError("calibration needs num_sequences >= 1, seq_len >= 2, batch_size >= 1")
        if self.num_sequences % self.batch_size:
            raise ValueError(f"calibration.num_sequences ({self.num_sequences}) must be a multiple of "
                             f"calibration.batch_size ({self.batch_size})")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out perplexity (`corpus`, windows of `seq_len`), out-of-domain perplexity (`ood_corpus`, the
    same windows; null skips it) and zero-shot `tasks` (first `limit` docs)."""

    corpus: str = "wiki-eval"
    ood_corpus: str | None = "news"
    seq_len: int = 512
    max_tokens: int | None = None
    batch_size: int = 8
    tasks: tuple[str, ...] = ()
    limit: int | None = None


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh: `data` devices split calibration / fitness windows and search candidates, `model`
    devices split heads, MLP channels and vocab (`tyr_jax.sharding.LOGICAL_RULES`). `data: null` uses
    every device that `model` leaves. The mesh does not change what is computed (beyond floating-point
    summation order), so a run may be resumed on another mesh."""

    data: int | None = None
    model: int = 1

    def __post_init__(self):
        for name in ("data", "model"):
            value = getattr(self, name)
            if value is None and name == "data":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"mesh.{name} must be a positive integer{' or null' if name == 'data' else ''}, "
                                 f"got {value!r}")

    def build(self, devices=None):
        """The `jax.sharding.Mesh` over `devices` (default: all, of every process)."""
        try:
            return make_mesh(self.data, self.model, devices)
        except ValueError as e:
            raise ValueError(f"config section mesh: {e}") from None


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Exports besides the HF directory OUT/model: `gguf: true` also writes OUT/model.gguf for llama.cpp,
    its matrices in `gguf_type` (f32, f16 or bf16; `tyr_jax.export.export_gguf`)."""

    gguf: bool = False
    gguf_type: str = "f16"

    def __post_init__(self):
        if self.gguf_type not in GGUF_TYPES:
            raise ValueError(f"export.gguf_type {self.gguf_type!r} is not one of {', '.join(GGUF_TYPES)} "
                             "(quantize further with llama.cpp's llama-quantize)")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: str = "smollm2-135m"
    out: str = "runs/default"
    method: str = "tyr"
    dtype: str = "float32"
    calibration: CalibrationConfig = CalibrationConfig()
    supernet: SupernetConfig = SupernetConfig()
    search: SearchConfig = SearchConfig()
    policy_gradient: PolicyGradientConfig = PolicyGradientConfig()
    pbs2p: Pbs2pConfig = Pbs2pConfig()
    eval: EvalConfig = EvalConfig()
    mesh: MeshConfig = MeshConfig()
    export: ExportConfig = ExportConfig()

    def __post_init__(self):
        if self.method == "pbs2p" and self.export.gguf:
            raise ValueError("export.gguf=true with method pbs2p: GGUF cannot hold PBS²P's packed 1-bit weights "
                             "(keep and sign bits with α and μ); set export.gguf=false (OUT/model keeps the "
                             "packed export)")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is unknown; choose one of {', '.join(METHODS)}")
        # The pruner follows from `method`; `supernet.method` is not a second place to set it.
        scfg = dataclasses.replace(self.supernet, method=METHODS[self.method][0])
        if self.method in BASELINES and scfg.baseline_stream == "dense":
            # As published: one copy at the target, its statistics from dense activations (no Eq. 5).
            scfg = dataclasses.replace(scfg, num_levels=1, expectation=False)
        object.__setattr__(self, "supernet", scfg)

    @property
    def label(self) -> str:
        """The method as a table names it: "+EA" marks a baseline fed the expectation stream."""
        ea = self.method in BASELINES and self.supernet.baseline_stream == "expectation"
        return self.method + ("+EA" if ea else "")

    @property
    def searches(self) -> bool:
        return METHODS[self.method][1] and self.search.iterations > 0

    @property
    def centre_copies(self) -> bool:
        """Whether the pruned model is every sublayer's centre supernet copy (no search, no other system)."""
        return not self.searches and self.method not in ("policy_gradient", "pbs2p")


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _check_type(value, hint, key: str):
    """`value` converted to `hint` (int, float (an int is accepted), bool, str, tuple[X, ...], X | None), or a
    ValueError naming the key, the value and the expected type."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:                                 # X | None
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        items = value
        if isinstance(value, str):   # "a,b" from the command line; numbers are read as YAML
            items = [v if args[0] is str else parse_value(v) for v in value.split(",")]
        if items is None:
            return ()
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return tuple(_check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(items))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in _TYPE_NAMES and not (isinstance(value, hint) and (hint is bool or not isinstance(value, bool))):
        raise ValueError(f"{key}: expected {_TYPE_NAMES[hint]}{' or null' if optional else ''}, "
                         f"got {value!r}")
    return value


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(f'{where}{k}' for k in unknown)}; "
                         f"valid keys: {', '.join(f'{where}{k}' for k in fields)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{where}{name}.")
        else:
            kwargs[name] = _check_type(value, hint, f"{where}{name}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"bad value in {where or 'config'}: {e}") from None


def parse_value(raw: str):
    """A YAML value, except that 1e-3 is a float (YAML 1.1 reads exponents without a dot as strings)."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def load_run_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    """Reads a YAML run config (or the defaults when `path` is None) and applies `key=value` overrides."""
    tree: dict = {}
    if path is not None:
        p = pathlib.Path(path)
        if not p.exists():
            raise FileNotFoundError(f"config file {p} not found (the shipped configs are in configs/)")
        tree = yaml.safe_load(p.read_text()) or {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. supernet.target_sparsity=0.25)")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), parse_value(raw))
    if isinstance(tree.get("supernet"), dict) and "method" in tree["supernet"]:
        raise ValueError("supernet.method is not a config key: the pruner follows from the top-level "
                         f"`method:` ({', '.join(METHODS)})")
    return _build(RunConfig, tree, "")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# Settings that change what a run shows, never what it computes: left out where stored results are matched
# to a config, so that work done before such a setting existed (or with another value) is found.
DISPLAY_ONLY = ("policy_gradient.log_every",)


# Sections added after results were first stored: left out of the key while at their defaults, so that
# work stored before the section existed (which holds none, i.e. ran with the defaults) is found.
LATER_SECTIONS = {"export": ExportConfig}


def result_key(tree: dict) -> dict:
    """A config as `to_dict` gives it (or as it reads back from JSON) without the `DISPLAY_ONLY` settings
    and without the `LATER_SECTIONS` that hold their defaults."""
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    for dotted in DISPLAY_ONLY:
        section, name = dotted.split(".")
        if isinstance(tree.get(section), dict):
            tree[section].pop(name, None)
    for section, cls in LATER_SECTIONS.items():
        if section in tree and tree[section] == to_dict(cls()):
            del tree[section]
    return tree
