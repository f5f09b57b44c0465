#!/usr/bin/env bash
# Installs the programs the test suite drives besides Python packages: openssl (s_client),
# curl, nc, nginx (a real backend), wrk (an HTTP load generator), pebble (a real ACME CA, with
# pebble-challtestsrv) and testssl (testssl.sh: scans the proxy's TLS termination).
# Uses Debian's packages; does nothing for tools already present. Services are not started:
# the tests run their own nginx and pebble.
set -euo pipefail

need=()
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v nc >/dev/null 2>&1 || need+=(netcat-openbsd)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
[ -x /usr/bin/pebble ] || need+=(pebble)
[ -x /usr/bin/testssl ] || need+=(testssl.sh)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  export DEBIAN_FRONTEND=noninteractive
  # Keep package scripts from starting services (nginx would take port 80).
  policy=/usr/sbin/policy-rc.d
  placed=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod +x "$policy"
    placed=1
  fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
  if [ -n "$placed" ]; then $SUDO rm -f "$policy"; fi
fi
