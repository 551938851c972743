# meddiff image: the Prefect server, the CPU worker and the GPU worker of docker-compose.yml.
# CPU wheels of torch by default; the GPU worker builds with
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MEDDIFF_REPO=/app

WORKDIR /app
RUN useradd --create-home --uid 1000 meddiff

# dependencies first (cached layer): torch from the chosen index, then the project's pins (SQLAlchemy
# restated: prefect 3.8.8's scheduler needs < 2.1, and the server image must not drift from pyproject)
COPY pyproject.toml README.md ./
RUN pip install --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple torch torchvision \
 && mkdir -p meddiff flows && touch meddiff/__init__.py flows/__init__.py \
 && pip install '.[dicom]' 'sqlalchemy>=2.0,<2.1' && pip uninstall -y meddiff && rm -rf meddiff flows build

# the source: workers run deployments from /app (prefect.yaml's pull step: MEDDIFF_REPO)
COPY meddiff ./meddiff
COPY flows ./flows
COPY prefect.yaml ./
RUN pip install --no-deps -e . && chown -R meddiff /app

USER meddiff
RUN mkdir -p /home/meddiff/.cache/meddiff
CMD ["prefect", "worker", "start", "--pool", "cpu", "--type", "process", "--with-healthcheck"]
