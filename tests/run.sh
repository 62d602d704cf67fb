#!/usr/bin/env bash
# Installs everything the tests need from scratch, then runs them all:  bash tests/run.sh [pytest args]
# A venv in .venv from the pinned lock file, Debian's chromium for the HTML report tests; the tests
# start their own SeaweedFS S3 server and local Ray cluster on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
fi
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -c requirements.lock -e ".[test]"
.venv/bin/pip check

if ! command -v chromium >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

exec .venv/bin/pytest -ra "$@"
