#!/usr/bin/env bash
# A local stand-in for the CUDA PyTorch base image, for machines that reach PyPI/apt but no
# container registry: zsharp-local/debian:bookworm (make-base.sh) + a venv holding PyTorch
# and the project's dependencies, installed offline from a wheelhouse that this host's pip
# assembles (from its own indexes and local wheel files).
#
#   .ci/docker/make-torch-base.sh [TAG]     # default TAG: zsharp-local/torch:latest
#   docker build --build-arg BASE_IMAGE=zsharp-local/torch:latest -t zsharp .
#
# Knobs: TORCH=2.14.1 TORCHVISION=0.29.1 FORCE=1 (rebuild)
set -euo pipefail
cd "$(dirname "$0")/../.."

TAG=${1:-zsharp-local/torch:latest}
TORCH=${TORCH:-2.14.1}
TORCHVISION=${TORCHVISION:-0.29.1}
PIP=${PIP:-pip}
log() { printf '[torch-base] %s\n' "$*" >&2; }
T0=$(date +%s)

if [[ -z ${FORCE:-} ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
  log "$TAG already exists (FORCE=1 rebuilds)"; exit 0
fi
bash .ci/docker/make-base.sh zsharp-local/debian:bookworm

context=$(mktemp -d /var/tmp/zsharp-torch-base.XXXXXX)
trap 'rm -rf "$context"' EXIT
log "collecting wheels: torch==$TORCH torchvision==$TORCHVISION and the project's dependencies"
"$PIP" download --quiet --dest "$context/wheels" "torch==$TORCH" "torchvision==$TORCHVISION" \
  -r <(python3 - <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = project["dependencies"] + project["optional-dependencies"]["workflow"]
print("\n".join(d for d in deps if not d.startswith(("torch", "torchvision"))))
PY
)
cat > "$context/Dockerfile" <<'DOCKERFILE'
FROM zsharp-local/debian:bookworm
COPY wheels /tmp/wheels
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels
ENV PATH=/opt/venv/bin:$PATH
DOCKERFILE
log "building $TAG ($(du -sh "$context/wheels" | cut -f1) of wheels)"
docker build --quiet -t "$TAG" "$context" >/dev/null
log "$TAG ready in $(( $(date +%s) - T0 )) s ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.1f GB", $1/1e9}'))"
