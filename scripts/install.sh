#!/usr/bin/env bash
# Install everything ksmtrace needs, into the system (Debian packages) and a
# virtualenv at .venv (Python packages, ksmtrace itself with its native part).
# Used by the README, .ci/run and vagrant/: one script, so they cannot drift.
# Idempotent; a second run with nothing to do takes about a second.
#
#   --print-deb-packages   print the Debian packages (one a line) and exit:
#                          vagrant/build-box.sh bakes them into its offline box
#   --with-vagrant         also install Debian's vagrant and vagrant-libvirt (as
#                          vagrant/run-vm-tests.sh does), so tests/unit/test_vagrant.py
#                          can validate vagrant/Vagrantfile; implied by CI=true,
#                          where that test fails rather than skip without them
#   --with-service         also install the daemon's systemd unit: packaging/ksmtrace.service
#                          to /etc/systemd/system/, /usr/local/sbin/ksmtrace linked to
#                          the virtualenv's ksmtrace (the unit's ExecStart), and
#                          docs/examples/policy-observe.toml as /etc/ksmtrace/policy.toml
#                          unless one exists; enables and starts nothing
#                          (KSMTRACE_DESTDIR=DIR: under DIR instead of /, for packaging)
#   --no-test-tools        leave out the real servers the dashboard tests drive
#                          (tmux, Debian's prometheus, chromium): for hosts that
#                          only run ksmtrace; also left out offline (KSMTRACE_WHEELHOUSE)
#   KSMTRACE_WHEELHOUSE=DIR install Python packages only from DIR (pip
#                          --no-index --find-links): for machines without PyPI,
#                          such as the offline VM of vagrant/run-vm-tests.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KSMTRACE_VENV:-$ROOT/.venv}"
PY=/usr/bin/python3   # Debian's python: the one python3-bpfcc is built for
ARCH="$(dpkg --print-architecture)"
log() { printf 'install: %s\n' "$*" >&2; }

DEB_PACKAGES=(
  python3-bpfcc bpfcc-tools bpftool "linux-headers-$ARCH"
  python3 python3-venv python3-dev gcc libc6-dev libxxhash-dev
  linux-perf procps util-linux strace
)
# gcc -m32: the injection tests build a 32-bit (i386) target to see it refused in words.
[[ "$ARCH" == amd64 ]] && DEB_PACKAGES+=(gcc-multilib)
if [[ "${1:-}" == "--print-deb-packages" ]]; then
  printf '%s\n' "${DEB_PACKAGES[@]}"; exit 0
fi
# Not in the list above: the offline box of build-box.sh does not need them,
# and a plain install stays small and fast.
with_vagrant=0 with_service=0 with_test_tools=1
[[ -n "${KSMTRACE_WHEELHOUSE:-}" ]] && with_test_tools=0
for arg in "$@"; do
  case "$arg" in
    --with-vagrant) with_vagrant=1 ;;
    --with-service) with_service=1 ;;
    --no-test-tools) with_test_tools=0 ;;
    *) log "unknown option $arg"; exit 2 ;;
  esac
done
case "${CI:-}" in 1|true|TRUE|True|yes) with_vagrant=1 ;; esac
if ((with_vagrant)); then
  DEB_PACKAGES+=(vagrant vagrant-libvirt)
fi
# The dashboard tests drive real programs: top in tmux, a Prometheus server
# scraping the daemon, the web page in headless Chromium.
TEST_TOOLS=(tmux prometheus chromium)
if ((with_test_tools)); then
  DEB_PACKAGES+=("${TEST_TOOLS[@]}")
fi

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $EUID -ne 0 ]]; then
    log "missing Debian packages: ${missing[*]}; run this script as root"; exit 1
  fi
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian's prometheus starts a system-wide server on :9090 where systemd runs;
  # the tests start their own on loopback, so one installed here is stopped.
  if [[ " ${missing[*]} " == *" prometheus "* && -d /run/systemd/system ]]; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true
    log "prometheus installed for the tests; its system service is disabled (the tests start their own)"
  fi
fi

# BCC attaches tracepoints through tracefs, which many hosts do not mount at boot.
if [[ $EUID -eq 0 && ! -d /sys/kernel/tracing/events ]]; then
  mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || log "could not mount tracefs"
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi

# BCC is pure Python over libbcc.so and is not on PyPI: expose Debian's copy,
# and only it, to the venv through a directory holding just a 'bcc' symlink.
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
BCC_DIR="$VENV/share/ksmtrace-bcc"
mkdir -p "$BCC_DIR"
ln -sfn /usr/lib/python3/dist-packages/bcc "$BCC_DIR/bcc"
echo "$BCC_DIR" > "$SITE/ksmtrace-bcc.pth"

# Reinstall ksmtrace only when its build inputs changed.
STAMP="$VENV/.ksmtrace-stamp"
digest="$(cd "$ROOT" && cat pyproject.toml setup.py native/*.c native/*.h native/*.py | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$digest" ]] || ! "$VENV/bin/python" -c 'import ksmtrace._native' 2>/dev/null; then
  log "installing ksmtrace and its Python dependencies into $VENV"
  PIP=("$VENV/bin/python" -m pip install -q)
  if [[ -n "${KSMTRACE_WHEELHOUSE:-}" ]]; then
    # Offline: build dependencies (setuptools, wheel, cffi) come from here too.
    log "using only the wheelhouse $KSMTRACE_WHEELHOUSE"
    PIP+=(--no-index --find-links "$KSMTRACE_WHEELHOUSE")
  fi
  # Editable installs from pyproject.toml need pip 21.3; Debian 12's venv has
  # 23.0, so the upgrade (a minute under the CI VM's emulation) is skipped there.
  if ! "$VENV/bin/python" -c 'import sys, pip; sys.exit(tuple(map(int, pip.__version__.split(".")[:2])) < (21, 3))'; then
    "${PIP[@]}" --upgrade pip >/dev/null
  fi
  "${PIP[@]}" -e "$ROOT[test]"
  echo "$digest" > "$STAMP"
fi
"$VENV/bin/python" -c 'import bcc, ksmtrace._native' || { log "import check failed"; exit 1; }

if ((with_service)); then
  DEST="${KSMTRACE_DESTDIR:-}"
  [[ -n "$DEST" || $EUID -eq 0 ]] || { log "--with-service writes /etc and /usr/local: run as root"; exit 1; }
  install -d "$DEST/usr/local/sbin" "$DEST/etc/systemd/system" "$DEST/etc/ksmtrace"
  ln -sfn "$VENV/bin/ksmtrace" "$DEST/usr/local/sbin/ksmtrace"
  install -m 0644 "$ROOT/packaging/ksmtrace.service" "$DEST/etc/systemd/system/ksmtrace.service"
  # An existing policy is the operator's: never overwritten.
  [[ -e "$DEST/etc/ksmtrace/policy.toml" ]] ||
    install -m 0644 "$ROOT/docs/examples/policy-observe.toml" "$DEST/etc/ksmtrace/policy.toml"
  if [[ -z "$DEST" && -d /run/systemd/system ]]; then systemctl daemon-reload; fi
  log "service installed: systemctl enable --now ksmtrace (policy /etc/ksmtrace/policy.toml)"
fi
log "ready: $VENV/bin/ksmtrace"
