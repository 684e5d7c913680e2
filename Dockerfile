# hardneg CPU image: the trainer and the api in one image, chosen by the command.
# Build stage: install with the same script as `make` and CI (scripts/install.sh),
# into a virtual environment that the final stage copies.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY scripts/ scripts/
COPY hardneg/ hardneg/
# PyTorch's CPU wheel index: without it pip would take the multi-GB CUDA build.
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
    PIP_NO_CACHE_DIR=1
RUN VENV=/opt/venv EXTRAS= EDITABLE=0 sh scripts/install.sh

FROM python:3.11-slim
# tini forwards SIGTERM to hardneg so the server and the trainer stop cleanly.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 hardneg \
    && mkdir -p /data/store /data/runs && chown -R hardneg:hardneg /data
# The mount points exist, owned by hardneg, so that Docker initialises a new named volume mounted
# there (docker-compose.yml's store and runs) with that owner: the trainer can write the store.
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg \
    HARDNEG_STORE=/data/store
USER hardneg
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
ENTRYPOINT ["tini", "--", "hardneg"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
