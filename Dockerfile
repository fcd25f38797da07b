# The fl-sim app image: Flower's SuperExec with fl-sim, torch and the other dependencies installed,
# so a run never installs anything at runtime. docker-compose.yml builds it for every SuperExec
# (the one that starts the ServerApp with the attacks, and one per SuperNode for its ClientApp).
ARG FLWR_VERSION=1.41.0
FROM flwr/superexec:${FLWR_VERSION}

WORKDIR /app
COPY --chown=app:app pyproject.toml uv.lock README.md ./
COPY --chown=app:app fl_sim ./fl_sim
COPY --chown=app:app attacks ./attacks
COPY --chown=app:app defenses ./defenses
COPY --chown=app:app scenarios ./scenarios
RUN python -m pip install --no-cache-dir . \
    && mkdir -p /app/runs
ENV OMP_WAIT_POLICY=PASSIVE

ENTRYPOINT ["flower-superexec"]
