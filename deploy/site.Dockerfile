# A hospital's SuperNode in a container: `fl-imaging-deploy supernode` (which checks the site
# folder, starts flower-supernode and its ClientApp runner, and stops both when either exits)
# as the non-root user flsite. Build from the repository root and run as
# docs/how-to/services.md shows:
#
#   docker build -f deploy/site.Dockerfile -t fl-imaging-site .
#   docker run -d --init --restart unless-stopped --name fl-site-hospital-a \
#       -v /data/hospital-a:/site:ro -v fl-site-state:/state -v /etc/fl-imaging:/certs:ro \
#       fl-imaging-site --superlink 10.0.0.5:9093 --site-name hospital-a
#
# /certs holds ca.crt (the coordinator's CA) and site.key (this site's private key); add
# --roster /certs/roster and --policy /certs/site.yaml when the site has them.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    PATH=/opt/venv/bin:$PATH

RUN useradd --system --create-home --uid 10001 flsite \
    && python -m venv /opt/venv \
    && mkdir /site /state /certs \
    && chown flsite /state

# torch first, from the CPU index: the package's pin (torch==2.13.0) is then already met and
# pip does not fetch the CUDA build and its libraries.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /opt/fl-imaging
COPY pyproject.toml README.md ./
COPY fl_imaging ./fl_imaging
COPY strategies ./strategies
COPY tasks ./tasks
COPY conf ./conf
RUN pip install "flwr[simulation,dp]==1.41.*" . \
    && python -c "import torch; assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__"

VOLUME ["/site", "/state"]
USER flsite
WORKDIR /state
ENTRYPOINT ["fl-imaging-deploy", "supernode", "--data-dir", "/site", "--state", "/state", "--ca", "/certs/ca.crt", "--key", "/certs/site.key", "--rejoin-wait", "90"]
CMD ["--help"]
