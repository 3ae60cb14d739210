"""A site's reason names what happened to an enabled strategy: left out of this graph by the
pipeline (with why), a prefix outside its pattern set, or a kind no enabled strategy rewrites;
never "no enabled strategy matches" while one is enabled (the W8A8 bfloat16 run said that when
FlashComm1 was dropped for its bytes and FlashComm2 went on alone)."""
from fxpasses.config import FxPassesConfig
from fxpasses.patterns_loader import load_patterns
from fxpasses.plan import plan_sites
from fxpasses.site_records import SiteStatus
from fxpasses.sites import Site

SITES = [Site("model.layers.0.self_attn.qkv_proj", "QKVParallelLinear", "column"),
         Site("model.layers.0.self_attn.o_proj", "RowParallelLinear", "row"),
         Site("model.layers.0.self_attn.fused_qkv_a_proj", "ReplicatedLinear", "replicated"),
         Site("model.layers.0.mlp.weird_proj", "RowParallelLinear", "row")]


def _reasons(config, left_out=None):
    plans = plan_sites(SITES, config, load_patterns(), left_out)
    return {p.site.prefix.rsplit(".", 1)[-1]: (p.strategy, p.status, p.reason) for p in plans}


def test_a_strategy_left_out_of_the_graph_is_named_with_why():
    r = _reasons(FxPassesConfig(strategies=("flashcomm2",)), {"flashcomm1": "the rewrite would send more bytes"})
    assert r["o_proj"][0] == "flashcomm2"
    strategy, status, reason = r["qkv_proj"]
    assert strategy is None and status is SiteStatus.UNTOUCHED
    assert reason == "flashcomm1 was left out of this graph: the rewrite would send more bytes"


def test_replicated_layers_and_foreign_prefixes_say_why_they_are_not_owned():
    r = _reasons(FxPassesConfig(strategies=("flashcomm1",)))
    assert r["fused_qkv_a_proj"][2] == ("no enabled strategy (flashcomm1) rewrites replicated sites (a replicated "
                                        "layer: no TP communication to rewrite)")
    assert r["weird_proj"][0] == "flashcomm1"  # FlashComm1's row patterns take every prefix ("*")
    r = _reasons(FxPassesConfig(strategies=("flashcomm2",)))
    assert r["weird_proj"][2].startswith("flashcomm2 owns row sites whose prefix contains one of ['o_proj'")
    assert r["qkv_proj"][2] == "no enabled strategy (flashcomm2) rewrites column sites"
    assert all("no enabled strategy matches" not in v[2] for v in r.values())
