# Recommender image: the offline trainer and the online service share it.
#   docker build -t recsys .
#   docker run --rm -v recsys-artifacts:/artifacts recsys python -m offline train --out /artifacts
#   docker run --rm -p 8000:8000 -v recsys-artifacts:/artifacts recsys
#
# The defaults below are the real sources. CI (.ci/image) builds this file with buildah on a Debian bookworm base
# it makes with debootstrap, and takes torch from the machine's own wheel directory:
#   --build-arg BASE_IMAGE=localhost/recsys-ci-base:bookworm-<key> (any Debian-like base with python3.11 and venv)
#   --build-arg TORCH_INDEX_URL=<an index pip can reach> --build-arg TORCH_FIND_LINKS=<a mounted wheel directory>
#   --build-arg PIP_CONFIG_FILE=<a mounted pip.conf: the build machine's own indexes, wheel directories, CA bundle>
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# Where torch's CPU build comes from. TORCH_FIND_LINKS (empty: none) adds a local wheel directory, for a build that
# cannot reach PyTorch's index; the pin below still decides the version.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=
# A pip configuration file for the build's pip installs only (a mirror, a CA bundle); unset by default. Mount it with
# the build rather than copy it in (CI: buildah bud --volume host-file:/run/recsys-ci/pip.conf:ro).
ARG PIP_CONFIG_FILE

# Everything runs from a virtual environment, so that `python`, `pip` and `uvicorn` are the same commands on any
# base: python:3.11-slim has them in /usr/local/bin, Debian's own python3 has no `python` and refuses system-wide
# pip installs (PEP 668).
# HNSWLIB_NO_NATIVE: hnswlib compiles here, and its build adds -march=native unless this is set; a binary tuned to
# the build machine's CPU dies with SIGILL on a node whose CPU lacks an instruction it used.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LANG=C.UTF-8 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HNSWLIB_NO_NATIVE=1

WORKDIR /app

# CPU-only torch from PyTorch's own index, in its own layer: the default PyPI wheel drags in
# several GB of CUDA libraries that a CPU container never uses, and this layer rarely changes.
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install torch==2.13.0 --index-url "$TORCH_INDEX_URL" ${TORCH_FIND_LINKS:+--find-links "$TORCH_FIND_LINKS"}

# The project's dependencies, from pyproject.toml alone, in a layer that a change of the source keeps; constraints.txt
# pins torch==2.13.0, which the +cpu build above satisfies, so pip keeps it instead of fetching the CUDA wheel.
# hnswlib 0.8.0 ships no wheel: it compiles (portably, HNSWLIB_NO_NATIVE above), so g++ is installed and removed in
# the same layer to keep it out of the image.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && pip install -c constraints.txt -r /tmp/requirements.txt \
    && apt-get purge -y --auto-remove g++ \
    && rm -rf /var/lib/apt/lists/* /tmp/requirements.txt

# The project itself: its dependencies are all in place above (--no-deps: nothing is fetched or compiled again).
COPY . .
RUN pip install --no-deps -c constraints.txt .

# Run as an unprivileged user. /artifacts and /data are created here, owned by that user, so
# that named volumes mounted there start out writable by it (Docker copies the ownership of
# the image's directory into a new empty volume).
RUN useradd --create-home --uid 10001 --user-group app \
    && mkdir -p /artifacts /data \
    && chown app:app /artifacts /data
USER app

# numba compiles the feature kernel once and caches it; the package directory is not writable here (and the
# root filesystem is read-only under Kubernetes), /tmp is. matplotlib (the trainer's report plot) likewise wants a
# writable config directory, and warns at every start without one.
ENV RECSYS_BUNDLE_DIR=/artifacts \
    RECSYS_DATA_DIR=/data/ml-100k \
    RECSYS_TEXT_MODEL_DIR=/data/all-MiniLM-L6-v2 \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    MPLCONFIGDIR=/tmp/matplotlib

EXPOSE 8000

# Liveness only; readiness (bundle loaded) is GET /ready. slim has no curl, so use urllib,
# which raises (exit 1) on a refused connection or any non-2xx status.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]

# HeadDeadline: a 408 for a request head that trickles in (slow clients); nginx fronts it in compose.
CMD ["uvicorn", "service.app:app", "--host", "0.0.0.0", "--port", "8000", "--http", "service.protocol:HeadDeadline"]
