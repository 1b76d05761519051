#!/usr/bin/env bash
# Builds NovaCron's demo guest from Debian packages only:
#   - vmlinuz    : the kernel inside linux-image-*-cloud-amd64 (taken with apt-get download + dpkg -x)
#   - initrd.img : a gzip'd newc cpio with busybox-static, the few kernel modules the guest needs
#                  (virtio block, ACPI power button, evdev) and an /init that prints
#                  "NOVACRON-DEMO-GUEST READY" and then "tick N" once a second. With
#                  `novacron.dirty=N` on the kernel command line it also rewrites N MiB of memory
#                  in a loop (a guest that dirties memory fast, for migration tests; it needs 2N
#                  MiB of the initramfs, which gets half the guest's memory). With `novacron.diskwrite=N`
#                  it writes N x 64 KiB to /dev/vda every second (I/O statistics tests). With
#                  `novacron.seqwrite=DEV` it waits for /dev/DEV (a hot-plugged volume), then
#                  writes 64 KiB blocks there ten times a second, block n at slot n % 64 of the
#                  first 4 MiB, each starting "NCSEQ <n, 10 digits>\n" followed by the same random
#                  bytes, and prints "seqwrite n" once block n is flushed (volume move tests: no
#                  acknowledged write may be lost). With `novacron.spam=N` it prints N lines of
#                  100 characters to its console every 100 ms, without end (console log tests).
#   - disk.qcow2 : a small blank data disk, so every demo VM has a real block device (/dev/vda)
#                  that tests can write to and read back.
#   - image.json : the boot parameters NovaCron registers the image with.
#
# Usage: scripts/build-demo-image.sh OUTPUT_DIR
# Idempotent: a complete OUTPUT_DIR of this version is left alone. An older version is rebuilt,
# except disk.qcow2 (other VMs' disks may be overlays on it; it is blank either way).
set -euo pipefail

version=5
out=${1:?usage: build-demo-image.sh OUTPUT_DIR}
if [[ -f "$out/image.json" && -f "$out/vmlinuz" && -f "$out/initrd.img" && -f "$out/disk.qcow2" ]] &&
   grep -q "\"version\": $version" "$out/image.json"; then
  echo "demo image already built in $out"
  exit 0
fi

for tool in busybox cpio gzip qemu-img apt-get dpkg; do
  command -v "$tool" >/dev/null || { echo "build-demo-image: missing $tool (see scripts/setup.sh)" >&2; exit 1; }
done
busybox_bin=$(command -v busybox)
if ! file -L "$busybox_bin" 2>/dev/null | grep -q 'statically linked' && ! ldd "$busybox_bin" 2>&1 | grep -q 'not a dynamic'; then
  echo "build-demo-image: $busybox_bin is not static; install busybox-static" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"

# The metapackage names the current versioned kernel package.
kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
[[ -n "$kpkg" ]] || { echo "build-demo-image: cannot resolve linux-image-cloud-amd64 (run apt-get update)" >&2; exit 1; }
(cd "$work" && apt-get download "$kpkg" >/dev/null 2>&1) || { echo "build-demo-image: apt-get download $kpkg failed" >&2; exit 1; }
dpkg -x "$work"/linux-image-*.deb "$work/kernel"
kver=$(ls "$work/kernel/lib/modules")
moddir="$work/kernel/lib/modules/$kver/kernel"

root="$work/root"
mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,etc/acpi,lib/modules}
cp "$busybox_bin" "$root/bin/busybox"
# Order matters: insmod does not resolve dependencies.
mods=(
  drivers/virtio/virtio_ring.ko drivers/virtio/virtio.ko
  drivers/virtio/virtio_pci_legacy_dev.ko drivers/virtio/virtio_pci_modern_dev.ko
  drivers/virtio/virtio_pci.ko drivers/block/virtio_blk.ko
  drivers/acpi/button.ko drivers/input/evdev.ko
)
for m in "${mods[@]}"; do
  [[ -f "$moddir/$m" ]] || { echo "build-demo-image: kernel module $m missing in $kpkg" >&2; exit 1; }
  cp "$moddir/$m" "$root/lib/modules/"
done
printf '%s\n' "${mods[@]##*/}" > "$root/lib/modules/order"

