#!/usr/bin/env bash
# Install the Debian packages and the Python package the tests use, when they are missing:
#   chromium + chromium-driver and selenium (pip)  the browser tests of the HTML views (tests/viz/test_browser.py)
#   espeak-ng                                       the generated speech corpus (tests/tasks/test_speech*.py)
#
# Idempotent and quiet: prints nothing and changes nothing when everything is there; otherwise
# installs silently and shows the installer's output only when it fails. apt-get needs root (or
# password-less sudo); without it, or without apt-get, it says so on stderr and exits 0, and the
# tests that need the packages skip with the reason.
set -euo pipefail

PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT

quietly() {  # run a command, showing its output only if it fails
  if ! "$@" >"$LOG" 2>&1; then
    echo ".ci/system.sh: '$*' failed:" >&2
    cat "$LOG" >&2
    return 1
  fi
}

MISSING=()
command -v chromedriver >/dev/null 2>&1 || MISSING+=(chromium-driver)
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || MISSING+=(chromium)
command -v espeak-ng >/dev/null 2>&1 || MISSING+=(espeak-ng)

if [ "${#MISSING[@]}" -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      SUDO="sudo -n"
    else
      SUDO="none"
    fi
  fi
  if [ "$SUDO" = "none" ]; then
    echo ".ci/system.sh: ${MISSING[*]} missing and installing them needs root; the tests that need them will skip" >&2
  elif ! command -v apt-get >/dev/null 2>&1; then
    echo ".ci/system.sh: no apt-get here; install ${MISSING[*]} yourself (the tests that need them will skip)" >&2
  else
    export DEBIAN_FRONTEND=noninteractive
    quietly $SUDO apt-get update -qq
    quietly $SUDO apt-get install -y -qq --no-install-recommends -o Dpkg::Use-Pty=0 "${MISSING[@]}"
  fi
fi

if ! "$PY" -c "import selenium" >/dev/null 2>&1; then
  quietly "$PY" -m pip install -q --disable-pip-version-check "selenium>=4.10"
fi
