#!/usr/bin/env bash
# Creates .venv/ at the repository root with the whole OpenMMLab stack that mmpvt runs on.
#
# Idempotent: a second run checks each step and changes nothing. The only slow step is
# compiling mmcv 2.1.0's ops (about 10 minutes on 2 cores); the wheel is cached outside the
# repository, keyed by the mmcv, torch and Python versions, so later setups take seconds.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
MMCV_VERSION=2.1.0
CACHE=${MMPVT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mmpvt}

step() { printf '\n==> [setup] %s\n' "$*"; }
fail() { printf '\n!!! [setup] failed at step: %s\n' "$CURRENT" >&2; exit 1; }
trap fail ERR

CURRENT="create the virtual environment $VENV"
if [ ! -x "$VENV/bin/python" ]; then
  step "$CURRENT"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

CURRENT="torch $TORCH_VERSION + torchvision $TORCHVISION_VERSION"
if ! "$PY" -c "import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith('$TORCH_VERSION') and torchvision.__version__.startswith('$TORCHVISION_VERSION')))" 2>/dev/null; then
  step "$CURRENT (about 1 minute)"
  "${PIP[@]}" install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

PYTAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
WHEELS="$CACHE/wheels/mmcv-$MMCV_VERSION-torch$TORCH_VERSION-$PYTAG"
CURRENT="mmcv $MMCV_VERSION with compiled ops"
if ! "$PY" -c "import mmcv, sys; from mmcv.ops import nms, RoIAlign; sys.exit(mmcv.__version__ != '$MMCV_VERSION')" 2>/dev/null; then
  if ! ls "$WHEELS"/mmcv-*.whl >/dev/null 2>&1; then
    step "$CURRENT: compiling from the PyPI source distribution into $WHEELS (about 10 minutes on 2 cores; later setups reuse the wheel)"
    BUILD=$(mktemp -d)
    # mmcv 2.1.0's setup.py needs setuptools < 70 to build; torch wants >= 77.0.3, so
    # requirements.txt puts a newer one back afterwards.
    "${PIP[@]}" install -q 'setuptools>=60,<70' wheel ninja
    "${PIP[@]}" download -q --no-deps --no-binary :all: "mmcv==$MMCV_VERSION" -d "$BUILD"
    tar -xzf "$BUILD"/mmcv-"$MMCV_VERSION".tar.gz -C "$BUILD"
    # torch >= 2.10 headers require C++20; mmcv 2.1.0 asks for C++14/17.
    sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' "$BUILD/mmcv-$MMCV_VERSION/setup.py"
    mkdir -p "$WHEELS"
    (cd "$BUILD/mmcv-$MMCV_VERSION" && MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
      "${PIP[@]}" wheel --no-deps --no-build-isolation . -w "$WHEELS.partial")
    mv "$WHEELS.partial"/mmcv-*.whl "$WHEELS"/ && rm -rf "$WHEELS.partial" "$BUILD"
  fi
  step "$CURRENT: installing the cached wheel"
  "${PIP[@]}" install -q --no-deps "$WHEELS"/mmcv-*.whl
fi

CURRENT="the OpenMMLab stack, timm and the test tools"
if ! "$PY" -c "
import importlib.metadata as m, sys
want = {'mmengine': '0.10.7', 'mmdet': '3.3.0', 'mmsegmentation': '1.2.2'}
sys.exit(any(m.version(k) != v for k, v in want.items())
         or not 77 <= int(m.version('setuptools').split('.')[0]) < 81)
import timm, ftfy, regex, pycocotools, pytest, xdist, matplotlib, pkg_resources" 2>/dev/null; then
  step "$CURRENT"
  "${PIP[@]}" install -q -r "$ROOT/requirements.txt"
fi

CURRENT="mmpvt in editable mode, with its compiled kernel"
# Checked from outside the repository: the working directory would shadow a missing install.
# The kernel (mmpvt/ops/csrc) is rebuilt when missing or older than its sources.
if ! (cd / && "$PY" -c '
import sys
from pathlib import Path
import mmpvt
from mmpvt.ops import dwconv_gelu
built = sorted(Path(dwconv_gelu.__file__).parent.glob("_dwconv_gelu*.so"))
sources = Path(sys.argv[1], "mmpvt", "ops", "csrc").iterdir()
sys.exit(not mmpvt.__file__.startswith(sys.argv[1]) or not dwconv_gelu.available()
         or max(p.stat().st_mtime for p in sources) > built[0].stat().st_mtime)' "$ROOT") 2>/dev/null; then
  step "$CURRENT"
  "${PIP[@]}" install -q --no-deps --no-build-isolation -e "$ROOT"
fi

CURRENT="final check"
cd / && "$PY" -c "
import torch, mmcv, mmengine, mmdet, mmseg, timm, mmpvt
from mmcv.ops import nms, RoIAlign
print(f'[setup] ready: torch {torch.__version__}, mmcv {mmcv.__version__}, mmengine {mmengine.__version__}, '
      f'mmdet {mmdet.__version__}, mmseg {mmseg.__version__}, timm {timm.__version__}, mmpvt {mmpvt.__version__}')"