# busybox acpid turns the ACPI power button (QMP system_powerdown) into a clean poweroff.
echo 'PWRF power' > "$root/etc/acpid.conf"
cat > "$root/etc/acpi/power" <<'SH'
#!/bin/sh
echo "NOVACRON-DEMO-GUEST POWERDOWN"
poweroff -f
SH
chmod +x "$root/etc/acpi/power"

cat > "$root/init" <<'SH'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
while read -r m; do insmod "/lib/modules/$m" 2>/dev/null; done < /lib/modules/order
acpid -c /etc/acpi -a /etc/acpid.conf -l /tmp/acpid.log
echo "NOVACRON-DEMO-GUEST READY"
dirty=$(sed -n 's/.*novacron\.dirty=\([0-9][0-9]*\).*/\1/p' /proc/cmdline)
if [ -n "$dirty" ]; then
  # Random data (zero pages would migrate for free), rewritten over and over.
  dd if=/dev/urandom of=/tmp/seed bs=1M count="$dirty" 2>/dev/null
  (while true; do cp /tmp/seed /tmp/dirty; done) &
  echo "dirtying $dirty MiB"
fi
for d in /sys/block/vd*; do [ -e "$d" ] && echo "disk ${d##*/} $(cat "$d/size") sectors"; done
write=$(sed -n 's/.*novacron\.diskwrite=\([0-9][0-9]*\).*/\1/p' /proc/cmdline)
if [ -n "$write" ]; then
  # N x 64 KiB of random data to the first disk every second, flushed to the device.
  (n=0; while true; do
     dd if=/dev/urandom of=/dev/vda bs=64k count="$write" seek=$((n % 64)) conv=fsync 2>/dev/null
     n=$((n + write)); sleep 1
   done) &
  echo "writing $write x 64 KiB/s to vda"
fi
seqdev=$(sed -n 's/.*novacron\.seqwrite=\([a-z0-9]*\).*/\1/p' /proc/cmdline)
if [ -n "$seqdev" ]; then
  (while [ ! -b "/dev/$seqdev" ]; do sleep 0.2; done
   echo "seqwrite device $seqdev present"
   dd if=/dev/urandom of=/tmp/fill bs=65519 count=1 2>/dev/null
   n=1
   while true; do
     { printf 'NCSEQ %010d\n' "$n"; cat /tmp/fill; } > /tmp/blk
     if dd if=/tmp/blk of="/dev/$seqdev" bs=65536 count=1 seek=$((n % 64)) conv=fsync 2>/dev/null; then
       echo "seqwrite $n"
       n=$((n + 1))
     fi
     sleep 0.1
   done) &
fi
spam=$(sed -n 's/.*novacron\.spam=\([0-9][0-9]*\).*/\1/p' /proc/cmdline)
if [ -n "$spam" ]; then
  line=$(printf 'spam %095d' 0)
  (while true; do
     j=0; while [ $j -lt "$spam" ]; do echo "$line"; j=$((j + 1)); done
     sleep 0.1
   done) &
fi
i=1
while true; do
  echo "tick $i"
  i=$((i + 1))
  sleep 1
done
SH
chmod +x "$root/init"

(cd "$root" && find . | cpio -o -H newc --quiet | gzip -9) > "$work/initrd.img"
cp "$work/kernel/boot/vmlinuz-$kver" "$work/vmlinuz"
if [[ -f "$out/disk.qcow2" ]]; then
  cp "$out/disk.qcow2" "$work/disk.qcow2"
else
  qemu-img create -q -f qcow2 "$work/disk.qcow2" 64M
fi
cat > "$work/image.json" <<JSON
{
  "version": $version,
  "name": "demo",
  "description": "NovaCron demo guest (Debian kernel $kver, busybox initramfs)",
  "disk": "disk.qcow2",
  "kernel": "vmlinuz",
  "initrd": "initrd.img",
  "cmdline": "console=ttyS0 quiet panic=-1"
}
JSON
mv "$work/vmlinuz" "$work/initrd.img" "$work/disk.qcow2" "$out/"
mv "$work/image.json" "$out/image.json"   # last: its presence marks the build complete
echo "demo image built in $out (kernel $kver)"
