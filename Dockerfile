# listar-arquivos: the directory-listing API (list_files_server.py).
#
#   docker build -t listar-arquivos:1.0 .
#   docker run -dp 8080:5000 -v ./dados:/data/files --name app-listar \
#     listar-arquivos:1.0
#   curl http://localhost:8080/files
#
# Docker clients before 23.0 refuse the relative "./dados": give them
# "$PWD/dados". The server uses the standard library only, so the image
# is its base plus one file. README.md has the hardened run
# flags, the health check and how to build without a registry.

# Python is chosen at build time: --build-arg PYTHON_VERSION=3.12.
ARG PYTHON_VERSION=3.13
FROM python:${PYTHON_VERSION}-slim

ARG PYTHON_VERSION
ARG VERSION=1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.base.name="python:${PYTHON_VERSION}-slim" \
      org.opencontainers.image.description="Directory listing API (JSON)" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.title="listar-arquivos" \
      org.opencontainers.image.version="${VERSION}"

# No .pyc writes: the root file system may be read-only and is not ours.
ENV FILE_DIRECTORY=/data/files \
    PORT=5000 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Owned by root and read-only for all, whatever the umask of the checkout
# was: any --user can run the server, none can edit it.
WORKDIR /app
COPY list_files_server.py /app/
RUN chmod 0444 /app/list_files_server.py

# /data/files is deliberately absent from the image: without a mount the
# server starts, /readyz answers 503 and the container turns unhealthy.
USER 10001:10001
EXPOSE 5000

# Python only (slim has no curl) and no proxy lookups; PORT is read when
# the probe runs. The first probe waits one interval, so "healthy" shows
# ~15 s after start; a missing mount shows "unhealthy" after ~50 s.
HEALTHCHECK --interval=15s --timeout=5s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import http.client, os, sys; \
port = int(os.environ.get('PORT', '5000')); \
conn = http.client.HTTPConnection('127.0.0.1', port, timeout=4); \
conn.request('GET', '/readyz'); \
sys.exit(0 if conn.getresponse().status == 200 else 1)"]

# Exec form: the server is PID 1 and receives docker stop's SIGTERM itself.
CMD ["python", "/app/list_files_server.py"]
