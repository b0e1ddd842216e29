#!/usr/bin/env bash
# The long checks the test suite runs small: the model-based accounting test with
# many sequences on both backends, the spec, fd-3 and blob fuzzers with 100,000
# inputs each, and the end-to-end boundary tests repeated. Not part of CI (it takes
# a while); run it before a release or after touching the ledger or the protocol.
#
#   bash scripts/soak.sh [ROUNDS]     # ROUNDS of the boundary tests (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${GRANULE_TEST_POSTGRES:=postgres://postgres@127.0.0.1:5432/postgres}"
export GRANULE_TEST_POSTGRES
rounds="${1:-3}"

echo "soak: model-based accounting, 20000 sequences per backend" >&2
GRANULE_MODEL_CASES=20000 cargo test --release -p granule-store --test model

echo "soak: 100000 fuzzed specs, fd-3 streams and blobs" >&2
GRANULE_FUZZ_CASES=100000 cargo test --release -p granule-spec --test fuzz
GRANULE_FUZZ_CASES=100000 cargo test --release -p granule-exec --lib -- protocol blob

echo "soak: ledger properties, 100000 cases" >&2
PROPTEST_CASES=100000 cargo test --release -p granule-core --lib -- ledger

for round in $(seq 1 "$rounds"); do
    echo "soak: boundary tests, round $round of $rounds" >&2
    cargo test -p granule --test boundary
done
