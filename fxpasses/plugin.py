"""The `vllm.general_plugins` entry point of fxpasses.

vLLM loads general plugins in every process it starts (the front end, the engine core, each
worker). `register()` is therefore cheap and inert: it imports nothing heavy, changes nothing in a
process where fxpasses is not configured, and may run any number of times.

What it does: it wraps `VllmConfig.__post_init__` so that, once vLLM has built its configuration,

* an fxpasses pass the user registered by hand (object or string route) is *bound* to that
  configuration (its `additional_config` travels with the pass into the worker processes) and its
  configuration is validated against the TP size, so mistakes fail at start-up;
* if the user configured fxpasses (`FXPASSES_CONFIG`, `additional_config["fxpasses"]`, or a
  vllm-ascend switch of `fxpasses.ascend_switches`: `finegrained_tp_config`'s o_proj / MLP sizes,
  or a removed one such as `VLLM_ASCEND_ENABLE_FLASHCOMM1=1`) and did
  not register the pass, the pass is added under the current platform's pass key (chained after
  any pass already there);
* with `min_tokens: auto` (the default), the token count from which the enabled layout is
  modelled to pay is added to `compilation_config.compile_ranges_endpoints`
  (`add_auto_compile_range`), so that VLLM_COMPILE compiles a range below it and one from it.

The key is `vllm.platforms.current_platform.pass_key` (default `"post_grad_custom_post_pass"`):

* `"post_grad_custom_post_pass"` (CUDA, CPU, ...): `compilation_config.inductor_compile_config`
  gets `fxpasses.vllm_pass.FxPassesInductorPass` (chained with `ChainedInductorPass`);
* any other key, in particular vllm-ascend's `"graph_fusion_manager"`: vLLM hands the entry under
  that key to the platform's own pass manager, and vllm-ascend's accepts only `VllmInductorPass`
  instances and runs without Inductor, so the entry is `fxpasses.ascend_pass.FxPassesAscendPass`
  (chained with `ChainedAscendPass`); a hand registration under that key is bound and validated the
  same way. An fxpasses pass left under the Inductor key on such a platform would never be called:
  the plugin says so and, when nothing of ours is under the platform's key, registers that same
  pass there. vllm-ascend's npugraph_ex compiler (its default for the FULL graph modes) never calls
  the manager either: the plugin warns when `ascend_compilation_config.enable_npugraph_ex` is on.

It also wraps vLLM's `initialize_model_parallel`, so that in every worker, right after vLLM has
created its own groups (worker start, before any graph is compiled or loaded from a cache), the
process groups the configured strategies need beyond TP are created
(`fxpasses.worker_groups.prepare_process_groups`): no group is ever created inside a compilation, and a
compiled graph from an earlier run finds the groups it names. Under `min_tokens: auto` the same hook
then measures the TP group's link costs (`fxpasses.link_calibration`, one agreeing all-reduce at the
end), unless the config fixes them. Importing fxpasses (which the entry
point does) registers the custom ops rewritten graphs call (`fxpasses.runtime_ops`).

`FXPASSES_CPU_PLAIN_WEIGHTS=1` (opt-in, `fxpasses.cpu_plain_weights`) makes vLLM's CPU engine keep
its unquantized linear weights plain, so its graphs look like the CUDA / NPU ones.

`FXPASSES_PLUGIN=0` turns the plugin off entirely.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Mapping

from fxpasses.logs import bridge_logging

log = logging.getLogger("fxpasses")

PASS_KEY = "post_grad_custom_post_pass"   # Inductor's post-grad custom pass (vLLM's default pass_key)
ASCEND_PASS_KEY = "graph_fusion_manager"  # vllm-ascend's platform pass_key (fxpasses.ascend_pass)
_installed = False


def platform_pass_key() -> str:
    """The current vLLM platform's pass key (`current_platform.pass_key`), `PASS_KEY` if it has none."""
    try:
        from vllm import platforms
        key = getattr(platforms.current_platform, "pass_key", None)
    except Exception:  # no resolvable platform (a tool outside vLLM): Inductor's key
        return PASS_KEY
    return key if isinstance(key, str) and key else PASS_KEY


def _config_requested(additional_config: Mapping[str, Any] | None, env: Mapping[str, str]) -> bool:
    """Did the user ask for fxpasses in any way (without resolving the configuration yet)?"""
    if env.get("FXPASSES_CONFIG"):
        return True
    if "fxpasses" in (additional_config or {}):
        return True
    from fxpasses import ascend_switches
    return ascend_switches.requested(env, additional_config)


