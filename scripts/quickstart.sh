#!/usr/bin/env bash
# Set up (see env.sh), then distill a tiny teacher into a student on the shipped addition task.
source "$(dirname "$0")/env.sh"
exec python examples/quickstart.py "$@"
