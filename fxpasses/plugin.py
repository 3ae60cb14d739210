"""The `vllm.general_plugins` entry point of fxpasses.

vLLM loads general plugins in every process it starts (the front end, the engine core, each
worker). `register()` is therefore cheap and inert: it imports nothing heavy, changes nothing in a
process where fxpasses is not configured, and may run any number of times.

What it does: it wraps `VllmConfig.__post_init__` so that, once vLLM has built its configuration,

* an fxpasses pass the user registered by hand (object or string route) is *bound* to that
  configuration (its `additional_config` travels with the pass into the worker processes) and its
  configuration is validated against the TP size, so mistakes fail at start-up;
* if the user configured fxpasses (`FXPASSES_CONFIG`, `additional_config["fxpasses"]`, or the
  vllm-ascend switches `VLLM_ASCEND_ENABLE_FLASHCOMM1=1`, `VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE`,
  `VLLM_ASCEND_ENABLE_MLP_OPTIMIZE=1`, `additional_config["oproj_tensor_parallel_size"]`) and did
  not register the pass, the pass is added as
  `compilation_config.inductor_compile_config["post_grad_custom_post_pass"]` (chained after any
  pass already there).

It also wraps vLLM's `initialize_model_parallel`, so that in every worker, right after vLLM has
created its own groups (worker start, before any graph is compiled or loaded from a cache), the
process groups the configured strategies need beyond TP are created
(`fxpasses.topology.prepare_process_groups`): no group is ever created inside a compilation, and a
compiled graph from an earlier run finds the groups it names. Importing fxpasses (which the entry
point does) registers the custom ops rewritten graphs call (`fxpasses.runtime_ops`).

`FXPASSES_PLUGIN=0` turns the plugin off entirely.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

from fxpasses.logs import bridge_logging

log = logging.getLogger("fxpasses")

PASS_KEY = "post_grad_custom_post_pass"
_installed = False


def _config_requested(additional_config: Mapping[str, Any] | None, env: Mapping[str, str]) -> bool:
    """Did the user ask for fxpasses in any way (without resolving the configuration yet)?"""
    if env.get("FXPASSES_CONFIG"):
        return True
    ac = additional_config or {}
    if "fxpasses" in ac or ac.get("oproj_tensor_parallel_size"):
        return True
    return (env.get("VLLM_ASCEND_ENABLE_FLASHCOMM1", "0") == "1"
            or env.get("VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE", "0") not in ("", "0")
            or env.get("VLLM_ASCEND_ENABLE_MLP_OPTIMIZE", "0") == "1")


def _fxpasses_passes(obj) -> list:
    from fxpasses.vllm_pass import ChainedInductorPass, FxPassesInductorPass
    if isinstance(obj, FxPassesInductorPass):
        return [obj]
    if isinstance(obj, ChainedInductorPass):
        return [p for p in obj.passes if isinstance(p, FxPassesInductorPass)]
    return []


def _sizes(vllm_config) -> tuple[int, int]:
    pc = vllm_config.parallel_config
    tp = int(getattr(pc, "tensor_parallel_size", 1) or 1)
    world = int(getattr(pc, "world_size_across_dp", None) or getattr(pc, "world_size", tp) or tp)
    return tp, world


def configure_vllm_config(vllm_config, env: Mapping[str, str] | None = None) -> Any:
    """Bind / validate / add the fxpasses pass on a built VllmConfig. Returns the pass or None.

    Raises `fxpasses.errors.ConfigError` (message names the fix) for an invalid configuration.
    """
    env = os.environ if env is None else env
    bridge_logging()
    if getattr(vllm_config, "model_config", None) is None:
        return None  # a default VllmConfig() (tests, tools): no model, nothing to compile
    cc = vllm_config.compilation_config
    icc = cc.inductor_compile_config
    existing = icc.get(PASS_KEY)
    ours = _fxpasses_passes(existing)
    ac = vllm_config.additional_config if isinstance(vllm_config.additional_config, Mapping) else {}
    if not ours and not _config_requested(ac, env):
        return None  # not configured: leave vLLM exactly as it is

    from fxpasses.vllm_pass import ChainedInductorPass, FxPassesInductorPass

    tp, world = _sizes(vllm_config)
    if ours:
        for p in ours:
            p.bind(vllm_config)
            cfg = p.resolve_config(env)
            if cfg.strategies:
                cfg.validate_for(tp, world)
        log.info("fxpasses: registered pass bound to the vLLM config (tp=%d): %s", tp, ours[0].resolve_config(env).key())
        _warn_if_not_compiled(vllm_config)
        return ours[0]

    p = FxPassesInductorPass().bind(vllm_config)
    cfg = p.resolve_config(env)
    if not cfg.strategies:
        log.info("fxpasses: configured without any strategy; pass not registered")
        return None
    cfg.validate_for(tp, world)
    if existing is not None:
        log.info("fxpasses: another %s is set (%r); fxpasses runs after it", PASS_KEY, existing)
        icc[PASS_KEY] = ChainedInductorPass([existing, p])
    else:
        icc[PASS_KEY] = p
    log.info("fxpasses: plugin registered the pass as inductor_compile_config[%r] (tp=%d, world=%d): %s",
             PASS_KEY, tp, world, cfg.key())
    _warn_if_not_compiled(vllm_config)
    return p


def configs_of(vllm_config, env: Mapping[str, str] | None = None) -> list:
    """The fxpasses configurations a VllmConfig carries (registered passes, or the config sources)."""
    from fxpasses.config import load_config

    env = os.environ if env is None else env
    cc = getattr(vllm_config, "compilation_config", None)
    icc = getattr(cc, "inductor_compile_config", None) or {}
    ours = _fxpasses_passes(icc.get(PASS_KEY))
    if ours:
        return [p.resolve_config(env) for p in ours]
    ac = vllm_config.additional_config if isinstance(vllm_config.additional_config, Mapping) else {}
    return [load_config(ac, env)] if _config_requested(ac, env) else []


def prepare_groups_at_worker_start(vllm_config=None, env: Mapping[str, str] | None = None) -> list:
    """Create the process groups every configured strategy needs, on this worker, now (outside any
    compilation). Returns the configurations acted on."""
    from fxpasses.context import TPContext
    from fxpasses.topology import prepare_process_groups

    if vllm_config is None:
        from vllm.config import get_current_vllm_config_or_none
        vllm_config = get_current_vllm_config_or_none()
    if vllm_config is None:
        return []
    done = []
    for cfg in configs_of(vllm_config, env):
        if cfg.strategies:
            ctx = TPContext.from_vllm()
            prepare_process_groups(cfg, ctx)
            log.info("fxpasses: process groups for %s prepared at worker start (rank %d/%d)",
                     "+".join(cfg.strategies), ctx.global_rank, ctx.world)
            done.append(cfg)
    return done


def _wrap_model_parallel_init() -> None:
    from vllm.distributed import parallel_state as ps

    original = ps.initialize_model_parallel
    if getattr(original, "_fxpasses_wrapped", False):
        return

    def initialize_model_parallel(*args, **kwargs):
        out = original(*args, **kwargs)
        prepare_groups_at_worker_start()
        return out

    initialize_model_parallel._fxpasses_wrapped = True  # type: ignore[attr-defined]
    initialize_model_parallel.__wrapped__ = original  # type: ignore[attr-defined]
    ps.initialize_model_parallel = initialize_model_parallel


def _warn_if_not_compiled(vllm_config) -> None:
    try:
        from vllm.config import CompilationMode
        if vllm_config.compilation_config.mode == CompilationMode.NONE:
            log.warning("fxpasses: vLLM compilation is off (enforce_eager=True or compilation mode NONE): the "
                        "pass cannot run; start without enforce_eager to apply it")
    except Exception:  # pragma: no cover - older vLLM without CompilationMode
        pass


def register() -> None:
    """Entry point (`vllm.general_plugins`: `fxpasses = fxpasses.plugin:register`)."""
    global _installed
    if _installed or os.environ.get("FXPASSES_PLUGIN", "1") == "0":
        return
    from vllm.config import VllmConfig

    import fxpasses
    from fxpasses.vllm_pass import vllm_pass_instance

    fxpasses.vllm_pass_instance = vllm_pass_instance  # the string route's target (see vllm_pass)
    bridge_logging()

    original = VllmConfig.__post_init__
    if getattr(original, "_fxpasses_wrapped", False):
        _wrap_model_parallel_init()
        _installed = True
        return

    def __post_init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        configure_vllm_config(self)

    __post_init__._fxpasses_wrapped = True  # type: ignore[attr-defined]
    __post_init__.__wrapped__ = original  # type: ignore[attr-defined]
    VllmConfig.__post_init__ = __post_init__
    _wrap_model_parallel_init()
    _installed = True
    log.debug("fxpasses: vllm.general_plugins hook installed (pid %d)", os.getpid())