def _fxpasses_passes(obj) -> list:
    """The fxpasses passes in a pass-key entry (the entry itself, or the members of a chain)."""
    if obj is None:
        return []
    from fxpasses.vllm_pass import ChainedInductorPass, FxPassesInductorPass
    if isinstance(obj, FxPassesInductorPass):
        return [obj]
    if isinstance(obj, ChainedInductorPass):
        return [p for p in obj.passes if isinstance(p, FxPassesInductorPass)]
    if "fxpasses.ascend_pass" not in sys.modules:  # none of its passes can exist; keep register() light
        return []
    from fxpasses.ascend_pass import ChainedAscendPass, FxPassesAscendPass
    if isinstance(obj, FxPassesAscendPass):
        return [obj]
    if isinstance(obj, ChainedAscendPass):
        return [p for p in obj.passes if isinstance(p, (FxPassesAscendPass, FxPassesInductorPass))]
    return []


def _new_pass(key: str, vllm_config, inner=None):
    """A pass of the form the platform's pass manager takes (see the module docstring)."""
    if key == PASS_KEY:
        from fxpasses.vllm_pass import FxPassesInductorPass
        return inner if inner is not None else FxPassesInductorPass().bind(vllm_config)
    from fxpasses.ascend_pass import FxPassesAscendPass
    if isinstance(inner, FxPassesAscendPass):
        return inner
    p = FxPassesAscendPass(vllm_config, inner=inner)
    return p if inner is not None else p.bind(vllm_config)


def _install(icc: dict, key: str, p, vllm_config) -> None:
    """icc[key] = p, run after the entry already there if any."""
    existing = icc.get(key)
    if existing is None:
        icc[key] = p
        return
    log.info("fxpasses: another %s is set (%r); fxpasses runs after it", key, existing)
    if key == PASS_KEY:
        from fxpasses.vllm_pass import ChainedInductorPass
        icc[key] = ChainedInductorPass([existing, p])
    else:
        from fxpasses.ascend_pass import ChainedAscendPass
        icc[key] = ChainedAscendPass([existing, p], vllm_config)


def _sizes(vllm_config) -> tuple[int, int]:
    pc = vllm_config.parallel_config
    tp = int(getattr(pc, "tensor_parallel_size", 1) or 1)
    world = int(getattr(pc, "world_size_across_dp", None) or getattr(pc, "world_size", tp) or tp)
    return tp, world


def configure_vllm_config(vllm_config, env: Mapping[str, str] | None = None) -> Any:
    """Bind / validate / add the fxpasses pass on a built VllmConfig, under the current platform's
    pass key (`platform_pass_key()`). Returns the pass or None.

    Raises `fxpasses.errors.ConfigError` (message names the fix) for an invalid configuration.
    """
    env = os.environ if env is None else env
    bridge_logging()
    if getattr(vllm_config, "model_config", None) is None:
        return None  # a default VllmConfig() (tests, tools): no model, nothing to compile
    cc = vllm_config.compilation_config
    icc = cc.inductor_compile_config
    key = platform_pass_key()
    ours = _fxpasses_passes(icc.get(key))
    # on a platform with its own pass manager (vllm-ascend) Inductor's hook is never called
    stray = _fxpasses_passes(icc.get(PASS_KEY)) if key != PASS_KEY else []
    ac = vllm_config.additional_config if isinstance(vllm_config.additional_config, Mapping) else {}
    if not ours and not stray and not _config_requested(ac, env):
        return None  # not configured: leave vLLM exactly as it is

    tp, world = _sizes(vllm_config)
    adopted = None
    if stray:
        if ours:
            log.warning("fxpasses: the pass under inductor_compile_config[%r] is never called on this platform "
                        "(its pass key is %r); the one under %r runs", PASS_KEY, key, key)
        else:
            log.warning("fxpasses: the pass under inductor_compile_config[%r] would never be called on this "
                        "platform (its pass key is %r, no Inductor post-grad passes run); registering it as "
                        "inductor_compile_config[%r] instead (register it there yourself to silence this)",
                        PASS_KEY, key, key)
            adopted = _new_pass(key, vllm_config, inner=stray[0])
            ours = [adopted]
    if ours:
        for p in ours:
            p.bind(vllm_config)
            cfg = p.resolve_config(env)
            if cfg.strategies:
                cfg.validate_for(tp, world)
        if adopted is not None:
            _install(icc, key, adopted, vllm_config)
        log.info("fxpasses: registered pass under %r bound to the vLLM config (tp=%d): %s", key, tp,
                 ours[0].resolve_config(env).key())
        _after_registering(vllm_config, ours[0].resolve_config(env), key)
        return ours[0]

    p = _new_pass(key, vllm_config)
    cfg = p.resolve_config(env)
    if not cfg.strategies:
        log.info("fxpasses: configured without any strategy; pass not registered")
        return None
    cfg.validate_for(tp, world)
    _install(icc, key, p, vllm_config)
    log.info("fxpasses: plugin registered the pass (%s) as inductor_compile_config[%r] (tp=%d, world=%d): %s",
             type(p).__name__, key, tp, world, cfg.key())
    _after_registering(vllm_config, cfg, key)
    return p


