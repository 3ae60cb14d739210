"""Re-export of `fxpasses.commands.tiny_checkpoints` (the tiny random-weight HF checkpoint maker moved into
the core, since `fxpasses check --arch` uses it); kept so existing imports keep working."""
from fxpasses.commands.tiny_checkpoints import (  # noqa: F401
    CONFIG_CLASSES,
    DEFAULT_SHAPE,
    FAMILY_SHAPE,
    TRANSFORMERS_BACKEND,
    config_kwargs,
    known_archs,
    make_tiny_model,
)
