"""One module per strategy, each defining `STRATEGY`, an instance of `interface.Strategy` registered in
`registry`: it rewrites the sites it owns with the LayoutRewriter's public primitives, marks
each SitePlan rewritten or skipped (with the reason), and leaves propagation and verification to
the pipeline. `dp_common` and `mlp_activation` are helpers of the DP-attention strategies."""
