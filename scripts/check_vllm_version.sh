#!/usr/bin/env bash
# Import-level check of bebop-vllm against one vLLM release, in a throwaway virtual environment:
# installs vllm==VERSION (no GPU needed; heavy: several GB), imports vLLM, verifies every patch
# target's signature and every recorded source fingerprint (bebop_vllm.plugin.verify), then
# register() must apply every patch this host needs. Engines are not started.
#
#   scripts/check_vllm_version.sh [VERSION] [VENV]      # defaults: 0.33.0 /tmp/bebop-vllm-VERSION
set -euo pipefail
VERSION="${1:-0.33.0}"
VENV="${2:-/tmp/bebop-vllm-$VERSION}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "vllm==$VERSION"
"$VENV/bin/pip" install -q --no-deps -e "$REPO"
cd /tmp  # import the installed package, not a checkout on sys.path
"$VENV/bin/python" - "$VERSION" <<'PY'
import sys

import vllm

import bebop_vllm.plugin as plugin
from bebop_vllm.plugin.patches import PATCHES

version = sys.argv[1]
assert vllm.__version__.split("+")[0] == version, (vllm.__version__, version)
plugin.verify()  # raises, naming every mismatching function, if anything differs
plugin.register()
assert plugin.disabled_reason is None, plugin.disabled_reason
missing = [p.name for p in PATCHES if p.needed() and not p.applied]
assert not missing, missing
from bebop_vllm.serve import import_cli_env_setup

import_cli_env_setup()
print(f"vLLM {vllm.__version__}: all {len(PATCHES)} patches checked, "
      f"{sum(p.applied for p in PATCHES)} applied, every fingerprint matches")
PY
