#!/usr/bin/env bash
# Installs the programs bench/run.py drives: haproxy (the proxy smartroute is compared with),
# nginx-light (the HTTP/TLS backend), wrk (the HTTP load generator) and iperf3 (bulk TCP).
# Uses Debian's packages; does nothing for tools already present. Services are not started:
# the benchmark runs its own nginx, haproxy and iperf3 with temporary configs.
set -euo pipefail

need=()
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v iperf3 >/dev/null 2>&1 || need+=(iperf3)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  export DEBIAN_FRONTEND=noninteractive
  # Keep package scripts from starting services (haproxy and nginx would take ports 80/443,
  # iperf3 would ask whether to run a daemon).
  policy=/usr/sbin/policy-rc.d
  placed=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod +x "$policy"
    placed=1
  fi
  # iperf3's package asks (debconf) whether to start a daemon: answer no.
  echo 'iperf3 iperf3/start_daemon boolean false' | $SUDO debconf-set-selections 2>/dev/null || true
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
  if [ -n "$placed" ]; then $SUDO rm -f "$policy"; fi
fi
