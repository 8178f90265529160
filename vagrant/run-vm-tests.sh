#!/usr/bin/env bash
# Run ksmtrace's test suite inside a Debian 12 VM (Linux 6.1) on this machine,
# offline, through the same Vagrantfile users run on their workstations.
#
#   make vm-test              (or: sudo vagrant/run-vm-tests.sh)
#
# What it does, and undoes on exit:
#   1. installs the host's tools from Debian if missing (vagrant,
#      vagrant-libvirt, libvirt, QEMU, debootstrap, dnsmasq-base);
#   2. builds the box (vagrant/build-box.sh) and a wheelhouse of the Python
#      packages pyproject.toml names, both cached under $KSMTRACE_VM_CACHE;
#   3. creates a network namespace, and in it starts virtlogd and libvirtd by
#      hand (no systemd needed) with a private /run: libvirt's network, its
#      dnsmasq and the guest's private addresses exist only in there;
#   4. vagrant up (QEMU software emulation: KSMTRACE_VM_DRIVER=qemu), then the
#      Vagrantfile's "install" provisioner (scripts/install.sh, as in CI) and
#      its "tests" provisioner (the suite, CI=true);
#   5. copies the guest's JUnit XML, serial console and timings to
#      $KSMTRACE_VM_RESULTS (default build/vm), destroys the VM, stops the
#      daemons and removes the namespace.
# Exit status: that of the guest's test run (0 = all passed), or 1 if the VM
# could not be brought up.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
export KSMTRACE_VM_CACHE="${KSMTRACE_VM_CACHE:-/var/cache/ksmtrace-vm}"
export KSMTRACE_VM_RESULTS="${KSMTRACE_VM_RESULTS:-$ROOT/build/vm}"
CACHE="$KSMTRACE_VM_CACHE"
RESULTS="$KSMTRACE_VM_RESULTS"
log() { printf 'vm-test: %s\n' "$*" >&2; }

HOST_PACKAGES=(
  vagrant vagrant-libvirt libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
  qemu-system-x86 qemu-utils debootstrap dnsmasq-base iptables rsync e2fsprogs
)

stamp() {  # prefix each line with the time: where a slow step spends it
  local line
  while IFS= read -r line; do printf '%(%H:%M:%S)T %s\n' -1 "$line"; done
}

timing() {  # name seconds: collected into timings.json at the end
  printf '"%s": %s\n' "$1" "$2" >>"$RESULTS/timings.part"
  log "$1: $2 s"
}

