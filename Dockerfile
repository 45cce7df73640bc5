# RPP nightly: one image for every Airflow component (API server, scheduler, DAG processor,
# triggerer, Celery workers) and the session watcher. See docs/airflow.md "Scaling out".
FROM python:3.11-slim-bookworm

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/opt/rpp/.venv

# plate solving (astrometry.net + Tycho-2 index files: fields of ~30 arcmin and wider; mount more
# index files into /usr/share/astrometry for smaller fields, docs/skycal.md)
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends astrometry.net astrometry-data-tycho2-10-19 \
      astrometry-data-tycho2-09 astrometry-data-tycho2-08 astrometry-data-tycho2-07 tini \
 && rm -rf /var/lib/apt/lists/*

RUN python -m pip install -q uv
WORKDIR /opt/rpp
# the locked environment first (cached layer), then the project
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY rpp_tasks ./rpp_tasks
COPY dags ./dags
COPY plugins ./plugins
COPY config ./config
COPY archive ./archive
RUN uv sync --frozen --no-dev
# the project's own bytecode (UV_COMPILE_BYTECODE covers site-packages only, and the workers'
# user cannot write /opt/rpp): without it every frame process compiles the ~50 rpp_tasks
# modules it imports (~0.15 CPU-s per process on the issue-11 bench machine)
RUN /opt/rpp/.venv/bin/python -m compileall -q rpp_tasks dags plugins

ENV PATH=/opt/rpp/.venv/bin:$PATH \
    PYTHONPATH=/opt/rpp \
    AIRFLOW_HOME=/opt/airflow \
    RPP_CONFIG_DIR=/opt/rpp/config \
    RPP_DATA_ROOT=/srv/rpp
RUN useradd --create-home --uid 50000 rpp && mkdir -p /opt/airflow /srv/rpp && chown -R rpp /opt/airflow /srv/rpp
USER rpp
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["airflow", "version"]
