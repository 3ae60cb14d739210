"""Per-platform cost constants of the α-β time model (`fxpasses.token_gate`): for each collective
kind the fixed cost of one collective (launch + synchronisation, µs) and the bandwidth its bytes
move at (GB/s per rank, each direction), and the memory bandwidth token-wise ops (norms, residual
adds, activations) stream at. The config key `link_costs` overrides any of them.

`PLATFORMS` holds fixed constants per platform. In a vLLM worker, `fxpasses.link_calibration`
measures the live TP group at worker start and hands its constants to `set_calibrated`; `resolve`
then starts from those (same platform), unless the config says `"calibrate": false`. What the fixed
constants encode, per platform:

* `cpu` — vLLM's CPU engine: the model's all-reduce goes through vLLM's TP group (its shared-memory
  kernel where the build has it); the reduce-scatters and all-gathers a rewrite inserts run on the
  gloo group. Measured by `tools/bench_cpu_links.py` at TP=2 on a 2-core machine (median of 15):
  about 400 us per call for all-reduce and all-gather, 700 us for reduce-scatter, and 0.8 / 0.55 /
  0.42 GB/s of send bytes. A reduce-scatter + all-gather costs more than the all-reduce they replace
  at every size, so FlashComm1 never pays here.
* `cuda` — NVLink: vLLM's custom all-reduce (one kernel) and NCCL's ring collectives.
* `npu` — Ascend HCCS through HCCL. With these constants FlashComm1 pays on a bfloat16 model of
  hidden 4096 to 8192 from 800 to 1700 tokens (tp 4 to 8), the order of vllm-ascend's fixed
  `sp_min_token_num` (1000).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

from fxpasses.errors import ConfigError

KINDS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all")
_CALIBRATED: "LinkCosts | None" = None


@dataclass(frozen=True)
class Link:
    """One collective kind: `latency_us` per collective, `gbps` GB/s for its send bytes."""

    latency_us: float
    gbps: float

    def time_us(self, send_bytes: float) -> float:
        return self.latency_us + send_bytes / (self.gbps * 1e3)


@dataclass(frozen=True)
class LinkCosts:
    platform: str
    links: dict[str, Link]
    memory_gbps: float               # token-wise ops: bytes written (and read once) at this rate
    source: str = "platform defaults"

    def link(self, kind: str) -> Link:
        return self.links.get(kind) or self.links["all_gather"]

    def to_dict(self) -> dict[str, Any]:
        return {"platform": self.platform, "source": self.source, "memory_gbps": self.memory_gbps,
                "links": {k: asdict(v) for k, v in self.links.items()}}


def _same(latency_us: float, gbps: float, **other: Link) -> dict[str, Link]:
    base = {k: Link(latency_us, gbps) for k in KINDS}
    base.update(other)
    return base


PLATFORMS: dict[str, LinkCosts] = {
    # measured by tools/bench_cpu_links.py (TP=2 on a 2-core machine; all_to_all taken as reduce_scatter)
    "cpu": LinkCosts("cpu", _same(700.0, 0.42, all_reduce=Link(400.0, 0.8), all_gather=Link(400.0, 0.55)),
                     memory_gbps=10.0),
    "cuda": LinkCosts("cuda", _same(12.0, 150.0, all_reduce=Link(8.0, 150.0)), memory_gbps=2000.0),
    "npu": LinkCosts("npu", _same(25.0, 50.0), memory_gbps=1600.0),
}


def current_platform() -> str:
    """"npu", "cuda" or "cpu": vLLM's current platform where vLLM is loaded, else "cpu"."""
    try:
        from vllm.platforms import current_platform as p
    except Exception:  # no vLLM: a library user on the host
        return "cpu"
    dev = str(getattr(p, "device_type", "") or "")
    if dev == "npu":
        return "npu"
    if dev in ("cuda", "rocm") or getattr(p, "is_cuda_alike", lambda: False)():
        return "cuda"
    return "cpu"


