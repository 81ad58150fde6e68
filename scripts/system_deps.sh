#!/usr/bin/env bash
# Debian packages the tests use: headless Chromium + driver (browser tests), the PostgreSQL
# server (cluster-mode store tests), and libxc + BLAS headers to build GPAW (the ab initio MD
# test). Installs only what is missing; needs root.
set -uo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
[ -e /usr/include/xc.h ] || need+=(libxc-dev)
ls /usr/lib/*/libopenblas.so >/dev/null 2>&1 || need+=(libopenblas-dev)
if ((${#need[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian packages: ${need[*]}"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "warning: missing ${need[*]} (not root or no apt-get); tests that need them will be skipped" >&2
  fi
fi
exit 0
