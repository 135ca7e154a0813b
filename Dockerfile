# kvfs image: `kvfs mount`, `kvfs emulator` and the CSI node plugin + mounter (csi/daemonset.yaml).
#   docker build -t kvfs:0.1.0 .
# Build stage: wheels for everything (pyfuse3 compiles against libfuse3).
FROM python:3.11-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev pkg-config libfuse3-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md* ./
COPY src ./src
RUN pip wheel --no-cache-dir --wheel-dir /wheels . setproctitle grpcio-tools

# Runtime stage: fuse3 runtime only, no compiler.
FROM python:3.11-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends fuse3 libfuse3-3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels kvfs setproctitle grpcio-tools \
 && rm -rf /wheels \
 # generate the CSI gRPC stubs now: the installed package is read-only at run time
 && python -c "from kvfs.csi.proto import load; load()"
# Each volume's daemon runs with a uid of its own (`kvfs csi node --daemon-uid-range`); the CSI
# plugin and the mounter start as root (mount(2), switching uid) and drop nothing else themselves.
ENTRYPOINT ["kvfs"]
CMD ["--help"]
