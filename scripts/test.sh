#!/usr/bin/env bash
# Set up (see env.sh) and run the test suite; extra arguments go to pytest.
source "$(dirname "$0")/env.sh"
exec python -m pytest -q --durations=15 "$@"
