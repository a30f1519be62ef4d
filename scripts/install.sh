#!/usr/bin/env bash
# Set up mlxc in ./.venv on a fresh machine. Usage: scripts/install.sh [--dev] [--cuda]
#   --dev   also the test tools and a local Redis server (for the Redis store's tests)
#   --cuda  Linux with an NVIDIA GPU (CUDA 13 driver): MLX's CUDA build, mlx[cuda13], in place
#           of the CPU one (both ship mlx/lib/libmlx.so, so the CPU one is removed first)
# On Linux it also installs an optimised BLAS (OpenBLAS), which makes MLX's CPU backend
# ~30x faster at float matmuls; on a Mac MLX uses Metal and needs nothing more.
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0; cuda=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    --cuda) cuda=1 ;;
    *) echo "usage: scripts/install.sh [--dev] [--cuda]" >&2; exit 2 ;;
  esac
done

apt_packages=()
if [ "$(uname -s)" = "Linux" ] && command -v apt-get >/dev/null 2>&1; then
  [ $cuda = 1 ] || ls /usr/lib/*/libopenblas*.so* >/dev/null 2>&1 || apt_packages+=(libopenblas0-pthread)
  [ $dev = 1 ] && ! command -v redis-server >/dev/null 2>&1 && apt_packages+=(redis-server)
  # The dashboard's browser test (tests/test_dashboard_browser.py) drives Debian's chromium.
  [ $dev = 1 ] && ! command -v chromedriver >/dev/null 2>&1 && apt_packages+=(chromium chromium-driver)
  # The replicas test (tests/test_replicas.py) puts two servers behind Debian's HAProxy.
  [ $dev = 1 ] && ! command -v haproxy >/dev/null 2>&1 && apt_packages+=(haproxy)
fi
if [ ${#apt_packages[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing ${apt_packages[*]} with apt-get" >&2
    apt-get update -qq >/dev/null && \
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_packages[@]}" >/dev/null
  else
    echo "note: run 'sudo apt-get install ${apt_packages[*]}' for a faster CPU backend" >&2
  fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ $dev = 1 ]; then
  .venv/bin/python -m pip install -q -e ".[test,plot]"
else
  .venv/bin/python -m pip install -q -e ".[plot]"  # `mlxc bench --plot` works at once
fi
if [ $cuda = 1 ]; then
  version=$(.venv/bin/python -c 'from importlib.metadata import version; print(version("mlx"))')
  .venv/bin/python -m pip uninstall -q -y mlx-cpu
  .venv/bin/python -m pip install -q "mlx[cuda13]==$version"
  .venv/bin/mlxc --version >&2  # says "backend: ... cuda · device: <your GPU>"
fi
echo "mlxc is installed in .venv: run .venv/bin/mlxc --help" >&2
