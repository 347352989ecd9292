"""What the SFT-based trainers (GKDVariant, OKD) share about TRL's `SFTConfig`."""

from contextlib import contextmanager

from .. import losses


def check_divergence_fields(args) -> None:
    """The divergence settings GKDVariantConfig and OKDConfig share, each error naming the config and the field."""
    name = type(args).__name__
    if args.loss_type not in losses.LOSS_TYPES:
        raise ValueError(f"{name}.loss_type={args.loss_type!r} is not one of {losses.LOSS_TYPES}.")
    if not 0.0 <= args.beta <= 1.0:
        raise ValueError(f"{name}.beta must be in [0, 1], got {args.beta}.")
    if not 0.0 <= args.skew_alpha < 1.0:
        raise ValueError(f"{name}.skew_alpha must be in [0, 1), got {args.skew_alpha}.")
    if not 0.0 < args.akl_mu <= 1.0:
        raise ValueError(f"{name}.akl_mu must be in (0, 1], got {args.akl_mu}.")
    if args.loss_temperature <= 0:
        raise ValueError(f"{name}.loss_temperature must be > 0, got {args.loss_temperature}.")


@contextmanager
def divergence_loss_type(args):
    """Let `SFTTrainer.__init__` see its own `loss_type` while `args.loss_type` names a divergence.

    Our configs reuse `loss_type` for the divergence; SFTTrainer validates it against its own values ("nll"/"dft")
    at init and never reads it again once `compute_loss` is overridden, so the divergence name is restored after.
    """
    divergence_name = args.loss_type
    args.loss_type = "nll"
    try:
        yield
    finally:
        args.loss_type = divergence_name
