#!/usr/bin/env bash
# Installs the programs the test suite drives besides Python packages: openssl (s_client),
# curl, nc, nginx (a real backend), wrk (an HTTP load generator), pebble (a real ACME CA, with
# pebble-challtestsrv), testssl (testssl.sh: scans the proxy's TLS termination), and the
# clients and servers of the protocols one port tells apart (ssh, psql, redis-cli and
# redis-server, mosquitto_pub and the mosquitto broker), and chromium (loads the admin status
# page headless).
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
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || need+=(redis-server)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
[ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
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