inner() {
  # In the run's own network namespace and (from ip netns exec) mount
  # namespace: a tmpfs over /run keeps libvirt's sockets and pid files private.
  ip link set lo up
  mount -t tmpfs -o mode=755 tmpfs /run
  mkdir -p /run/lock
  # libvirt probes QEMU with KVM (root can open /dev/kvm) but then checks it as
  # the QEMU user, who cannot: it sees the probe as stale and re-probes on every
  # lookup, about a minute per domain definition. A /dev/kvm node that user can
  # open, in this mount namespace only, keeps the probe valid. The domain still
  # runs under TCG (KSMTRACE_VM_DRIVER=qemu).
  if [[ -c /dev/kvm ]]; then
    mknod -m 666 /run/kvm c "$((0x$(stat -c %t /dev/kvm)))" "$((0x$(stat -c %T /dev/kvm)))"
    mount --bind /run/kvm /dev/kvm
  fi
  export VAGRANT_HOME="$CACHE/vagrant.d"
  mkdir -p "$VAGRANT_HOME"
  # QEMU runs as libvirt-qemu and reads the box's kernel from VAGRANT_HOME.
  chmod 755 "$CACHE" "$VAGRANT_HOME"

  lv_pid="" vl_pid=""
  stop_inner() {
    set +e
    log "stopping: VM, libvirt networks, libvirtd, virtlogd"
    (cd "$HERE" && timeout 300 vagrant destroy -f >>"$RESULTS/vagrant.log" 2>&1)
    for dom in $(virsh -q list --all --name 2>/dev/null | grep '^ksmtrace-'); do
      virsh -q destroy "$dom" >/dev/null 2>&1
      virsh -q undefine "$dom" --remove-all-storage >/dev/null 2>&1
    done
    # Their dnsmasq would outlive libvirtd otherwise.
    for net in $(virsh -q net-list --name 2>/dev/null); do
      virsh -q net-destroy "$net" >/dev/null 2>&1
    done
    [[ -n "$lv_pid" ]] && kill "$lv_pid" 2>/dev/null
    [[ -n "$vl_pid" ]] && kill "$vl_pid" 2>/dev/null
    sleep 1
  }
  trap stop_inner EXIT
  trap 'exit 143' TERM INT

  virtlogd -d
  vl_pid="$(cat /run/virtlogd.pid)"
  libvirtd -d
  for _ in $(seq 100); do [[ -S /run/libvirt/libvirt-sock ]] && break; sleep 0.1; done
  lv_pid="$(cat /run/libvirtd.pid)"
  log "libvirtd $lv_pid, virtlogd $vl_pid in network namespace $NS"

  # A run killed earlier may have left its domain defined: start clean.
  for dom in $(virsh -q list --all --name | grep '^ksmtrace-' || true); do
    virsh -q destroy "$dom" >/dev/null 2>&1 || true
    virsh -q undefine "$dom" --remove-all-storage >/dev/null 2>&1 || true
  done
  rm -rf "$HERE/.vagrant"

  # Older boxes (another package list) and their copies in libvirt's pool go.
  local old vol t
  for old in $(vagrant box list 2>/dev/null | awk '$1 ~ /^ksmtrace\// {print $1}' | sort -u); do
    [[ "$old" == "$BOX_NAME" ]] && continue
    log "removing stale box $old"
    vagrant box remove --force --all "$old" >>"$RESULTS/vagrant.log" 2>&1 || true
    for vol in $(virsh -q vol-list default 2>/dev/null | awk '{print $1}' \
        | grep "^${old//\//-VAGRANTSLASH-}_vagrant_box_image" || true); do
      virsh -q vol-delete --pool default "$vol" >/dev/null 2>&1 || true
    done
  done
  if ! vagrant box list 2>/dev/null | grep -q "^$BOX_NAME "; then
    t=$SECONDS
    vagrant box add --name "$BOX_NAME" "$BOX_FILE" >>"$RESULTS/vagrant.log"
    timing box_add_s $((SECONDS - t))
  fi

  export KSMTRACE_BOX="$BOX_NAME" KSMTRACE_VM_DRIVER=qemu
  export KSMTRACE_WHEELHOUSE="$WHEELHOUSE" KSMTRACE_VM_CONSOLE_LOG="$RESULTS/console.log"
  cd "$HERE"
  local rc
  t=$SECONDS
  if ! vagrant up --provider=libvirt --no-provision 2>&1 | stamp >>"$RESULTS/vagrant.log"; then
    log "vagrant up failed; last lines of $RESULTS/vagrant.log and the console:"
    tail -n 25 "$RESULTS/vagrant.log" >&2
    tail -n 25 "$RESULTS/console.log" >&2 2>/dev/null || true
    return 1
  fi
  timing vagrant_up_s $((SECONDS - t))
  vagrant ssh -c 'uname -r' 2>/dev/null | tr -d '\r' >"$RESULTS/guest-kernel"
  log "guest kernel: $(cat "$RESULTS/guest-kernel")"

  t=$SECONDS
  if ! vagrant provision --provision-with install 2>&1 | stamp >>"$RESULTS/vagrant.log"; then
    log "provisioning with scripts/install.sh failed:"
    tail -n 25 "$RESULTS/vagrant.log" >&2
    return 1
  fi
  timing guest_install_s $((SECONDS - t))

  t=$SECONDS
  rc=0
  vagrant provision --provision-with tests >"$RESULTS/guest-pytest.log" 2>&1 || rc=$?
  timing guest_tests_s $((SECONDS - t))
  vagrant ssh -c 'sudo cat /var/tmp/ksmtrace-junit.xml' >"$RESULTS/junit.xml" 2>/dev/null || true
  vagrant ssh -c 'sudo /vagrant/.venv/bin/ksmtrace status -j' >"$RESULTS/guest-status.json" 2>/dev/null || true
  log "guest test run exit status $rc; its output: $RESULTS/guest-pytest.log"
  return "$rc"
}

