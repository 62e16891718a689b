#!/usr/bin/env bash
# A Docker engine for Drip's Docker tests, started only when none answers.
#   scripts/docker_engine.sh start    install docker.io (apt) if missing; start dockerd if no
#                                     engine answers, and remember its pid
#   scripts/docker_engine.sh stop     stop the dockerd that 'start' started, and nothing else
# The pid file lives in $DRIP_DOCKERD_DIR (default /tmp/drip-dockerd); dockerd's log beside it.
set -euo pipefail

state=${DRIP_DOCKERD_DIR:-/tmp/drip-dockerd}
pidfile=$state/dockerd.pid

answers() { timeout 10 docker version >/dev/null 2>&1; }

case "${1:-}" in
start)
    if command -v docker >/dev/null && answers; then
        echo "[drip] a Docker engine answers already; using it" >&2
        exit 0
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "scripts/docker_engine.sh: no Docker engine answers, and starting one needs root" >&2
        exit 1
    fi
    if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
        echo "[drip] installing docker.io and debootstrap (apt)" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq docker.io debootstrap >/dev/null
    fi
    mkdir -p "$state"
    # setsid: dockerd must not get the terminal's Ctrl-C meant for the tests.
    setsid dockerd >"$state/dockerd.log" 2>&1 </dev/null &
    echo $! >"$pidfile"
    for _ in $(seq 60); do
        if answers; then
            echo "[drip] started dockerd (pid $(cat "$pidfile"), log $state/dockerd.log)" >&2
            exit 0
        fi
        if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            break
        fi
        sleep 1
    done
    tail -n 20 "$state/dockerd.log" >&2
    echo "scripts/docker_engine.sh: dockerd did not answer within 60 s (log: $state/dockerd.log)" >&2
    exit 1
    ;;
stop)
    [ -f "$pidfile" ] || exit 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 30); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 1
        done
        echo "[drip] stopped dockerd (pid $pid)" >&2
    fi
    rm -f "$pidfile"
    ;;
*)
    echo "usage: scripts/docker_engine.sh start|stop" >&2
    exit 2
    ;;
esac
