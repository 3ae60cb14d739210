"""The exceptions fxpasses raises; every message names the problem and the fix."""


class FxPassesError(Exception):
    """Base class of every fxpasses error."""


class ConfigError(FxPassesError, ValueError):
    """A configuration value (strategy, size, file) is invalid."""


class PatternError(FxPassesError, ValueError):
    """A pattern set file is malformed."""


class RewriteError(FxPassesError):
    """A site or graph could not be rewritten (raised only in strict mode)."""


class VerificationError(FxPassesError):
    """The rewritten graph failed verification; the original graph was kept."""


class WireBytesError(FxPassesError):
    """The rewritten graph would move more bytes per step than the original; the original was kept."""


class ModelledSlowerError(WireBytesError):
    """`min_tokens: auto`: the rewritten graph is modelled slower over the token range vLLM runs it
    at (`fxpasses.token_gate`); the original was kept. Decided from shapes every rank shares."""
