# syntax=docker/dockerfile:1.7
# The operator image: kopf + the kubernetes client, no torch. Also runs `wam submit` (nightly CronJob)
# and the chart's `helm test` check.
#   docker buildx build --platform linux/amd64,linux/arm64 -f dockerfiles/operator.Dockerfile -t REPO/operator:TAG .
FROM python:3.11.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY app app
COPY platform platform
COPY trainer trainer
COPY operators operators
RUN pip install ".[operator]" \
 && python -c "import wam.operators.handlers, wam.app.cli" \
 && rm -rf /src

RUN useradd --uid 1000 --user-group --no-create-home --home-dir /tmp wam
USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["python", "-m", "wam.operators"]
