#!/usr/bin/env bash
# Build a Debian 12 Vagrant box for the libvirt provider from Debian packages
# alone (debootstrap), for machines that cannot download Vagrant boxes.
#
# The box holds every Debian package scripts/install.sh wants, so the guest
# needs no network beyond the host; its own kernel and initrd sit beside the
# disk image and are booted directly (no bootloader: the disk is one ext4
# file system). The box is cached under $KSMTRACE_VM_CACHE, keyed by a hash of
# the package list and this script: a second run prints the cached path at once.
#
#   vagrant/build-box.sh        # prints the path of the .box file
#
# Needs root, debootstrap, qemu-utils (qemu-img), e2fsprogs and vagrant (for
# its insecure public key, which the box authorises as vagrant does).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
CACHE="${KSMTRACE_VM_CACHE:-/var/cache/ksmtrace-vm}"
MIRROR="${KSMTRACE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
DISK_GIB=8
log() { printf 'build-box: %s\n' "$*" >&2; }
# stdout carries the box path alone; what the tools print goes to stderr.
exec 3>&1 1>&2

# What a Vagrant guest needs beyond install.sh's list: a kernel and initrd,
# an init, a network, ssh, sudo and rsync (the synced folder).
BOX_PACKAGES=(
  linux-image-amd64 initramfs-tools systemd-sysv udev kmod dbus iproute2 netbase
  openssh-server sudo rsync e2fsprogs
)
mapfile -t DEB_PACKAGES < <("$ROOT/scripts/install.sh" --print-deb-packages)

key="$({ printf '%s\n' "$SUITE" "${BOX_PACKAGES[@]}" "${DEB_PACKAGES[@]}" | sort -u; cat "$0"; } \
  | sha256sum | cut -c1-12)"
BOX="$CACHE/ksmtrace-$SUITE-$key.box"
if [[ -f "$BOX" ]]; then
  log "cached: $BOX"
  echo "$BOX" >&3
  exit 0
fi
[[ $EUID -eq 0 ]] || { log "needs root (debootstrap)"; exit 1; }

pubkey="$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub \
  /opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | head -n1 || true)"
[[ -n "$pubkey" ]] || { log "vagrant's insecure public key not found: install vagrant"; exit 1; }

mkdir -p "$CACHE/debs"
work="$(mktemp -d "$CACHE/build.XXXXXX")"
target="$work/root"
cleanup() {
  for m in dev/pts dev sys proc; do
    mountpoint -q "$target/$m" 2>/dev/null && umount -l "$target/$m"
  done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

t0=$SECONDS
include="$(printf '%s,' "${BOX_PACKAGES[@]}" "${DEB_PACKAGES[@]}")"
log "debootstrap $SUITE with ${#BOX_PACKAGES[@]}+${#DEB_PACKAGES[@]} packages (debs cached in $CACHE/debs)"
debootstrap --variant=minbase --cache-dir="$CACHE/debs" --include="${include%,}" \
  "$SUITE" "$target" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
  || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
log "debootstrap done in $((SECONDS - t0)) s"

in_root() { chroot "$target" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }

echo ksmtrace-vm >"$target/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tksmtrace-vm\n' >"$target/etc/hosts"
printf '/dev/vda\t/\text4\terrors=remount-ro\t0\t1\n' >"$target/etc/fstab"
: >"$target/etc/machine-id"   # each VM makes its own at first boot

# DHCP on whatever NIC the provider gives (vagrant-libvirt: virtio eth0).
cat >"$target/etc/systemd/network/80-dhcp.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=yes
EOF
in_root systemctl enable systemd-networkd ssh >/dev/null 2>&1
printf 'UseDNS no\n' >"$target/etc/ssh/sshd_config.d/vagrant.conf"

in_root useradd -m -s /bin/bash vagrant
echo vagrant:vagrant | in_root chpasswd
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' >"$target/etc/sudoers.d/vagrant"
chmod 0440 "$target/etc/sudoers.d/vagrant"
install -d -m 700 "$target/home/vagrant/.ssh"
install -m 600 "$pubkey" "$target/home/vagrant/.ssh/authorized_keys"
in_root chown -R vagrant:vagrant /home/vagrant/.ssh

# The initrd must find a virtio disk with ext4 on it.
printf '%s\n' virtio_pci virtio_blk virtio_net ext4 >>"$target/etc/initramfs-tools/modules"
mount -t proc proc "$target/proc"
in_root update-initramfs -u -k all >/dev/null 2>&1
umount "$target/proc"
rm -f "$target"/var/cache/apt/archives/*.deb "$target"/var/lib/apt/lists/*_Packages

out="$work/box"
mkdir -p "$out"
cp "$(ls "$target"/boot/vmlinuz-* | sort -V | tail -n1)" "$out/vmlinuz"
cp "$(ls "$target"/boot/initrd.img-* | sort -V | tail -n1)" "$out/initrd.img"
kver="$(basename "$(ls "$target"/boot/vmlinuz-* | sort -V | tail -n1)" | sed 's/^vmlinuz-//')"

log "making the ${DISK_GIB} GiB ext4 disk image (kernel $kver)"
mkfs.ext4 -q -F -L root -d "$target" "$work/disk.raw" "${DISK_GIB}G"
qemu-img convert -O qcow2 "$work/disk.raw" "$out/box.img"
rm -f "$work/disk.raw"

cat >"$out/metadata.json" <<EOF
{"provider": "libvirt", "format": "qcow2", "virtual_size": $DISK_GIB}
EOF
# Merged into the user's Vagrantfile: boot the box's own kernel directly.
cat >"$out/Vagrantfile" <<'EOF'
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.kernel = File.join(__dir__, "vmlinuz")
    lv.initrd = File.join(__dir__, "initrd.img")
    lv.cmd_line = "root=/dev/vda rw console=ttyS0 net.ifnames=0"
  end
end
EOF
echo "$kver" >"$out/kernel-release"

tar -C "$out" -cf "$BOX.tmp" metadata.json Vagrantfile box.img vmlinuz initrd.img kernel-release
mv "$BOX.tmp" "$BOX"
# Boxes of other package lists are stale: the cache keeps one.
find "$CACHE" -maxdepth 1 -name "ksmtrace-$SUITE-*.box" ! -name "$(basename "$BOX")" -delete
log "built $BOX ($(du -h "$BOX" | cut -f1), kernel $kver) in $((SECONDS - t0)) s"
echo "$BOX" >&3
