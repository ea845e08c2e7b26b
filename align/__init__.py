"""align: text, image and audio encoders aligned in one embedding space."""
from align.config import Config, ConfigError, load_config
from align.loading import load_model
from align.model import AlignModel, build_model

__all__ = ["AlignModel", "Config", "ConfigError", "build_model", "load_config", "load_model"]
__version__ = "0.1.0"
