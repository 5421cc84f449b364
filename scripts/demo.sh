#!/usr/bin/env bash
# Sets everything up and runs the main job: a simulated fleet training a real model
# over an embedded broker. Extra arguments go to `fleetlearn simulate`.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec fleetlearn simulate "$@"
