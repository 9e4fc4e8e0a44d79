#!/usr/bin/env bash
# Runs schemathesis against the OpenAPI document a running gateway serves, with valid
# (admin) credentials, and fails on any server error or schema violation.
#
#   pip install schemathesis
#   STREAMSPACE_TOKEN=<admin token> crates/api-gateway/scripts/schemathesis.sh [http://127.0.0.1:8080] [seconds]
#
# Start the stack first (`cargo xtask up` prints an admin token). At least one agent must
# be online, or session creation rightly answers 503 (which schemathesis counts as a
# server error). Set STREAMSPACE_RATE_LIMIT__ENABLED=false on the gateway for a thorough
# run: with limits on, most generated requests are answered 429.
set -euo pipefail
base="${1:-http://127.0.0.1:8080}"
seconds="${2:-90}"
: "${STREAMSPACE_TOKEN:?set STREAMSPACE_TOKEN to an admin token}"
exec st run "$base/api/v1/openapi.json" \
    --header "Authorization: Bearer $STREAMSPACE_TOKEN" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance \
    --max-time "$seconds" \
    --workers 2
