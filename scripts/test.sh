#!/usr/bin/env bash
# The whole test suite, on both backends: makes sure PostgreSQL is up (starting or
# installing it if needed) and that moto (an S3-compatible server) is installed, then
# runs `cargo test --workspace`. Under CI=true a
# PostgreSQL that cannot be reached fails the run instead of skipping its tests.
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

# Every test binary runs even when one fails, so CI shows every failure.
cargo test --workspace --no-fail-fast "$@"
