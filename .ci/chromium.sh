#!/usr/bin/env bash
# Headless Chromium from Debian's packages, for tests/test_readme_commands.py, which opens the
# Snakemake report in a real browser (without Chromium that test skips and says why).
# Root and apt-get needed; about 50 s on the CI machine.
#
#   bash .ci/chromium.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v chromium >/dev/null; then exit 0; fi
# fonts-dejavu-core: glyphs for the page's text (the base image may have no fonts)
bash .ci/apt-install.sh chromium fonts-dejavu-core
# (Debian's launcher script prints a harmless shell warning on stderr)
chromium --version 2>/dev/null
