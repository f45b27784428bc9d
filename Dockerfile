# failoverd, the bpfailover agent, for a guest that runs its agents as containers.
# Build:  scripts/container-image (buildah, CI), or with the base's digest (see BASE below):
#           docker build --build-arg BASE=debian:bookworm-slim@sha256:<digest> -t bpfailover .
# Run:    see docs/operators.md ("The container"): host network, its own bpffs directory,
#         /lib/modules, /usr/src and /run/bpfailover mounted, CAP_BPF CAP_PERFMON
#         CAP_NET_ADMIN CAP_NET_RAW.

# The base by digest, never by tag alone: a tag can be moved to other contents, a digest
# cannot.  scripts/container-image passes the digest of the base it made; from a registry,
# pass the digest you checked (`docker pull debian:bookworm-slim` prints it).
ARG BASE
FROM ${BASE}

# bcc comes from Debian (not PyPI); the kernel headers are the fallback for guests whose
# own kernel has none (the programs use only UAPI structures); mount the host's
# /lib/modules and /usr/src to use the running kernel's own.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python3-pip python3-bpfcc libbpfcc linux-headers-amd64 \
      iproute2 ethtool kmod ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# Dependencies first: this layer stays cached while only the sources change.
# An optional build secret `ca` (a CA bundle) serves sites whose egress re-signs TLS.
# Every one pinned with its hashes (requirements.lock, `make lock`): a changed or
# substituted file fails the build.
COPY pyproject.toml requirements.lock /src/
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && python3 -m venv --system-site-packages /opt/bpfailover \
 && /opt/bpfailover/bin/pip install --no-cache-dir --disable-pip-version-check \
      --require-hashes -r /src/requirements.lock

COPY bpf /src/bpf
COPY control /src/control
RUN rm -rf /src/control/*.egg-info \
 && /opt/bpfailover/bin/pip install --no-cache-dir --no-deps --no-build-isolation \
      --disable-pip-version-check /src \
 && mkdir -p /opt/bpfailover/share && cp -r /src/bpf /opt/bpfailover/share/bpf \
 && ln -s /opt/bpfailover/bin/failoverd /opt/bpfailover/bin/failoverctl /usr/local/bin/

ENV BPFAILOVER_BPF_DIR=/opt/bpfailover/share/bpf \
    BPFAILOVER_CONFIG=/etc/bpfailover/config.yaml \
    PYTHONUNBUFFERED=1
# metrics.listen defaults to 127.0.0.1:9617 (the host's loopback under --network host);
# set it in the config to scrape from elsewhere.
EXPOSE 9617
# which base, by digest, the image was built from
ARG BASE
LABEL org.opencontainers.image.base.name="${BASE}"
ENTRYPOINT ["/opt/bpfailover/bin/failoverd"]
