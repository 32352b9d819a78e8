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
# The wheels are served to the build over the host's loopback rather than copied into the
# context: a COPY would keep their 3 GB as a layer of the image under the installed venv.
port=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
python3 -m http.server --bind 127.0.0.1 --directory "$context/wheels" "$port" >/dev/null 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; rm -rf "$context"' EXIT
for _ in $(seq 100); do  # until it answers
  python3 -c "import urllib.request as r; r.urlopen('http://127.0.0.1:$port/')" 2>/dev/null && break
  sleep 0.1
done
mkdir "$context/build"
cat > "$context/build/Dockerfile" <<'DOCKERFILE'
FROM zsharp-local/debian:bookworm
ARG WHEELS
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links "$WHEELS" $(python3 -c \
       "import re, sys, urllib.request as r; print(' '.join(sys.argv[1] + '/' + n for n in re.findall(r'href=\"([^\"]+[.]whl)\"', r.urlopen(sys.argv[1]).read().decode())))" \
       "$WHEELS")
ENV PATH=/opt/venv/bin:$PATH
DOCKERFILE
log "building $TAG ($(du -sh "$context/wheels" | cut -f1) of wheels)"
docker build --quiet --network host --build-arg "WHEELS=http://127.0.0.1:$port" -t "$TAG" \
  "$context/build" >/dev/null
log "$TAG ready in $(( $(date +%s) - T0 )) s ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.1f GB", $1/1e9}'))"
