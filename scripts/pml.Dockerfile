# The pml service image used by docker-compose.yml: `docker build -f scripts/pml.Dockerfile -t pml .`
# Built on a Python base of your registry's choice (no registry is reachable from pml's CI).
ARG BASE=python:3.11-slim
FROM ${BASE}
WORKDIR /opt/pml
COPY pyproject.toml README.md ./
COPY pml ./pml
COPY actors ./actors
COPY examples ./examples
RUN pip install --no-cache-dir .
ENV PML_HOME=/var/lib/pml
ENTRYPOINT ["pml"]
