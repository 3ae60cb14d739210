"""Per-site back-off (`fxpasses.pipeline._back_off_costly_sites`): when the rewritten graph would send
more bytes in some layers, those layers' sites (the layer-spanning strategy's first) stay as they
were and the rest is rewritten again; every round is named in the sites' reasons, and the rewrite is
given up as a whole only when nothing would be left or the rounds are spent."""
from fxpasses.config import FxPassesConfig
from fxpasses.patterns_loader import load_patterns
from fxpasses.pipeline import BACK_OFF_ROUNDS, BackOff, _back_off_costly_sites
from fxpasses.plan import plan_sites
from fxpasses.site_records import SiteStatus
from fxpasses.report import PassReport
from fxpasses.sites import Site

SITES = [Site(f"model.layers.{i}.{name}", cls, kind) for i in range(3) for name, cls, kind in (
    ("self_attn.qkv_proj", "QKVParallelLinear", "column"), ("self_attn.o_proj", "RowParallelLinear", "row"),
    ("mlp.gate_up_proj", "MergedColumnParallelLinear", "column"), ("mlp.down_proj", "RowParallelLinear", "row"))]
CONFIG = FxPassesConfig(strategies=("flashcomm1", "flashcomm2"))


def _attempt(backed_off, grew):
    """One planning + 'rewrite' attempt as `_run_strategies` makes it: backed-off sites skipped with
    their reason, the others rewritten; `grew` the layers its bytes grew in."""
    plans = plan_sites(SITES, CONFIG, load_patterns())
    for p in plans:
        if p.site.prefix in backed_off:
            p.skip(backed_off[p.site.prefix])
        else:
            p.done("rewritten")
    rep = PassReport(0, 4, list(CONFIG.strategies), sites=plans)
    rep.extra["bytes_per_step"] = {"tokens": 16384, "grew": grew, "before": 1000.0,
                                   "after": 1000.0 + sum(b1 - b0 for b0, b1 in grew.values())}
    return rep, plans


def test_a_costly_layer_backs_off_its_flashcomm1_sites_first():
    rep, plans = _attempt({}, {"1": [100.0, 125.0]})
    calls = []

    def retry(backed):
        assert backed.rounds == 1
        calls.append(dict(backed.sites))
        return _attempt(backed.sites, {})[0]

    out = _back_off_costly_sites(rep, plans, CONFIG, BackOff(), retry)
    assert len(calls) == 1
    # layer 1's FlashComm1 sites (the layer-spanning strategy), not its FlashComm2 o_proj
    assert sorted(calls[0]) == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_up_proj",
                                "model.layers.1.self_attn.qkv_proj"]
    assert all("layer 1 100 -> 125" in why and "round 1" in why for why in calls[0].values())
    assert sorted(out.extra["backed_off"]) == sorted(calls[0])
    kept = {p.site.prefix: p.status for p in out.sites}
    assert kept["model.layers.1.self_attn.o_proj"] is SiteStatus.REWRITTEN
    assert kept["model.layers.0.mlp.down_proj"] is SiteStatus.REWRITTEN
    assert kept["model.layers.1.mlp.down_proj"] is SiteStatus.SKIPPED


def test_no_back_off_when_it_would_leave_nothing_or_the_rounds_are_spent():
    everywhere = {str(i): [1.0, 2.0] for i in range(3)}
    rep, plans = _attempt({}, everywhere)
    flashcomm1_only = FxPassesConfig(strategies=("flashcomm1",))
    plans1 = plan_sites(SITES, flashcomm1_only, load_patterns())
    assert _back_off_costly_sites(rep, plans1, flashcomm1_only, BackOff(), lambda b: 1 / 0) is None
    # the same reason may stand for several rounds: rounds are counted, not read off the reasons
    spent = BackOff({f"x{i}": "backed off" for i in range(2)}, rounds=BACK_OFF_ROUNDS)
    rep, plans = _attempt({}, {"1": [1.0, 2.0]})
    assert _back_off_costly_sites(rep, plans, CONFIG, spent, lambda b: 1 / 0) is None
    assert _back_off_costly_sites(rep, plans, CONFIG, BackOff(spent.sites, BACK_OFF_ROUNDS - 1),
                                  lambda b: _attempt(b.sites, {})[0]) is not None
    rep.extra["bytes_per_step"]["grew"] = {}
    assert _back_off_costly_sites(rep, plans, CONFIG, BackOff(), lambda b: 1 / 0) is None


def test_no_back_off_when_the_graph_as_a_whole_sends_no_more():
    """A layer may grow while the graph sends less in total (a piece's last layer gathers what the
    others saved): that graph is kept as it is, and a refusal for modelled time (min_tokens auto)
    never backs off sites either (the pipeline does not call back-off for it)."""
    rep, plans = _attempt({}, {"post": [0.0, 50.0]})
    rep.extra["bytes_per_step"]["after"] = 900.0
    assert _back_off_costly_sites(rep, plans, CONFIG, BackOff(), lambda b: 1 / 0) is None