if [[ "${1:-}" == "--inner" ]]; then
  inner
  exit 0
fi

[[ $EUID -eq 0 ]] || { log "needs root (libvirtd, network namespace)"; exit 1; }
mkdir -p "$CACHE" "$RESULTS"
rm -f "$RESULTS"/{junit.xml,console.log,vagrant.log,guest-*,timings.json,timings.part}

missing=()
for p in "${HOST_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing host packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# One VM run per machine at a time (they share libvirt's state and the cache).
exec 9>"$CACHE/run.lock"
flock 9

t=$SECONDS
BOX_FILE="$("$HERE/build-box.sh")"
timing box_build_s $((SECONDS - t))
BOX_NAME="ksmtrace/$(basename "$BOX_FILE" .box)"

# The guest has no PyPI: hand it wheels of everything pyproject.toml names.
t=$SECONDS
PY="${KSMTRACE_HOST_PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PY" ]] || PY=/usr/bin/python3
wkey="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-12)"
WHEELHOUSE="$CACHE/wheelhouse-$wkey"
if [[ ! -d "$WHEELHOUSE" ]]; then
  log "downloading wheels into $WHEELHOUSE"
  mapfile -t reqs < <("$PY" - "$ROOT/pyproject.toml" <<'EOF'
import sys, tomllib
d = tomllib.load(open(sys.argv[1], "rb"))
reqs = ["pip"] + d["build-system"]["requires"] + d["project"]["dependencies"]
for extra in d["project"].get("optional-dependencies", {}).values():
    reqs += extra
print("\n".join(reqs))
EOF
  )
  "$PY" -m pip download -q -d "$WHEELHOUSE.tmp" "${reqs[@]}" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  compgen -G "$WHEELHOUSE.tmp/cffi-*" >/dev/null || { log "pip download failed"; exit 1; }
  mv "$WHEELHOUSE.tmp" "$WHEELHOUSE"
fi
timing wheelhouse_s $((SECONDS - t))

NS="ksmtrace-vm-$$"
INNER=""
stop_outer() {
  set +e
  if [[ -n "$INNER" ]] && kill -0 "$INNER" 2>/dev/null; then
    # Interrupted: end the inner run's current command (vagrant); its traps
    # then destroy the VM while libvirtd is still there to do it.
    log "interrupted: stopping the VM run in $NS"
    pkill -TERM -P "$INNER"
    kill -TERM "$INNER"
    for _ in $(seq 300); do kill -0 "$INNER" 2>/dev/null || break; sleep 1; done
  fi
  # Anything still running in the namespace was started by this run.
  for pid in $(ip netns pids "$NS" 2>/dev/null); do kill "$pid" 2>/dev/null; done
  for _ in $(seq 10); do [[ -z "$(ip netns pids "$NS" 2>/dev/null)" ]] && break; sleep 1; done
  for pid in $(ip netns pids "$NS" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
  ip netns del "$NS" 2>/dev/null
}
trap stop_outer EXIT
trap 'exit 143' TERM INT
ip netns add "$NS"
export NS BOX_FILE BOX_NAME WHEELHOUSE
rc=0
# In the background: a signal to this script is then handled at once, not
# after the whole VM run.
ip netns exec "$NS" "$HERE/run-vm-tests.sh" --inner &
INNER=$!
wait "$INNER" || rc=$?
INNER=""

{
  printf '{'
  [[ -f "$RESULTS/timings.part" ]] && tr '\n' ',' <"$RESULTS/timings.part" | sed 's/,/, /g'
  printf '"exit_status": %d}\n' "$rc"
} >"$RESULTS/timings.json"
rm -f "$RESULTS/timings.part"
log "timings: $(cat "$RESULTS/timings.json")"
exit "$rc"
