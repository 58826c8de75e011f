#!/usr/bin/env bash
# Install what the browser tests (tests/viz/test_browser.py) need, when it is missing: Debian's
# chromium and chromium-driver (apt-get) and selenium (pip, into the active Python environment).
#
# Idempotent and quiet: prints nothing and changes nothing when everything is there; otherwise
# installs silently and shows the installer's output only when it fails. apt-get needs root (or
# password-less sudo); without it, or without apt-get, it says so on stderr and exits 0, and the
# browser tests skip with the reason.
set -euo pipefail

PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT

quietly() {  # run a command, showing its output only if it fails
  if ! "$@" >"$LOG" 2>&1; then
    echo ".ci/browser.sh: '$*' failed:" >&2
    cat "$LOG" >&2
    return 1
  fi
}

have_browser() {
  command -v chromedriver >/dev/null 2>&1 &&
    { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }
}

if ! have_browser; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      SUDO="sudo -n"
    else
      SUDO="none"
    fi
  fi
  if [ "$SUDO" = "none" ]; then
    echo ".ci/browser.sh: chromium/chromedriver are missing and installing them needs root; the browser tests will skip" >&2
  elif ! command -v apt-get >/dev/null 2>&1; then
    echo ".ci/browser.sh: no apt-get here; install chromium and its chromedriver yourself (the browser tests will skip)" >&2
  else
    export DEBIAN_FRONTEND=noninteractive
    quietly $SUDO apt-get update -qq
    quietly $SUDO apt-get install -y -qq --no-install-recommends -o Dpkg::Use-Pty=0 chromium chromium-driver
  fi
fi

if ! "$PY" -c "import selenium" >/dev/null 2>&1; then
  quietly "$PY" -m pip install -q --disable-pip-version-check "selenium>=4.10"
fi
