# CPU image for all Nebula roles (k8s/ uses it as nebula-rl:latest; the gpu overlay needs one built with the gpu extra).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap redis-server make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/nebula
COPY . .
RUN PYTHON=python3.11 bash scripts/setup.sh && ln -s /opt/nebula/.venv/bin/nebula /usr/local/bin/nebula
ENV PATH=/opt/nebula/.venv/bin:$PATH
