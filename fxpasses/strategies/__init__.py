"""One module per strategy. Each exposes `rewrite(rw, plans, ctx)`: it rewrites the sites it owns
with the LayoutRewriter's primitives, marks each SitePlan rewritten or skipped (with the reason),
and leaves propagation and verification to the pipeline."""
