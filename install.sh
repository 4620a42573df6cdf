#!/bin/sh
# Install ann2snn and its dependencies into the active Python environment, without the
# torchvision/torchaudio/CUDA packages that a plain `pip install spikingjelly` would pull in.
set -e
PY=${PYTHON:-python3}
# 1. torch: keep one that is already installed; otherwise 2.13.0 (a CPU build where the machine offers one).
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install "torch==2.13.0"
fi
# 2. spikingjelly without its declared extras (torchvision, torchaudio, tensorboard, scipy…):
#    the modules ann2snn imports need only torch, numpy, loguru and requests.
"$PY" -m pip install --no-deps "spikingjelly==2.0.0"
# 3. ann2snn itself (editable), with the test tools.
"$PY" -m pip install -e ".[test]"
