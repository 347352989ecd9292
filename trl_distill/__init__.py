"""trl-distill: knowledge- and preference-distillation trainers for Hugging Face TRL.

Each trainer subclasses a TRL trainer and each config a TRL config, so a TRL script switches by changing one class.
"""

import logging
from importlib import metadata

# bitsandbytes (imported by peft) logs a failed optional-kernel download on CPUs without the `kernels` package;
# it falls back to its own code, so the message only alarms users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from . import losses  # noqa: E402
from .trainers.adpo import ADPOConfig, ADPOTrainer  # noqa: E402
from .trainers.distill_dpo import DistillDPOConfig, DistillDPOTrainer  # noqa: E402
from .trainers.okd import OKDConfig, OKDTrainer  # noqa: E402
from .trainers.redi import REDIConfig, REDITrainer  # noqa: E402

try:
    __version__ = metadata.version("trl-distill")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

# GKDVariant extends `trl.experimental.gkd`, whose import warns that experimental APIs may change: imported on first
# use only, so users of the other trainers never see that warning.
_LAZY = {"GKDVariant": ".trainers.gkd", "GKDVariantConfig": ".trainers.gkd"}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])


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
