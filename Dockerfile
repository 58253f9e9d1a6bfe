# Weir in a small, non-root image. Mount your own config at /etc/weir/weir.yaml.

# The wheel is built where there is a C compiler, so that mypyc compiles the request path
# (setup.py); the image itself carries no compiler.
FROM python:3.11 AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
# A platform wheel (weir-*-cp311-*.whl) is the compiled build; `ls` fails the build if mypyc
# fell back to a pure-Python wheel.
RUN pip wheel --no-cache-dir --wheel-dir /wheels . && ls /wheels/weir-*-cp3*.whl

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home weir \
    && mkdir -p /etc/weir /var/lib/weir && chown weir /var/lib/weir
COPY config/docker.yaml /etc/weir/weir.yaml

USER weir
WORKDIR /var/lib/weir
EXPOSE 8080 9901
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["weir"]
CMD ["run", "-c", "/etc/weir/weir.yaml"]