def _after_registering(vllm_config, cfg, key: str) -> None:
    """What start-up says and sets once the pass is registered: warnings for a model that will not be
    compiled or is compiled in pieces, and `min_tokens: auto`'s compile range."""
    _warn_if_not_compiled(vllm_config)
    _warn_if_pieces(vllm_config, cfg, key)
    add_auto_compile_range(vllm_config, cfg)


def add_auto_compile_range(vllm_config, cfg) -> int | None:
    """`min_tokens: auto`: add the token count from which the enabled layout is modelled to pay
    (`fxpasses.token_gate.model_min_tokens`) to vLLM's `compile_ranges_endpoints`, as vLLM does for
    its allreduce-rms fusion, so that VLLM_COMPILE compiles a range below it and one from it (the
    pass then decides each range from its graph). Returns the endpoint added (N - 1: vLLM's ranges
    are [1, e1], [e1 + 1, e2], ...) or None."""
    from fxpasses import link_costs, token_gate

    if cfg.min_tokens != "auto" or not cfg.strategies:
        return None
    cc = getattr(vllm_config, "compilation_config", None)
    top = getattr(getattr(vllm_config, "scheduler_config", None), "max_num_batched_tokens", None)
    hf = getattr(getattr(vllm_config, "model_config", None), "hf_config", None)
    dtype = getattr(getattr(vllm_config, "model_config", None), "dtype", None)
    if cc is None or not top or not hasattr(hf, "to_dict") or not hasattr(dtype, "itemsize"):
        return None  # no model or scheduler (a tool's partial config): nothing to size a range by
    tp, _ = _sizes(vllm_config)
    n, why = token_gate.model_min_tokens(cfg.strategies, hf.to_dict(), tp=tp, dtype_bytes=dtype.itemsize,
                                         max_tokens=int(top), costs=link_costs.resolve(cfg.link_costs),
                                         k=cfg.flashcomm2_oproj_tp_size)
    if n is None or n <= 1:
        log.info("fxpasses: min_tokens=auto: %s; no compile range added", why)
        return None
    end = n - 1
    cc.compile_ranges_endpoints = sorted(set(cc.compile_ranges_endpoints or []) | {end})
    log.info("fxpasses: min_tokens=auto: %s; compile range endpoint %d added (ranges %s)", why, end,
             [str(r) for r in cc.get_compile_ranges()])
    return end


def configs_of(vllm_config, env: Mapping[str, str] | None = None) -> list:
    """The fxpasses configurations a VllmConfig carries (registered passes under the platform's key or
    Inductor's, or the config sources)."""
    from fxpasses.config import load_config

    env = os.environ if env is None else env
    cc = getattr(vllm_config, "compilation_config", None)
    icc = getattr(cc, "inductor_compile_config", None) or {}
    ours = [p for k in dict.fromkeys((platform_pass_key(), PASS_KEY)) for p in _fxpasses_passes(icc.get(k))]
    if ours:
        cfgs = {}
        for p in ours:
            cfg = p.resolve_config(env)
            cfgs.setdefault(cfg.key(), cfg)
        return list(cfgs.values())
    ac = vllm_config.additional_config if isinstance(vllm_config.additional_config, Mapping) else {}
    return [load_config(ac, env)] if _config_requested(ac, env) else []


