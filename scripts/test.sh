#!/usr/bin/env bash
# The whole test suite, on both backends: makes sure PostgreSQL is up (starting or
# installing it if needed), that moto (an S3-compatible server), Chromium and promtool are
# installed and that a Slurm cluster runs (scripts/slurm.sh), then runs `cargo test
# --workspace`. Under CI=true any of them missing fails the run instead of skipping tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# PostgreSQL for the second backend: use the one running, else start (or install) it.
: "${GRANULE_TEST_POSTGRES:=postgres://postgres@127.0.0.1:5432/postgres}"
export GRANULE_TEST_POSTGRES
pg_up() { pg_isready -q -d "$GRANULE_TEST_POSTGRES" 2>/dev/null; }
if ! pg_up; then
    if ! command -v pg_ctlcluster >/dev/null; then
        echo "ci: installing PostgreSQL" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null || true
    fi
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$version" ]; then
        pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null \
            || pg_ctlcluster "$version" main start || true
    fi
    for _ in $(seq 1 30); do pg_up && break; sleep 1; done
fi
if ! pg_up; then
    if [ "${CI:-}" = "true" ]; then
        echo "ci: PostgreSQL at $GRANULE_TEST_POSTGRES cannot be reached; the PostgreSQL tests must run in CI" >&2
        exit 1
    fi
    echo "ci: !!! PostgreSQL unreachable: its tests will be skipped (outside CI only)" >&2
    unset GRANULE_TEST_POSTGRES
fi

# An S3-compatible server for the blob store's tests: moto, from PyPI.
if ! command -v moto_server >/dev/null; then
    echo "ci: installing moto (an S3-compatible server for the blob store tests)" >&2
    python3 -m pip install -q 'moto[server]' >&2 || true
    hash -r
fi
if ! command -v moto_server >/dev/null; then
    if [ "${CI:-}" = "true" ]; then
        echo "ci: moto_server is missing (pip install 'moto[server]'); the S3 tests must run in CI" >&2
        exit 1
    fi
    echo "ci: !!! moto_server unavailable: the S3 tests will be skipped (outside CI only)" >&2
fi

# The dashboard's test renders it in a real headless Chromium; the metrics' test has
# Prometheus's promtool check them (both Debian packages).
if ! command -v chromium >/dev/null || ! command -v promtool >/dev/null; then
    echo "ci: installing chromium and prometheus (the dashboard and /metrics tests)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium prometheus >/dev/null || true
fi
if ! command -v chromium >/dev/null || ! command -v promtool >/dev/null; then
    if [ "${CI:-}" = "true" ]; then
        echo "ci: chromium or promtool is missing (apt install chromium prometheus); their tests must run in CI" >&2
        exit 1
    fi
    echo "ci: !!! chromium or promtool unavailable: the dashboard and metrics checks will be skipped (outside CI only)" >&2
fi

# A real single-node Slurm cluster for the Slurm backend's tests (scripts/slurm.sh
# installs it if needed), in a fresh directory so that no earlier run's jobs or job ids
# leak in. Its daemons outlive this script unless stopped: the EXIT trap does it whatever
# happens (and keeps the exit status); INT and TERM go through it too.
slurm_dir="${TMPDIR:-/tmp}/granule-slurm-$$"
stop_slurm() {
    bash scripts/slurm.sh stop "$slurm_dir" >&2 || true
    rm -rf "$slurm_dir"
}
trap stop_slurm EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
if slurm_conf=$(bash scripts/slurm.sh start "$slurm_dir"); then
    export SLURM_CONF="${slurm_conf#SLURM_CONF=}" GRANULE_TEST_SLURM=1
else
    if [ "${CI:-}" = "true" ]; then
        echo "ci: a Slurm cluster cannot be started (see above); the Slurm tests must run in CI" >&2
        exit 1
    fi
    echo "ci: !!! Slurm unavailable: its tests will be skipped (outside CI only)" >&2
    unset GRANULE_TEST_SLURM
fi

# Every test binary runs even when one fails, so CI shows every failure. (Not `exec`:
# the EXIT trap must still stop the cluster.)
cargo test --workspace --no-fail-fast "$@"
