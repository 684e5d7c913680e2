# hardneg CPU image: the trainer and the api in one image, chosen by the command.
# Build stage: install with the same script as `make` and CI (scripts/install.sh),
# into a virtual environment that the final stage copies.
#
# Build arguments; the defaults are a plain `docker compose up --build`:
#   BASE             base image of both stages (Debian with python3 and python3-venv)
#   TORCH_INDEX_URL  PyTorch's CPU wheel index: without it pip would take the multi-GB CUDA build.
#                    Empty: torch comes from the default index or PIP_FIND_LINKS.
#   PIP_CERT         CA bundle pip trusts, a path inside the build (e.g. a bind-mounted host bundle)
#   PIP_FIND_LINKS   local wheel folder(s) pip looks in first, paths inside the build
# scripts/compose-smoke.sh builds with all four (a local Debian base, the host's CA bundle and wheels).
ARG BASE=python:3.11-slim
FROM ${BASE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_CERT=
ARG PIP_FIND_LINKS=
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY scripts/install.sh scripts/
COPY hardneg/ hardneg/
ENV PIP_NO_CACHE_DIR=1
RUN VENV=/opt/venv EXTRAS= EDITABLE=0 sh scripts/install.sh

FROM ${BASE}
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
# No VOLUME: docker-compose.yml mounts named volumes at /data/store and /data/runs, and a VOLUME /data
# would add an anonymous volume to every container (writable by the api, left behind by `down -v`).
EXPOSE 8000
ENTRYPOINT ["tini", "--", "hardneg"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