def prepare_groups_at_worker_start(vllm_config=None, env: Mapping[str, str] | None = None) -> list:
    """Create the process groups every configured strategy needs, on this worker, now (outside any
    compilation). Returns the configurations acted on."""
    from fxpasses.context import TPContext
    from fxpasses.worker_groups import prepare_process_groups

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
    if any(_calibrates(cfg) for cfg in done):
        calibrate_links_at_worker_start()
    return done


def _calibrates(cfg) -> bool:
    """`min_tokens: auto` weighs time with link costs, and the config does not fix them."""
    return (cfg.min_tokens == "auto" and cfg.family().bounded_by_original_bytes
            and (cfg.link_costs or {}).get("calibrate", True))


def calibrate_links_at_worker_start() -> None:
    """Measure the TP group's α-β constants now, on every rank (`fxpasses.link_calibration`), so the
    `auto` decisions of every later compilation use this machine's numbers."""
    from vllm.distributed.parallel_state import get_tp_group

    from fxpasses import link_calibration, link_costs

    group = get_tp_group()
    if group.world_size < 2:
        return
    link_calibration.calibrate(group, link_costs.current_platform())


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
    if platform_pass_key() == ASCEND_PASS_KEY:
        _warn_if_npugraph_ex(vllm_config)
    try:
        from vllm.config import CompilationMode
        if vllm_config.compilation_config.mode == CompilationMode.NONE:
            log.warning("fxpasses: vLLM compilation is off (enforce_eager=True or compilation mode NONE): the "
                        "pass cannot run; start without enforce_eager to apply it")
    except Exception:  # pragma: no cover - older vLLM without CompilationMode
        pass


def _warn_if_pieces(vllm_config, cfg, key: str) -> None:
    """A layer-spanning strategy (FlashComm1) under vLLM's FX split: say at start-up whether the piece
    boundaries will carry sharded token tensors (it applies at every token count) or stay replicated
    (then it is kept only per piece; the warning names the settings that span the layers)."""
    from fxpasses import piece_boundaries
    from fxpasses.graph_mode import graph_mode_of
    from fxpasses.strategies import registry as strategy_registry

    mode = graph_mode_of(vllm_config, key)
    spanning = [n for n in cfg.strategies if strategy_registry.get(n).spans_layers]
    if not (mode.is_piece and spanning):
        return
    if piece_boundaries.forced_everywhere(cfg):
        log.info("fxpasses: %s; %s applies at every token count (min_tokens=%s), so the token tensors crossing "
                 "each piece boundary are sharded over the TP group (fxpasses.piece_boundaries)", mode.why,
                 "+".join(spanning), cfg.min_tokens or 0)
        return
    log.warning("fxpasses: %s; with min_tokens=%s %s keeps token tensors replicated at every piece boundary "
                "(sharded boundaries would force it on decode sizes too: fxpasses.piece_boundaries) and is "
                "applied only to pieces where that moves no more bytes than the all-reduces it replaces. For "
                "sequence parallelism across layers set min_tokens to 0, or %s", mode.why, cfg.min_tokens,
                "+".join(spanning), mode.whole_graph_setting)


def _warn_if_npugraph_ex(vllm_config) -> None:
    """vllm-ascend compiles with npugraph_ex unless it turned it off (it does for its piecewise graph
    modes and for cudagraph mode NONE; `ascend_compilation_config.enable_npugraph_ex`, default
    true), and that compiler never calls the graph-fusion pass manager: the pass would not run."""
    ac = vllm_config.additional_config if isinstance(vllm_config.additional_config, Mapping) else {}
    acc = ac.get("ascend_compilation_config")
    acc = acc if isinstance(acc, Mapping) else {}
    if acc.get("enable_npugraph_ex", True):
        log.warning("fxpasses: vllm-ascend compiles this configuration with npugraph_ex "
                    "(ascend_compilation_config.enable_npugraph_ex), which never calls the graph fusion pass "
                    "manager, so the pass will not run; use a piecewise graph mode or "
                    "additional_config={\"ascend_compilation_config\": {\"enable_npugraph_ex\": false}}")


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
    from fxpasses import cpu_plain_weights, split_seam
    split_seam.install()  # FlashComm1 across vLLM's piece boundaries (a no-op unless it applies)
    if cpu_plain_weights.requested():  # opt-in: CPU graphs with visible weights, as on CUDA / NPU
        cpu_plain_weights.install()

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
