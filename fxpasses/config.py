"""The one configuration schema of fxpasses, its validation and every source it is read from.

Sources, in increasing priority: defaults < vllm-ascend switches (migration path; also the weight
NZ mode, `additional_config["weight_nz_mode"]` over `VLLM_ASCEND_ENABLE_NZ`, as `weight_format`) <
vLLM `additional_config["fxpasses"]` < `FXPASSES_CONFIG` (inline JSON, or a path to a .json/.toml
file) < explicit keyword arguments. `FXPASSES_DUMP_DIR` sets `dump_dir`.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from fxpasses import ascend_switches, link_costs, op_forms
from fxpasses.errors import ConfigError
from fxpasses.patterns_loader import load_patterns
from fxpasses.strategies import registry as strategy_registry

log = logging.getLogger("fxpasses")


def parse_strategies(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """'flashcomm1+flashcomm2' / ['sp'] -> ('flashcomm1', 'flashcomm2'): names resolved through the
    strategy registry (aliases included), ordered canonically."""
    items = spec.split("+") if isinstance(spec, str) else list(spec)
    return strategy_registry.canonical([i for i in items if str(i).strip()])


#: the `int8_comm` values (see `FxPassesConfig`)
INT8_COMM_MODES = ("auto", "off")


@dataclass(frozen=True)
class FxPassesConfig:
    """What to rewrite and how. See docs/configuration.md for each key."""

    strategies: tuple[str, ...] = ()
    flashcomm2_oproj_tp_size: int = 1      # K of FlashComm2 (1 <= K < tp, K | tp)
    otp_size: int = 0                      # K of o_proj TP (DP attention); 0 = world size
    mlp_tp_size: int = 0                   # K of MLP TP (DP attention); 0 = world size
    # apply only to graphs compiled for >= this many tokens; "auto": where the α-β model says the
    # rewrite is no slower over every token count vLLM runs the graph at (fxpasses.token_gate)
    min_tokens: int | str = "auto"
    # the α-β model's constants over the platform's (fxpasses.link_costs): "platform", "memory_gbps",
    # and per collective kind {"latency_us", "gbps"}
    link_costs: Mapping[str, Any] = field(default_factory=dict)
    patterns: tuple[str, ...] = ("default",)  # pattern-set names shipped in the package, or file paths
    strict: bool = False                   # raise instead of skipping a site / keeping the graph
    dump_dir: str | None = None            # before/after graphs + site report, one folder per rank
    module_prefix: str = "model"           # prefix of the compiled module (vLLM compiles `model.`)
    check_token_counts: bool = False       # debug: check equal token counts across a group at run time
    # may platform matmul weights be in a device-private layout (Ascend NZ)? "unknown" (assume so),
    # "nd" (plain row-major: in-graph weight blocks allowed), "nd_float" (float weights plain,
    # quantised ones may not be), "nz" (any may be); see fxpasses.op_forms.weight_block_refusal
    weight_format: str = "unknown"
    # fused matmul + collective kernels after the rewrite (fxpasses.lowering): "auto" (the platform's:
    # npu, cuda with symmetric memory; nothing on CPU), "off", "reference" (the CPU reference ops)
    lowering: str = "auto"
    # W8A8: send a quantised linear input as int8 (+ its scales) where a rewrite communicates it
    # ("auto"), or gather / exchange the float input and quantise after the collective ("off")
    int8_comm: str = "auto"

    def __post_init__(self):
        self._check_types()
        object.__setattr__(self, "strategies", parse_strategies(self.strategies))
        object.__setattr__(self, "patterns", tuple(self.patterns) if not isinstance(self.patterns, str)
                           else (self.patterns,))
        if self.dump_dir is not None:
            object.__setattr__(self, "dump_dir", os.fspath(self.dump_dir))
        if self.flashcomm2_oproj_tp_size < 1:
            raise ConfigError("flashcomm2_oproj_tp_size must be >= 1 (1 = the o_proj weight is gathered whole)")
        load_patterns(self.patterns)  # a bad pattern file fails here, at start-up, not inside a compile
        families = {strategy_registry.get(n).family for n in self.strategies}
        if len(families) > 1:
            by = {f.name: [n for n in self.strategies if strategy_registry.get(n).family is f] for f in families}
            raise ConfigError(f"strategies {'+'.join(self.strategies)} cannot be combined: they rewrite different "
                              "kinds of graph (" + "; ".join(f"{'/'.join(v)}: {k} graphs" for k, v in sorted(by.items()))
                              + "); pick one family")

    def _check_types(self) -> None:
        """ConfigError naming the key, the value and the fix for every value of the wrong type."""
        def names(v) -> bool:
            return isinstance(v, str) or (isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v))

        if not names(self.strategies):
            raise ConfigError(f"strategies must be a string like 'flashcomm1+flashcomm2' or a list of strategy "
                              f"names, got {self.strategies!r}; use [] or leave the key out for none")
        if not names(self.patterns) or not self.patterns:
            raise ConfigError(f"patterns must be a pattern-set name or file path, or a non-empty list of them, "
                              f"got {self.patterns!r}; the default is [\"default\"]")
        if self.min_tokens != "auto" and (isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int)
                                          or self.min_tokens < 0):
            raise ConfigError(f"min_tokens must be a non-negative integer or \"auto\", got {self.min_tokens!r}; "
                              "write min_tokens: 0 to rewrite at every token count, \"auto\" (the default) to "
                              "rewrite where the cost model says it pays")
        link_costs.validate(self.link_costs)
        for k in ("flashcomm2_oproj_tp_size", "otp_size", "mlp_tp_size"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{k} must be a non-negative integer, got {v!r} ({type(v).__name__}); "
                                  f"write e.g. {k}: 2")
        for k in ("strict", "check_token_counts"):
            v = getattr(self, k)
            if not isinstance(v, bool):
                raise ConfigError(f"{k} must be a boolean, got {v!r} ({type(v).__name__}); write {k}: true or "
                                  f"{k}: false (no quotes)")
        if self.dump_dir is not None and not isinstance(self.dump_dir, (str, os.PathLike)):
            raise ConfigError(f"dump_dir must be a directory path, got {self.dump_dir!r}")
        if self.weight_format not in op_forms.WEIGHT_FORMATS:
            raise ConfigError(f"weight_format must be one of {list(op_forms.WEIGHT_FORMATS)}, got "
                              f"{self.weight_format!r}; 'nd' declares plain (ND) weights, 'unknown' is the default")
        if self.int8_comm not in INT8_COMM_MODES:
            raise ConfigError(f"int8_comm must be one of {list(INT8_COMM_MODES)}, got {self.int8_comm!r}; "
                              "'off' communicates the float input of quantised linears")
        if self.lowering not in ("auto", "off", "reference"):
            raise ConfigError(f"lowering must be one of ['auto', 'off', 'reference'], got {self.lowering!r}; 'auto' "
                              "fuses with the platform's kernels (none on CPU), 'off' never fuses")
        if not isinstance(self.module_prefix, str):
            raise ConfigError(f"module_prefix must be a string (vLLM compiles 'model'), got {self.module_prefix!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FxPassesConfig":
        if not isinstance(d, Mapping):
            raise ConfigError(f"an fxpasses configuration is a mapping of keys to values, got {type(d).__name__}: "
                              f"{d!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown fxpasses config key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["strategies"] = list(self.strategies)
        d["patterns"] = list(self.patterns)
        d["link_costs"] = dict(self.link_costs)
        return d

    def key(self) -> str:
        """Stable text of every value (for cache keys)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def __hash__(self) -> int:
        return hash(self.key())

    def replace(self, **kw) -> "FxPassesConfig":
        return replace(self, **kw)

    def validate_for(self, tp: int, world: int | None = None) -> None:
        """Raise ConfigError for a combination that cannot run at this tp / world size."""
        world = world or tp
        if not self.strategies:
            return
        strategies = [strategy_registry.get(n) for n in self.strategies]
        strategies[0].family.validate(self, tp, world)
        for s in strategies:
            s.validate(self, tp, world)

    def family(self):
        """The graph family of the enabled strategies (None when none is enabled)."""
        return strategy_registry.get(self.strategies[0]).family if self.strategies else None