def validate(spec: Mapping[str, Any]) -> None:
    """ConfigError naming the bad entry of a `link_costs` mapping (see `resolve`)."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"link_costs must be a mapping, got {spec!r}; write e.g. "
                          '{"platform": "cuda", "all_gather": {"latency_us": 10, "gbps": 100}}')
    for k, v in spec.items():
        if k == "calibrate":
            if not isinstance(v, bool):
                raise ConfigError(f"link_costs.calibrate must be true or false, got {v!r}")
        elif k == "platform":
            if v not in PLATFORMS:
                raise ConfigError(f"link_costs.platform must be one of {sorted(PLATFORMS)}, got {v!r}")
        elif k == "memory_gbps":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"link_costs.memory_gbps must be a positive number (GB/s), got {v!r}")
        elif k in KINDS:
            if not isinstance(v, Mapping) or set(v) - {"latency_us", "gbps"}:
                raise ConfigError(f"link_costs.{k} must be a mapping with latency_us and/or gbps, got {v!r}")
            for name, x in v.items():
                ok = isinstance(x, (int, float)) and not isinstance(x, bool) and (x > 0 if name == "gbps" else x >= 0)
                if not ok:
                    raise ConfigError(f"link_costs.{k}.{name} must be a {'positive' if name == 'gbps' else 'non-negative'}"
                                      f" number, got {x!r}")
        else:
            raise ConfigError(f"unknown link_costs key {k!r}; valid: platform, calibrate, memory_gbps, "
                              f"{', '.join(KINDS)}")


def set_calibrated(costs: "LinkCosts | None") -> None:
    """The constants measured on this process's live group (`fxpasses.link_calibration`); None drops them."""
    global _CALIBRATED
    _CALIBRATED = costs


def calibrated() -> "LinkCosts | None":
    return _CALIBRATED


def resolve(spec: Mapping[str, Any] | None = None, platform: str | None = None) -> LinkCosts:
    """The platform's constants (`spec["platform"]`, else `platform`, else `current_platform()`):
    the ones calibrated in this process for that platform where there are any and `spec` does not say
    `"calibrate": false`, else the fixed ones; the entries of `spec` over them."""
    spec = dict(spec or {})
    validate(spec)
    use_measured = spec.pop("calibrate", True)
    name = spec.pop("platform", None) or platform or current_platform()
    costs = PLATFORMS[name]
    if use_measured and _CALIBRATED is not None and _CALIBRATED.platform == name:
        costs = _CALIBRATED
    if not spec:
        return costs
    links = dict(costs.links)
    for k in KINDS:
        if k in spec:
            links[k] = replace(links[k], **{n: float(x) for n, x in spec[k].items()})
    return LinkCosts(name, links, float(spec.get("memory_gbps", costs.memory_gbps)),
                     source=f"{costs.source} + config link_costs")


def from_report(d: Mapping[str, Any]) -> LinkCosts:
    """The constants a site report or dump carries (`LinkCosts.to_dict`: `{"platform", "source",
    "memory_gbps", "links": {kind: {"latency_us", "gbps"}}}`), or a config `link_costs` mapping
    (fixed constants of its platform, entries over them): what a decision was taken with, for the
    advisor to rank with the same numbers. ConfigError names a bad entry."""
    if not isinstance(d, Mapping):
        return resolve(d)  # validate() names what is wrong with it
    if "links" not in d:  # a config mapping
        return resolve({**d, "calibrate": False})
    links = d["links"]
    if not isinstance(links, Mapping):
        raise ConfigError(f"link_costs 'links' is a {type(links).__name__}; a report carries "
                          '{"links": {"all_reduce": {"latency_us": ..., "gbps": ...}, ...}}')
    costs = resolve({"platform": d.get("platform", "cpu"), "memory_gbps": d.get("memory_gbps", 1.0), **links,
                     "calibrate": False})
    return replace(costs, source=str(d.get("source", costs.source)))


__all__ = ["KINDS", "Link", "LinkCosts", "PLATFORMS", "calibrated", "current_platform", "from_report", "resolve",
           "set_calibrated", "validate"]
