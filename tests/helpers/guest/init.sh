#!/bin/sh
# /init of the balloon test guest (installed into the initramfs by build.sh).
#
# Runs as PID 1 under busybox sh. It brings up just enough of a system for the
# virtio balloon driver to work, then keeps tests/helpers/guest/memhog running.
# Everything printed here goes to the console (ttyS0), which the host captures
# with `-serial file:console.log`. Lines start with "guest-init:" so that a
# test can tell them from kernel messages and memhog output.

# devtmpfs first: the initramfs has no /dev/console node (build.sh stays
# rootless, so it cannot mknod), so stdio is only usable after this.
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys

# PID 1 must never be the OOM victim: if it died the kernel would panic and
# the test would lose the guest instead of observing an OOM kill.
echo -1000 >/proc/self/oom_score_adj

# The load order (dependencies first) is computed by build.sh; modules that
# are built into this kernel are already left out of the list.
while read -r mod; do
    [ -n "$mod" ] || continue
    if insmod "/lib/modules/$mod.ko"; then
        echo "guest-init: loaded $mod"
    else
        echo "guest-init: FAILED to load $mod"
    fi
done </etc/modules.order

if [ -d /sys/bus/virtio/drivers/virtio_balloon ]; then
    echo "guest-init: virtio_balloon driver present"
else
    echo "guest-init: virtio_balloon driver MISSING"
fi
# pagecache_mib=N on the kernel command line: start with N MiB of clean page
# cache, which the kernel can reclaim under pressure (the guest has no disk and
# no swap, so otherwise nothing is reclaimable and the scan/reclaim counters
# never move). The cache comes from reading a RAM disk (brd) that was never
# written: brd allocates nothing for such sectors, so the reads cost only the
# page cache itself. The kernel drops a block device's page cache when its
# last opener closes it, so init keeps /dev/ram0 open on fd 3 for good.
pagecache_mib=0
for arg in $(cat /proc/cmdline); do
    case $arg in
        pagecache_mib=*) pagecache_mib=${arg#pagecache_mib=} ;;
    esac
done
case $pagecache_mib in
    '' | *[!0-9]*) echo "guest-init: bad pagecache_mib=$pagecache_mib"; pagecache_mib=0 ;;
esac
if [ "$pagecache_mib" -gt 0 ]; then
    # Built-in brd (no .ko shipped) already has /dev/ram0, of brd.rd_size.
    [ -e /lib/modules/brd.ko ] &&
        insmod /lib/modules/brd.ko rd_nr=1 rd_size=$((pagecache_mib * 1024))
    # (A failed `exec 3<` would end this shell, and PID 1 must not end.)
    if [ -b /dev/ram0 ]; then
        exec 3</dev/ram0
        dd if=/dev/ram0 of=/dev/null bs=1M count="$pagecache_mib" 2>/dev/null
        echo "guest-init: page cache $(grep '^Buffers:' /proc/meminfo | tr -s ' ')"
    else
        echo "guest-init: FAILED to fill the page cache: no /dev/ram0"
    fi
fi

read -r uptime _ </proc/uptime
echo "guest-init: ready kernel=$(uname -r) uptime_s=$uptime"

# Run memhog as a child so an OOM kill takes memhog, not init. Its
# oom_score_adj is raised to 1000 (the -1000 above is inherited and would
# otherwise make memhog unkillable, leaving the kernel nothing to kill and
# ending in a panic). memhog starts again with nothing held; a test that
# wants its load back re-sends the command.
while :; do
    sh -c 'echo 1000 >/proc/self/oom_score_adj; exec /bin/memhog /dev/ttyS1' 3<&-
    status=$?
    echo "memhog died status=$status"
    # Also tell the control channel, so a host that only follows ctl.sock
    # sees it. Backgrounded: a stalled serial line must not block PID 1.
    echo "memhog died status=$status" >/dev/ttyS1 &
    sleep 1
done