def _load_text_or_file(value: str, what: str) -> dict[str, Any]:
    value = value.strip()
    if value.startswith(("{", "[")):
        try:
            data = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{what} is not valid JSON: {e}") from None
        return _mapping(data, f"{what} (inline JSON)")
    p = Path(value)
    if not p.is_file():
        raise ConfigError(f"{what}={value!r} is neither inline JSON nor an existing .json/.toml file")
    if p.suffix == ".toml":
        import tomllib
        try:
            data = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{what} file {p} is not valid TOML: {e}") from None
        return _mapping(data.get("fxpasses", data), f"{what} file {p}")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} file {p} is not valid JSON: {e}") from None
    return _mapping(data, f"{what} file {p}")


def _mapping(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} holds a {type(data).__name__}, not an object of fxpasses keys; write e.g. "
                          '{"strategies": ["flashcomm1"]}')
    return data


def ascend_env_overrides(env: Mapping[str, str], additional_config: Mapping[str, Any] | None = None
                         ) -> dict[str, Any]:
    """Map vllm-ascend's switches (`fxpasses.ascend_switches`, and the weight NZ mode) onto fxpasses
    keys, logging each mapping."""
    out = ascend_switches.overrides(env, additional_config)
    nz = additional_config.get("weight_nz_mode") if additional_config else None
    nz_from = "additional_config.weight_nz_mode"
    if nz is None and env.get("VLLM_ASCEND_ENABLE_NZ", "") != "":
        nz, nz_from = env["VLLM_ASCEND_ENABLE_NZ"], "VLLM_ASCEND_ENABLE_NZ"
    if nz is not None:
        fmt = _ASCEND_NZ_MODES.get(str(nz).strip())
        if fmt is None or isinstance(nz, bool):
            raise ConfigError(f"{nz_from}={nz!r} is not a vllm-ascend weight NZ mode; use 0 (ND weights), 1 "
                              "(quantised weights NZ, the default) or 2 (float weights NZ too)")
        out["weight_format"] = fmt
        log.info("fxpasses: %s=%s mapped to weight_format=%r", nz_from, nz, fmt)
    return out


