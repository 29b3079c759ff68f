"""Validated, versioned configuration objects (saved inside every artifact's manifest)."""
from __future__ import annotations

import dataclasses
from typing import Any

CONFIG_VERSION = 1

OBJECTIVES = ("auto", "fisher", "rel-original", "rel-whitened", "whitened-energy")
METHODS = ("rocket", "rocket-uniform", "svd-llm", "dense-quant")   # dense-quant: no ROCKET, weights quantized only
QUANT_METHODS = ("rtn", "gptq")            # round-to-nearest with whitened clip search | GPTQ error feedback
QUANT_SCHEMES = ("int8", "fp8", "int4")     # == rocket_deploy.quant_format.SCHEMES (the format owns it; tested)
DEFAULT_TARGETS = (
    # decoders (Llama / Qwen / Mistral / Gemma / Phi-3)
    r"(^|\.)(q_proj|k_proj|v_proj|o_proj|qkv_proj|gate_proj|up_proj|down_proj|gate_up_proj|dense|fc1|fc2)$",
    # BERT-style encoders
    r"(^|\.)attention\.self\.(query|key|value)$", r"(^|\.)attention\.output\.dense$",
    r"(^|\.)intermediate\.dense$", r"(^|\.)layer\.\d+\.output\.dense$",
)


DEFAULT_SOURCES = ("stdlib", "pyref", "licenses", "selfgen")


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field and the accepted values."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    # Built-in sources: stdlib | pyref | licenses | pkgdocs | selfgen (sampled from the model), or .txt / .jsonl
    # paths. The default mixes installed technical text, legal prose and the model's own text (docs/benchmarks.md).
    sources: tuple[str, ...] = DEFAULT_SOURCES
    samples: int = 64
    seq_len: int = 256
    eval_samples: int = 16
    heldout_fraction: float = 0.2
    seed: int = 0
    batch_size: int = 8
    sensitivity_samples: int = 32   # calibration sequences of the sensitivity pass (evenly spread; all if fewer)

    def __post_init__(self):
        object.__setattr__(self, "sources", tuple(self.sources))
        _check(len(self.sources) > 0, "calibration needs at least one text source")
        _check(self.samples >= 1, f"samples must be >= 1, got {self.samples}")
        _check(self.seq_len >= 8, f"seq_len must be >= 8, got {self.seq_len}")
        _check(self.eval_samples >= 1, f"eval_samples must be >= 1, got {self.eval_samples}")
        _check(0 < self.heldout_fraction < 1, f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(isinstance(self.sensitivity_samples, int) and self.sensitivity_samples >= 1,
               f"sensitivity_samples must be an integer >= 1, got {self.sensitivity_samples!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sources"] = list(self.sources)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CalibrationConfig":
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})


