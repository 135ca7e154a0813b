# kvfs image: `kvfs mount` and the CSI node plugin + mounter (csi/base: kubectl apply -k csi/base).
# The emulator (the `emulator` extra: `pip install '.[emulator]'` in a checkout) is for tests and
# demos and is not installed here.
#   docker build -t kvfs:0.1.0 .
# Build stage: wheels for everything (pyfuse3 compiles against libfuse3).
FROM python:3.11-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev pkg-config libfuse3-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md* LICENSE ./
COPY src ./src
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Runtime stage: fuse3 runtime only, no compiler.
FROM python:3.11-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends fuse3 libfuse3-3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels kvfs \
 && rm -rf /wheels \
 # the committed CSI gRPC stubs must import with the installed protobuf and grpcio
 && python -c "from kvfs.csi.proto import load; load()"
# Each volume's daemon runs with a uid of its own (`kvfs csi node --daemon-uid-range`); the CSI
# plugin and the mounter start as root (mount(2), switching uid) and drop nothing else themselves.
ENTRYPOINT ["kvfs"]
CMD ["--help"]
