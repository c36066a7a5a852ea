# Recommender image: the offline trainer and the online service share it.
#   docker build -t recsys .
#   docker run --rm -v recsys-artifacts:/artifacts recsys python -m offline train --out /artifacts
#   docker run --rm -p 8000:8000 -v recsys-artifacts:/artifacts recsys
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# CPU-only torch from PyTorch's own index, in its own layer: the default PyPI wheel drags in
# several GB of CUDA libraries that a CPU container never uses, and this layer rarely changes.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# The project itself; constraints.txt pins torch==2.13.0, which the +cpu build above satisfies,
# so pip keeps it instead of fetching the CUDA wheel. hnswlib 0.8.0 ships no wheel: it compiles,
# so g++ is installed and removed in the same layer to keep it out of the image.
COPY . .
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && pip install -c constraints.txt . \
    && apt-get purge -y --auto-remove g++ \
    && rm -rf /var/lib/apt/lists/*

# Run as an unprivileged user. /artifacts and /data are created here, owned by that user, so
# that named volumes mounted there start out writable by it (Docker copies the ownership of
# the image's directory into a new empty volume).
RUN useradd --create-home --uid 10001 --user-group app \
    && mkdir -p /artifacts /data \
    && chown app:app /artifacts /data
USER app

# numba compiles the feature kernel once and caches it; the package directory is not writable here (and the
# root filesystem is read-only under Kubernetes), /tmp is.
ENV RECSYS_BUNDLE_DIR=/artifacts \
    RECSYS_DATA_DIR=/data/ml-100k \
    RECSYS_TEXT_MODEL_DIR=/data/all-MiniLM-L6-v2 \
    NUMBA_CACHE_DIR=/tmp/numba-cache

EXPOSE 8000

# Liveness only; readiness (bundle loaded) is GET /ready. slim has no curl, so use urllib,
# which raises (exit 1) on a refused connection or any non-2xx status.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]

# HeadDeadline: a 408 for a request head that trickles in (slow clients); nginx fronts it in compose.
CMD ["uvicorn", "service.app:app", "--host", "0.0.0.0", "--port", "8000", "--http", "service.protocol:HeadDeadline"]
