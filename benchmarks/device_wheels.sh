#!/usr/bin/env bash
# Wheels a leased GPU machine lacks for `benchmarks/gpu_checks.sh` (its image has torch, torchvision, transformers,
# pyarrow and numpy for Python 3.12, but not Beam and its pure dependencies, nvImageCodec or cryptography), fetched here
# for that machine's Python and platform, within the versions Beam 2.77 asks for, so they can travel with the
# working tree (~62 MiB of the 64 MiB a call may carry; pymongo, which Beam imports only if present, left out).
#
#   benchmarks/device_wheels.sh [DIR] [PYTHON_VERSION]     defaults: .whl 3.12
#
# There: pip install --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
dir=${1:-.whl}
python_version=${2:-3.12}
mkdir -p "$dir"
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$dir" \
  --python-version "$python_version" --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  apache-beam==2.77.0 'fastavro<2' 'zstandard<1' 'beartype>=0.21,<0.23' pytz 'httplib2<1' 'jsonpickle<5' \
  'objsize>=0.6.1,<0.8' 'proto-plus<2' 'fasteners<1' 'cryptography<51' cffi \
  'nvidia-nvimgcodec-cu13==0.9.*' nvidia-nvjpeg
du -sh "$dir"