@dataclasses.dataclass(frozen=True)
class RocketConfig:
    """How to compress. ``budget`` is the fraction of the targeted layers' dense fp16 bytes to REMOVE
    (the paper's compression ratio): 0.3 keeps 70% of those bytes."""

    budget: float = 0.3
    method: str = "rocket"                       # rocket | rocket-uniform | svd-llm
    targets: tuple[str, ...] = DEFAULT_TARGETS   # regexes over module names (re.search)
    exclude: tuple[str, ...] = (r"lm_head$", r"embed", r"pooler", r"classifier")
    byte_fractions: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    keep_ratios: tuple[float, ...] = (1.0, 2 / 3, 1 / 2, 1 / 3)
    rank_multiple: int = 8
    objective: str = "auto"                      # auto: fisher for causal LMs, rel-original for encoders
    cap_alphas: tuple[float, ...] = (1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0)
    knapsack_buckets: int = 20000
    importance_lambda: float = 0.5
    oversparsify: float = 0.005
    ridge_rel: float = 1e-3
    gram_damping: float = 0.0                    # add gram_damping * mean(diag H) * I to the per-token Gram (whitening)
    # Factorization levers applied when materialising (docs/benchmarks.md section 7); the profile is unchanged.
    refit_rounds: int = 2                        # alternate least-squares V on its support and the U refit (0: off)
    error_propagation: bool = False              # fit block b to the outputs of the compressed blocks 0..b-1
    storage_dtype: str = "float16"
    safeguard: bool = True                       # keep uniform allocation if it beats the knapsack on held-out text
    quantize: str | None = None                  # None | int8 | fp8 | int4: quantize the factors (docs/quantization.md)
    quant_group_size: int = 128                  # int4 group size along d_in
    # How quantized weights are rounded (docs/quantization.md "GPTQ"; defaults chosen on never-calibrated text,
    # docs/benchmarks.md section 6): dense weights (dense option, dense-quant) and U: rtn | gptq.
    quant_method: str = "gptq"
    quant_act_order: bool = True                 # gptq: process inputs by decreasing Gram diagonal
    quant_u_method: str = "gptq"
    quant_v_refit: bool = True                   # refit V's kept values to the quantized U (least squares on support)
    # V's kept values: 4 (symmetric int4s, one scale per column) or 8 bits; None: 4 under int4 (docs/benchmarks.md
    # section 6: better on every domain at the same bytes), else 8. Configs saved before the option load as 8.
    quant_v_bits: int | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self):
        for name in ("targets", "exclude", "byte_fractions", "keep_ratios", "cap_alphas"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _check(isinstance(self.budget, (int, float)) and 0 < self.budget < 1,
               f"budget must be a fraction in (0, 1) of the targeted bytes to remove, got {self.budget}")
        _check(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        _check(self.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        _check(len(self.targets) > 0, "targets needs at least one pattern")
        _check(len(self.byte_fractions) > 0 and all(0 < f < 1 for f in self.byte_fractions),
               f"byte_fractions must be in (0, 1), got {self.byte_fractions}")
        _check(len(self.keep_ratios) > 0 and all(0 < k <= 1 for k in self.keep_ratios),
               f"keep_ratios must be in (0, 1], got {self.keep_ratios}")
        _check(self.rank_multiple >= 1, "rank_multiple must be >= 1")
        _check(self.knapsack_buckets >= 100, "knapsack_buckets must be >= 100")
        _check(0 <= self.importance_lambda <= 1, "importance_lambda must be in [0, 1]")
        _check(0 <= self.oversparsify < 0.5, "oversparsify must be in [0, 0.5)")
        _check(self.ridge_rel > 0, "ridge_rel must be > 0")
        _check(isinstance(self.gram_damping, (int, float)) and 0 <= self.gram_damping <= 10,
               f"gram_damping must be in [0, 10] (a fraction of the Gram's mean diagonal), got {self.gram_damping!r}")
        _check(isinstance(self.refit_rounds, int) and not isinstance(self.refit_rounds, bool)
               and 0 <= self.refit_rounds <= 20, f"refit_rounds must be an integer in [0, 20], got {self.refit_rounds!r}")
        _check(isinstance(self.error_propagation, bool),
               f"error_propagation must be true or false, got {self.error_propagation!r}")
        _check(self.storage_dtype in ("float16", "bfloat16"), "storage_dtype must be float16 or bfloat16")
        _check(self.quantize is None or self.quantize in QUANT_SCHEMES,
               f"quantize must be None or one of {QUANT_SCHEMES}, got {self.quantize!r}")
        _check(isinstance(self.quant_group_size, int) and self.quant_group_size >= 2 and self.quant_group_size % 2 == 0,
               f"quant_group_size must be an even integer >= 2, got {self.quant_group_size!r}")
        for name in ("quant_method", "quant_u_method"):
            _check(getattr(self, name) in QUANT_METHODS,
                   f"{name} must be one of {QUANT_METHODS}, got {getattr(self, name)!r}")
        for name in ("quant_act_order", "quant_v_refit"):
            _check(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.quant_v_bits is None:
            object.__setattr__(self, "quant_v_bits", 4 if self.quantize == "int4" else 8)
        _check(self.quant_v_bits in (8, 4) and not isinstance(self.quant_v_bits, bool),
               f"quant_v_bits must be 8 or 4, got {self.quant_v_bits!r}")
        _check(self.quant_v_bits == 8 or self.quantize == "int4",
               f"quant_v_bits=4 stores V's kept values in 4 bits under the int4 scheme: set quantize to 'int4' "
               f"(got {self.quantize!r}) or keep quant_v_bits=8")
        _check(self.method != "dense-quant" or self.quantize is not None,
               "method 'dense-quant' quantizes the dense weights: set quantize to one of " + str(QUANT_SCHEMES))
        _check(self.version == CONFIG_VERSION, f"config version {self.version} is not supported (expected {CONFIG_VERSION})")
        import re
        for p in self.targets + self.exclude:
            try:
                re.compile(p)
            except re.error as e:
                raise ConfigError(f"target pattern {p!r} is not a valid regular expression: {e}") from e

    def replace(self, **kw) -> "RocketConfig":
        if "quantize" in kw and "quant_v_bits" not in kw:
            kw["quant_v_bits"] = None                  # re-derived for the new scheme
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RocketConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown RocketConfig fields {sorted(unknown)}")
        if "quant_group_size" in d and "quant_method" not in d:     # saved before GPTQ existed: it was rounded
            d = {"quant_method": "rtn", "quant_act_order": False, "quant_u_method": "rtn", "quant_v_refit": False, **d}
        if "version" in d and "quant_v_bits" not in d:              # saved before the option: V was int8
            d = {**d, "quant_v_bits": 8}
        return cls(**d)


HEAL_SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class HealConfig:
    """How ``rocket-deploy heal`` distils the compressed model from its dense model (docs/benchmarks.md "Healing"):
    AdamW on U and V's kept values (masks fixed), loss KL(dense || student) per token + ``hidden_mse`` times the
    relative MSE of the last hidden state."""

    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 4
    seq_len: int = 128                 # tokens per training sequence (the calibration chunks are cut to this)
    schedule: str = "cosine"           # decay of the learning rate after warmup: cosine | linear | constant
    warmup_steps: int = 5
    weight_decay: float = 0.0
    grad_clip: float = 1.0             # max global gradient norm (0: off)
    hidden_mse: float = 0.0            # weight of the last-hidden-state relative MSE term (0: KL only)
    checkpoint_every: int = 25         # steps between resumable checkpoints (0: none)
    seed: int = 0
    version: int = CONFIG_VERSION

    def __post_init__(self):
        def _int(name, lo):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"{name} must be an integer >= {lo}, got {v!r}")
        _int("steps", 1)
        _int("batch_size", 1)
        _int("seq_len", 8)
        _int("warmup_steps", 0)
        _int("checkpoint_every", 0)
        _check(isinstance(self.lr, (int, float)) and 0 < self.lr <= 1, f"lr must be in (0, 1], got {self.lr!r}")
        _check(self.schedule in HEAL_SCHEDULES, f"schedule must be one of {HEAL_SCHEDULES}, got {self.schedule!r}")
        _check(isinstance(self.weight_decay, (int, float)) and 0 <= self.weight_decay < 1,
               f"weight_decay must be in [0, 1), got {self.weight_decay!r}")
        _check(isinstance(self.grad_clip, (int, float)) and self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip!r}")
        _check(isinstance(self.hidden_mse, (int, float)) and self.hidden_mse >= 0, f"hidden_mse must be >= 0, got {self.hidden_mse!r}")
        _check(self.version == CONFIG_VERSION, f"config version {self.version} is not supported (expected {CONFIG_VERSION})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HealConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown HealConfig fields {sorted(unknown)}")
        return cls(**d)
