"""trl-distill: knowledge- and preference-distillation trainers for Hugging Face TRL.

Each trainer subclasses a TRL trainer and each config a TRL config, so a TRL script switches by changing one class.
"""

from . import losses
from .trainers.gkd import GKDVariant, GKDVariantConfig

__version__ = "0.1.0.dev0"

__all__ = ["GKDVariant", "GKDVariantConfig", "losses", "__version__"]
