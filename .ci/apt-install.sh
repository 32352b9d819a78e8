#!/usr/bin/env bash
# Install Debian packages for CI without letting their maintainer scripts start services
# (no systemd here; the CI scripts start the daemons themselves).
#
#   bash .ci/apt-install.sh PACKAGE...
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
own_policy=0
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
  # policy-rc.d exit 101: the packages must not try to start their services
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  own_policy=1
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get install -y -qq --no-install-recommends "$@" >/dev/null
if (( own_policy )); then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
