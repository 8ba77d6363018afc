# Index builder: builds, verifies and publishes snapshots and runs offline evaluation (CPU only).
#
#   docker build -f dockerfiles/index-builder.Dockerfile -t REGION-docker.pkg.dev/PROJECT/REPO/lookalike-index-builder .
#   docker run --rm IMAGE index --embeddings gs://BUCKET/lookalike --out gs://BUCKET/lookalike/snapshots
#
# The CPU build of torch (lookalike's libraries import it for the shared pieces), FAISS and ScaNN.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA=true

WORKDIR /opt/lookalike

# torch's CPU wheel first, so the pinned set below does not pull the CUDA build.
COPY requirements.txt ./
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
    && pip install -r requirements.txt

COPY setup.py README.md ./
COPY encoder/ encoder/
COPY pipelines/ pipelines/
COPY indexing/ indexing/
COPY evaluation/ evaluation/
COPY training/ training/
RUN pip install --no-deps . \
    && python -c "import indexing, evaluation; print('lookalike ok')" \
    && useradd --create-home --uid 10001 lookalike

USER 10001
ENTRYPOINT ["lookalike"]
CMD ["--help"]
