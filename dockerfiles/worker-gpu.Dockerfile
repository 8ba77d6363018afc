# Dataflow GPU worker: the Beam SDK container, CUDA PyTorch, GPU image decoding, and lookalike.
#
#   docker build -f dockerfiles/worker-gpu.Dockerfile -t REGION-docker.pkg.dev/PROJECT/REPO/lookalike-worker-gpu .
#
# The NVIDIA driver comes from the host (Dataflow's `install-nvidia-driver` service option);
# the CUDA runtime libraries come with the torch wheels from PyPI.
FROM apache/beam_python3.11_sdk:2.77.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA=true

WORKDIR /opt/lookalike

# Pinned set first (cached layer). On PyPI, torch==2.13.0 for Linux x86_64 is the CUDA build.
COPY requirements.txt ./
RUN pip install -r requirements.txt

# GPU-only extras (JPEG decode on the GPU), then the package itself without touching the pins.
COPY setup.py README.md ./
COPY encoder/ encoder/
COPY pipelines/ pipelines/
COPY indexing/ indexing/
COPY evaluation/ evaluation/
COPY training/ training/
RUN pip install --no-deps . \
    && pip install "torchvision==0.28.*" "nvidia-nvimgcodec-cu13[nvjpeg]==0.9.*" \
    && python -c "import encoder, pipelines, training; print('lookalike ok')"

# The Beam SDK harness stays the entry point (set by the base image).
