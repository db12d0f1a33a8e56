#!/usr/bin/env bash
# The packages the GPU machine's image lacks (it has torch, triton, transformers, numpy, tokenizers, safetensors,
# jinja2, tqdm; no package index), downloaded as cp312 x86-64 wheels at the versions this checkout's .venv holds,
# into .whl-serve/ (git-ignored through .git/info/exclude). On the device, first:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl-serve/*.whl && export PYTHONPATH=/tmp/site:.
# and name ".whl-serve" in the call's carry. Usage (repository root, after `make setup`): bash benchmarks/gpu/fetch_wheels.sh
set -euo pipefail
DIR=${1:-.whl-serve}
PACKAGES="fastapi starlette uvicorn pydantic pydantic_core annotated-types annotated-doc typing-inspection
typing_extensions gguf llguidance prometheus_client h11 click anyio sniffio idna opentelemetry-api
importlib-metadata zipp aiohttp aiohappyeyeballs aiosignal attrs frozenlist multidict propcache yarl httpx httpcore
certifi"
[[ $DIR == /* ]] || grep -qx "/$DIR/" .git/info/exclude 2>/dev/null || echo "/$DIR/" >> .git/info/exclude
PINS=$(.venv/bin/python - $PACKAGES <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(name)  # not in .venv: the newest that fits
PY
)
mkdir -p "$DIR"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DIR" $PINS
ls "$DIR" | wc -l
