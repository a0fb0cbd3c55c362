#!/usr/bin/env bash
# Installs what `make bench` needs beyond .venv: wrk and valgrind (system packages) and the
# peer servers in their own virtualenv, so they never mix with our dependencies.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v wrk >/dev/null; then
  echo "bench: installing wrk"
  (apt-get update -qq && apt-get install -y -qq wrk) >/dev/null
fi
if ! command -v valgrind >/dev/null; then
  echo "bench: installing valgrind (instruction counts)"
  (apt-get update -qq && apt-get install -y -qq valgrind) >/dev/null
fi
if ! command -v nginx >/dev/null; then
  echo "bench: installing nginx"
  (apt-get update -qq && apt-get install -y -qq nginx-light || apt-get install -y -qq nginx) >/dev/null
fi
if ! command -v h2load >/dev/null; then
  echo "bench: installing nghttp2-client (h2load, for HTTP/2)"
  (apt-get update -qq && apt-get install -y -qq nghttp2-client) >/dev/null
fi
if [ -f .bench-venv/.installed-stamp ] && ! .bench-venv/bin/python -c "import h2" 2>/dev/null; then
  .bench-venv/bin/pip install --quiet h2   # gunicorn's HTTP/2 (gunicorn[http2])
fi
if [ ! -f .bench-venv/.installed-stamp ]; then
  echo "bench: installing peers (gunicorn, uWSGI, granian) into .bench-venv"
  python3 -m venv .bench-venv
  .bench-venv/bin/pip install --quiet --upgrade pip
  .bench-venv/bin/pip install --quiet "gunicorn[http2]" uwsgi granian flask
  touch .bench-venv/.installed-stamp
fi
