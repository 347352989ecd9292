"""What the SFT-based trainers (GKDVariant, OKD) share about TRL's `SFTConfig`."""

from contextlib import contextmanager


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
