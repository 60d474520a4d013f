#!/bin/sh
# /init of the balloon test guest (installed into the initramfs by build.sh).
#
# Runs as PID 1 under busybox sh. It brings up just enough of a system for the
# virtio balloon driver to work, then keeps tests/guest/memhog running.
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
read -r uptime _ </proc/uptime
echo "guest-init: ready kernel=$(uname -r) uptime_s=$uptime"

# Run memhog as a child so an OOM kill takes memhog, not init. Its
# oom_score_adj is raised to 1000 (the -1000 above is inherited and would
# otherwise make memhog unkillable, leaving the kernel nothing to kill and
# ending in a panic). memhog starts again with nothing held; a test that
# wants its load back re-sends the command.
while :; do
    sh -c 'echo 1000 >/proc/self/oom_score_adj; exec /bin/memhog /dev/ttyS1'
    status=$?
    echo "memhog died status=$status"
    # Also tell the control channel, so a host that only follows ctl.sock
    # sees it. Backgrounded: a stalled serial line must not block PID 1.
    echo "memhog died status=$status" >/dev/ttyS1 &
    sleep 1
done
