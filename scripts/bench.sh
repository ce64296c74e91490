#!/bin/sh
# The p2ptun benchmark (release build; needs root for the NAT lab).
# Args: --json --quick --loopback --keep --scale N,N --only direct,scale,relay
exec cargo bench --manifest-path "$(dirname "$0")/../Cargo.toml" --bench tunnel -- "$@"