# vllm-ascend's weight NZ modes (`AscendConfig.weight_nz_mode`, `vllm_ascend.utils._should_trans_nz`):
# 0 none (but Atlas 300I / 310P converts every non-float32 weight whatever the mode), 1 quantised
# weights only (the default), 2 float16/bfloat16 too; float32 weights are never converted
_ASCEND_NZ_MODES = {"0": "nd", "1": "nd_float", "2": "nz"}


def load_config(additional_config: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                **overrides: Any) -> FxPassesConfig:
    """Merge every source (see module docstring) into one validated FxPassesConfig."""
    env = os.environ if env is None else env
    merged: dict[str, Any] = {}
    merged.update(ascend_env_overrides(env, additional_config))
    if additional_config and "fxpasses" in additional_config:
        sub = additional_config["fxpasses"]
        if not isinstance(sub, Mapping):
            raise ConfigError('additional_config["fxpasses"] must be a mapping of fxpasses keys')
        merged.update(sub)
    if env.get("FXPASSES_CONFIG"):
        merged.update(_load_text_or_file(env["FXPASSES_CONFIG"], "FXPASSES_CONFIG"))
    if env.get("FXPASSES_DUMP_DIR"):
        merged["dump_dir"] = env["FXPASSES_DUMP_DIR"]
    merged.update(overrides)
    return FxPassesConfig.from_dict(merged)
