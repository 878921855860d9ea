# syntax=docker/dockerfile:1
# costwarden: the operator and the gateway in one image (`costwarden operator`, `costwarden
# gateway`). Build: docker build -t costwarden/costwarden:0.1.0 .

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: a self-contained virtualenv with costwarden and its dependencies -----------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
RUN python -m venv /opt/costwarden

# Build context: pyproject.toml, README.md (if present) and operator/ (see .dockerignore).
COPY pyproject.toml README.md* ./
COPY operator/ operator/
RUN /opt/costwarden/bin/pip install --no-compile ".[store,otel]" \
    && /opt/costwarden/bin/python -m compileall -q /opt/costwarden/lib \
    && /opt/costwarden/bin/pip uninstall -y pip setuptools wheel

# ---- runtime: the virtualenv only, no compilers, no pip, no source tree ----------------
FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="costwarden" \
      org.opencontainers.image.description="Kubernetes operator and LLM gateway that enforce AI budgets" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim"

ENV PATH="/opt/costwarden/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/costwarden

# The image's pip is not needed at run time; fewer tools, fewer CVEs.
RUN python -m pip uninstall -y pip setuptools wheel \
    && groupadd --gid 65532 costwarden \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin costwarden

COPY --from=build /opt/costwarden /opt/costwarden

# Numeric so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 65532:65532
WORKDIR /tmp
EXPOSE 8000 8080 9090

ENTRYPOINT ["costwarden"]
CMD ["operator"]
