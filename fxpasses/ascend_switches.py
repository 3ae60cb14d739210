"""vllm-ascend's switches that fxpasses maps onto its strategies: the ones users set today, and the
removed ones still found in deployments, as data.

Checked against vllm-ascend main of 2026-08-22 (`vllm_ascend/ascend_config.py`, `envs.py`):

* today the o_proj and MLP tensor-parallel sizes live in `additional_config["finegrained_tp_config"]`
  (`oproj_tensor_parallel_size`, `mlp_tensor_parallel_size`; its lmhead / embedding / olora sizes
  are vllm-ascend's own and not mapped);
* removed, each mapped as before and named in a warning with what to set instead:
  `VLLM_ASCEND_ENABLE_MLP_OPTIMIZE` and the top-level `additional_config["oproj_tensor_parallel_size"]`
  (moved into `finegrained_tp_config`, vllm-ascend #2616, 2025-12-12);
  `VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE` (moved to `additional_config["enable_flashcomm2_parallel_size"]`
  on 2026-05-21, then FlashComm2 removed with both, #12117, 2026-07-18);
  `VLLM_ASCEND_ENABLE_FLASHCOMM1` / `additional_config["enable_flashcomm1"]` (FlashComm v1 removed,
  #13946, 2026-08-21; vllm-ascend now only warns). fxpasses is what does these layouts now, so the
  warning says how to ask fxpasses directly.

`overrides` turns an environment and an `additional_config` into fxpasses config keys; `requested`
answers the plugin's cheap "did the user ask for anything" (no import beyond this module).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

from fxpasses.errors import ConfigError

log = logging.getLogger("fxpasses")

FINEGRAINED = "finegrained_tp_config"


@dataclass(frozen=True)
class Switch:
    where: str                  # "env", "additional_config" or "finegrained_tp_config"
    name: str
    strategy: str               # the fxpasses strategy it turns on
    size_key: str | None = None  # the fxpasses key its integer value sets (None: an on/off flag)
    removed: str = ""           # when and how vllm-ascend dropped it ("": a switch of today)
    instead: str = ""           # what to set today

    @property
    def label(self) -> str:
        return {"env": self.name, "additional_config": f'additional_config["{self.name}"]',
                FINEGRAINED: f'additional_config["{FINEGRAINED}"]["{self.name}"]'}[self.where]

    def raw(self, env: Mapping[str, str], additional_config: Mapping[str, Any] | None) -> Any:
        if self.where == "env":
            return env.get(self.name)
        ac = additional_config or {}
        if self.where == FINEGRAINED:
            ac = ac.get(FINEGRAINED) or {}
            if not isinstance(ac, Mapping):
                raise ConfigError(f'additional_config["{FINEGRAINED}"] must be a mapping of sizes, got {ac!r}')
        return ac.get(self.name)

    def value(self, env: Mapping[str, str], additional_config: Mapping[str, Any] | None) -> int | bool | None:
        """The switch's setting: None when off or absent, True for a flag that is on, a size >= 1."""
        v = self.raw(env, additional_config)
        if v is None or (isinstance(v, str) and v.strip() in ("", "0")) or v is False or v == 0:
            return None
        if self.size_key is None:
            if v is True or str(v).strip() in ("1", "true", "True"):
                return True
            raise ConfigError(f"{self.label}={v!r} is not an on/off switch; set it to 1 or leave it out")
        if self.where != "env" and (isinstance(v, bool) or not isinstance(v, int)):
            raise ConfigError(f"{self.label} must be an integer (the {self.strategy} group size), got {v!r}")
        try:
            k = int(v)
            if k < 1:
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(f"{self.label}={v!r} is not a positive integer; set it to the {self.strategy} "
                              f"group size (e.g. 2), or 0 to disable") from None
        return k


_FC1 = 'additional_config={"fxpasses": {"strategies": ["flashcomm1"]}}'
_FC2 = 'additional_config={"fxpasses": {"strategies": ["flashcomm2"], "flashcomm2_oproj_tp_size": K}}'
SWITCHES: tuple[Switch, ...] = (
    Switch(FINEGRAINED, "oproj_tensor_parallel_size", "otp", "otp_size"),
    Switch(FINEGRAINED, "mlp_tensor_parallel_size", "mlp_tp", "mlp_tp_size"),
    Switch("env", "VLLM_ASCEND_ENABLE_FLASHCOMM1", "flashcomm1",
           removed="vllm-ascend removed FlashComm v1 on 2026-08-21 (#13946)", instead=_FC1),
    Switch("additional_config", "enable_flashcomm1", "flashcomm1",
           removed="vllm-ascend removed FlashComm v1 on 2026-08-21 (#13946)", instead=_FC1),
    Switch("env", "VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE", "flashcomm2", "flashcomm2_oproj_tp_size",
           removed="vllm-ascend removed FlashComm2 on 2026-07-18 (#12117)", instead=_FC2),
    Switch("additional_config", "enable_flashcomm2_parallel_size", "flashcomm2", "flashcomm2_oproj_tp_size",
           removed="vllm-ascend removed FlashComm2 on 2026-07-18 (#12117)", instead=_FC2),
    Switch("env", "VLLM_ASCEND_ENABLE_MLP_OPTIMIZE", "mlp_tp",
           removed="vllm-ascend moved it into finegrained_tp_config on 2025-12-12 (#2616)",
           instead=f'additional_config["{FINEGRAINED}"]["mlp_tensor_parallel_size"]=K'),
    Switch("additional_config", "oproj_tensor_parallel_size", "otp", "otp_size",
           removed="vllm-ascend moved it into finegrained_tp_config on 2025-12-12 (#2616)",
           instead=f'additional_config["{FINEGRAINED}"]["oproj_tensor_parallel_size"]=K'),
)


def requested(env: Mapping[str, str], additional_config: Mapping[str, Any] | None) -> bool:
    """Is any switch set (a malformed value counts: resolving the config reports it)?"""
    for s in SWITCHES:
        try:
            if s.value(env, additional_config) is not None:
                return True
        except ConfigError:
            return True
    return False


def overrides(env: Mapping[str, str], additional_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """fxpasses config keys from the switches set, each mapping logged (a removed switch warned
    about, with what to set instead). A size set twice to different values is a ConfigError."""
    out: dict[str, Any] = {}
    strategies: list[str] = []
    origin: dict[str, str] = {}
    for s in SWITCHES:
        v = s.value(env, additional_config)
        if v is None:
            continue
        if s.strategy not in strategies:
            strategies.append(s.strategy)
        what = f"strategy {s.strategy}"
        if s.size_key is not None:
            if s.size_key in out and out[s.size_key] != v:
                raise ConfigError(f"{s.label}={v} and {origin[s.size_key]}={out[s.size_key]} disagree on "
                                  f"{s.size_key}; keep one of them ({s.instead or s.label})")
            out[s.size_key], origin[s.size_key] = v, s.label
            what += f" with {s.size_key}={v}"
        shown = 1 if v is True else v
        if s.removed:
            log.warning("fxpasses: %s=%s mapped to %s; it is no longer a vllm-ascend switch (%s): set %s "
                        "instead", s.label, shown, what, s.removed, s.instead)
        else:
            log.info("fxpasses: %s=%s mapped to %s", s.label, shown, what)
    if strategies:
        out["strategies"] = strategies
    return out
