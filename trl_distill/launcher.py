"""`trl-distill <command> ... --num_processes N --accelerate_config zero2`: `trl`'s launch convention.

As TRL's `trl <command>` does, the arguments that are neither the trainer's fields nor TRL's script, dataset-mixture
or model arguments (flags and YAML keys alike) are `accelerate launch` options: `--accelerate_config` (a file, or one
of TRL's shipped configs such as `zero2`, `fsdp2`, `multi_gpu`) is resolved by TRL's
`resolve_accelerate_config_argument`, and the command re-runs itself as `accelerate launch [options] -m
trl_distill.cli <command> [its own arguments]`. `accelerate launch` refuses an option it does not know, so a typo in a
key is an error, as with `trl`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from ._compat import option_strings

# Set in the processes `accelerate launch` starts for us, so that they train instead of launching again.
LAUNCHED_ENV = "TRL_DISTILL_LAUNCHED"


def already_launched() -> bool:
    """True inside a process started by `accelerate launch` (ours or the user's own) or torchrun."""
    return any(name in os.environ for name in (LAUNCHED_ENV, "ACCELERATE_MIXED_PRECISION", "LOCAL_RANK"))


def without_subsequence(items: Sequence[str], subsequence: Sequence[str]) -> list[str]:
    """`items` with the ordered `subsequence` taken out (the command line minus the launcher's options)."""
    remaining, wanted = [], iter(subsequence)
    current = next(wanted, None)
    for item in items:
        if current is not None and item == current:
            current = next(wanted, None)
        else:
            remaining.append(item)
    return remaining


def launch(
    command: str,
    launch_args: list[str],
    script_args: list[str],
    launch_command_fn: Callable | None = None,
    launch_parser_fn: Callable | None = None,
) -> None:
    """`accelerate launch <launch_args> -m trl_distill.cli <command> <script_args>`."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    launch_args = resolve_accelerate_config_argument(list(launch_args))
    parser = (launch_parser_fn or launch_command_parser)()
    known = option_strings(parser)
    unknown = [arg.split("=")[0] for arg in launch_args if arg.startswith("--") and arg.split("=")[0] not in known]
    if unknown:
        # accelerate would refuse them too (as with `trl`), with a message that does not say where they came from
        raise ValueError(
            f"trl-distill {command}: unknown argument(s) {', '.join(unknown)}: neither fields of the {command} "
            "config, ScriptArguments, DatasetMixtureConfig or ModelConfig (see `--help`), nor `accelerate launch` "
            "options."
        )
    accelerate_args = parser.parse_args([*launch_args, "--module", "trl_distill.cli", command, *script_args])
    os.environ[LAUNCHED_ENV] = "1"  # inherited by the launched processes
    (launch_command_fn or launch_command)(accelerate_args)


def launch_if_asked(parser, command: str, argv: list[str], **launch_kwargs) -> bool:
    """Launch through `accelerate launch` when `argv` (or its `--config` YAML) holds launcher options; return whether
    it did. Inside a launched process nothing is launched: the launcher's keys in the YAML are ignored there."""
    if already_launched():
        return False
    *_, config_remaining, cli_remaining = parser.parse_args_and_config(
        args=list(argv), return_remaining_strings=True, separate_remaining_strings=True
    )
    if not config_remaining and not cli_remaining:
        return False
    launch(command, config_remaining + cli_remaining, without_subsequence(argv, cli_remaining), **launch_kwargs)
    return True
