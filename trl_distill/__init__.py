"""trl-distill: knowledge- and preference-distillation trainers for Hugging Face TRL.

Each trainer subclasses a TRL trainer and each config a TRL config, so a TRL script switches by changing one class.
"""

import logging
from importlib import metadata

# bitsandbytes (imported by peft) logs a failed optional-kernel download on CPUs without the `kernels` package;
# it falls back to its own code, so the message only alarms users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from . import losses  # noqa: E402

try:
    __version__ = metadata.version("trl-distill")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

# The trainers are imported on first use: `import trl_distill` (and so the `trl-distill` command, the task modules and
# every subprocess that needs only those) stays quick, and GKDVariant's `trl.experimental.gkd`, whose import warns
# that experimental APIs may change, is never imported for users of the other trainers.
_LAZY = {
    "ADPOConfig": ".trainers.adpo",
    "ADPOTrainer": ".trainers.adpo",
    "DistillDPOConfig": ".trainers.distill_dpo",
    "DistillDPOTrainer": ".trainers.distill_dpo",
    "GKDVariant": ".trainers.gkd",
    "GKDVariantConfig": ".trainers.gkd",
    "OKDConfig": ".trainers.okd",
    "OKDTrainer": ".trainers.okd",
    "REDIConfig": ".trainers.redi",
    "REDITrainer": ".trainers.redi",
}


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
