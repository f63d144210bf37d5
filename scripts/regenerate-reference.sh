#!/usr/bin/env bash
# Regenerate everything in the repository that is generated from the policy schema and the
# probe/action catalog, after a field, metric or action changed (one command, for merges too):
#
#   scripts/regenerate-reference.sh
#
#   1. remediator/schema/policy.schema.json  (remediator schema)
#   2. the generated tables of docs/policies.md  (remediator schema --markdown docs/policies.md)
#
# Review the diff afterwards. tests/unit/test_loader.py and tests/unit/test_policy_reference.py
# fail when either is stale. Uses the checkout's .venv when there is one.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -x .venv/bin/remediator ]]; then
    remediator=.venv/bin/remediator
else
    remediator=remediator
fi
"$remediator" schema > remediator/schema/policy.schema.json.tmp
mv remediator/schema/policy.schema.json.tmp remediator/schema/policy.schema.json
"$remediator" schema --markdown docs/policies.md
