#!/usr/bin/env bash
# Build the Vagrant box the Vagrantfile names (debian/bookworm64, libvirt provider) from
# Debian's package mirror, for hosts that cannot reach Vagrant Cloud, and add it:
#   bash vagrant/offline-box.sh [kvm|qemu]     # qemu: software emulation, where KVM is unusable
#   cd vagrant && vagrant up --provider=libvirt
# The box is a plain Debian 12 (systemd, OpenSSH, sudo, rsync) with Vagrant's user and
# insecure key, as the public box has; it trusts the CAs this host trusts (and takes its
# pip.conf), so a box built behind a TLS-inspecting proxy can still fetch from PyPI.
# Needs root, debootstrap, fdisk, qemu-utils and vagrant-libvirt.
set -euo pipefail

DRIVER=${1:-kvm}
WORK=${POSTWARDEN_BOX_DIR:-/var/lib/postwarden-box}
MIRROR=${POSTWARDEN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
KEY=$(find /usr/share /opt/vagrant -path '*/keys/vagrant.pub' 2>/dev/null | head -n 1 || true)
[[ $EUID -eq 0 ]] || { echo "offline-box: run as root" >&2; exit 1; }
[[ -n $KEY ]] || { echo "offline-box: Vagrant's insecure key (keys/vagrant.pub) not found" >&2; exit 1; }

mkdir -p "$WORK/root"
cd "$WORK"
loop=
cleanup() ( # a subshell: its `set +e` stays in it
    set +e
    mountpoint -q "$WORK/root" && umount -R "$WORK/root"
    [[ -n $loop ]] && losetup -d "$loop"
    true # also run by the EXIT trap, where a failure would become the script's status
)
trap cleanup EXIT

rm -f disk.raw
truncate -s 10G disk.raw
echo 'start=2048, type=83, bootable' | sfdisk -q disk.raw
# The partition through an offset loop device: partition scanning needs udev, which
# containers and CI machines often lack.
loop=$(losetup --offset $((2048 * 512)) --find --show disk.raw)
mkfs.ext4 -q -L root "$loop"
mount "$loop" root
echo "offline-box: debootstrap Debian 12 (log: $WORK/debootstrap.log)"
debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,dbus,udev,kmod,linux-image-amd64,grub-pc-bin,openssh-server,sudo,rsync,ca-certificates,python3,iproute2,procps,isc-dhcp-client,ifupdown,netbase \
    bookworm root "$MIRROR" >debootstrap.log 2>&1
uuid=$(blkid -s UUID -o value "$loop")
echo "UUID=$uuid / ext4 errors=remount-ro 0 1" >root/etc/fstab
echo debian-box >root/etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 debian-box\n' >root/etc/hosts
printf 'auto lo\niface lo inet loopback\n\nallow-hotplug eth0\niface eth0 inet dhcp\n' \
    >root/etc/network/interfaces
cp /etc/ssl/certs/ca-certificates.crt root/etc/ssl/certs/ca-certificates.crt
[[ -e /etc/pip.conf ]] && cp /etc/pip.conf root/etc/pip.conf
chroot root useradd -m -s /bin/bash vagrant
echo 'vagrant ALL=(ALL) NOPASSWD:ALL' >root/etc/sudoers.d/vagrant
chmod 0440 root/etc/sudoers.d/vagrant
install -d -m 0700 -o 1000 -g 1000 root/home/vagrant/.ssh
install -m 0600 -o 1000 -g 1000 "$KEY" root/home/vagrant/.ssh/authorized_keys
chroot root systemctl enable --quiet ssh

# GRUB by hand, as grub-install does for an MBR disk (grub-install itself cannot map an
# offset loop device to its disk): modules and grub.cfg in /boot/grub, core.img in the
# gap after the MBR, boot.img in the MBR.
mkdir -p root/boot/grub
cp -r root/usr/lib/grub/i386-pc root/boot/grub/
chroot root grub-mkimage -O i386-pc -o /boot/grub/i386-pc/core.img \
    -p '(hd0,msdos1)/boot/grub' biosdisk part_msdos ext2
kernel=$(cd root/boot && ls vmlinuz-* | head -n 1)
initrd=$(cd root/boot && ls initrd.img-* | head -n 1)
cat >root/boot/grub/grub.cfg <<CFG
set timeout=0
insmod part_msdos
insmod ext2
insmod linux
set root=(hd0,msdos1)
linux /boot/$kernel root=UUID=$uuid ro net.ifnames=0 biosdevname=0 console=ttyS0
initrd /boot/$initrd
boot
CFG
cp root/usr/lib/grub/i386-pc/boot.img root/boot/grub/i386-pc/core.img .
cleanup
loop=
dd if=boot.img of=disk.raw bs=446 count=1 conv=notrunc status=none
dd if=core.img of=disk.raw bs=512 seek=1 conv=notrunc status=none

qemu-img convert -O qcow2 disk.raw box.img
rm -f disk.raw boot.img core.img
printf '{"provider":"libvirt","format":"qcow2","virtual_size":10}\n' >metadata.json
printf 'Vagrant.configure("2") do |c|\n  c.vm.provider :libvirt do |l|\n    l.driver = "%s"\n  end\nend\n' \
    "$DRIVER" >Vagrantfile
tar czf debian-bookworm64-libvirt.box metadata.json Vagrantfile box.img
rm -f box.img
vagrant box add --force --name debian/bookworm64 "$WORK/debian-bookworm64-libvirt.box"
echo "offline-box: added debian/bookworm64 (libvirt, driver $DRIVER)"
