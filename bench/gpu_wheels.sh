#!/usr/bin/env bash
# Wheels of the notebook packages the steering tests use that the lent GPU machine's image lacks
# (plotly, IPython, ipywidgets, anywidget and what they need; it has torch, transformers, numpy,
# pandas, pytest), for Python 3.12 on x86-64, into .whl (kept out of git). Run here, then call
# the device with carry=[".whl"]; bench/gpu_check.sh installs them there.
#
#   bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  plotly narwhals ipython ipywidgets anywidget traitlets jedi parso decorator \
  ipython-pygments-lexers matplotlib-inline pexpect ptyprocess prompt_toolkit wcwidth \
  stack_data executing asttokens pure_eval comm widgetsnbextension jupyterlab_widgets psygnal
du -sh .whl
