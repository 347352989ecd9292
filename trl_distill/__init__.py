"""trl-distill: knowledge- and preference-distillation trainers for Hugging Face TRL.

Each trainer subclasses a TRL trainer and each config a TRL config, so a TRL script switches by changing one class.
"""

import logging

# bitsandbytes (imported by peft) logs a failed optional-kernel download on CPUs without the `kernels` package;
# it falls back to its own code, so the message only alarms users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from . import losses  # noqa: E402
from .trainers.adpo import ADPOConfig, ADPOTrainer  # noqa: E402
from .trainers.distill_dpo import DistillDPOConfig, DistillDPOTrainer  # noqa: E402
from .trainers.gkd import GKDVariant, GKDVariantConfig  # noqa: E402
from .trainers.okd import OKDConfig, OKDTrainer  # noqa: E402
from .trainers.redi import REDIConfig, REDITrainer  # noqa: E402

__version__ = "0.1.0.dev0"

__all__ = [
    "ADPOConfig",
    "ADPOTrainer",
    "DistillDPOConfig",
    "DistillDPOTrainer",
    "GKDVariant",
    "GKDVariantConfig",
    "OKDConfig",
    "OKDTrainer",
    "REDIConfig",
    "REDITrainer",
    "losses",
    "__version__",
]
