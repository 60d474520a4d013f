#!/usr/bin/env bash
# Build the balloon test guest once and cache it.
#
# Output (printed as the last line of stdout, everything else goes to stderr):
#   $BALLOON_GUEST_CACHE/$KERNEL_FLAVOUR/
#       vmlinuz             Debian kernel (bzImage), taken from the package, not
#                           installed
#       vmlinux             the same kernel uncompressed; QEMU boots it through
#                           its PVH entry point, skipping the in-guest
#                           decompression that costs ~2.5 s under TCG
#       initramfs.cpio.gz   busybox + memhog + virtio modules + /init
#       info                key=value facts about the build (kernel release...)
#
# Environment:
#   BALLOON_GUEST_CACHE  cache root (default ~/.cache/balloon-autoscaler/guest)
#   KERNEL_FLAVOUR       kernel series to use: 6.1 (default) or 6.12 (both
#                        from bookworm-security on Debian 12); any X.Y apt
#                        offers as linux-image-X.Y.*-amd64 works
#   KERNEL_PACKAGE       pin an exact package of that series, e.g.
#                        linux-image-6.1.0-56-amd64-unsigned
#
# Idempotent: when the outputs exist and were built from the current build.sh,
# init.sh and memhog.c, it exits at once. The kernel is cached separately, so
# editing memhog.c only rebuilds the initramfs. Delete the cache directory to
# pick up a newer kernel package.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${BALLOON_GUEST_CACHE:-$HOME/.cache/balloon-autoscaler/guest}
FLAVOUR=${KERNEL_FLAVOUR:-6.1}
KERNEL_PACKAGE=${KERNEL_PACKAGE:-}
OUT=$CACHE/$FLAVOUR

# Modules the balloon needs, dependencies first. Whichever of them the kernel
# has built in are skipped (6.1 builds all as modules, 6.12 only the balloon).
MODULES=(virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio virtio_pci virtio_balloon)
# Shipped but loaded by /init only on request: brd (RAM disk) for the
# pagecache_mib= kernel parameter, whose reads fill the page cache with clean
# pages that reclaim can take back. Skipped when the kernel has no such module.
OPTIONAL_MODULES=(brd)

log() { echo "guest-build: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

inputs_hash() {
    {
        cat "$HERE/build.sh" "$HERE/init.sh" "$HERE/memhog.c"
        echo "KERNEL_PACKAGE=$KERNEL_PACKAGE"
    } | sha256sum | cut -d' ' -f1
}

is_built() {
    [[ -s $OUT/vmlinuz && -s $OUT/initramfs.cpio.gz && -f $OUT/stamp ]] &&
        [[ $(<"$OUT/stamp") == "$1" ]]
}

want=$(inputs_hash)
if is_built "$want"; then
    echo "$OUT"
    exit 0
fi

mkdir -p "$CACHE"
# Parallel test workers may all call us at once: build under a lock and let the
# others reuse the result.
exec 9>"$CACHE/.lock"
flock 9
if is_built "$want"; then
    echo "$OUT"
    exit 0
fi

# Leftovers of a build that was killed; safe to remove while we hold the lock.
rm -rf "$CACHE"/build.*
WORK=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- host tools -------------------------------------------------------------

apt_updated=0
apt_update() {
    if ((apt_updated == 0)); then
        [[ $(id -u) == 0 ]] || die "apt package lists are missing or stale; run 'apt-get update' as root"
        log "apt-get update"
        apt-get update -qq >&2
        apt_updated=1
    fi
}

# Install only what is missing, in one apt-get call.
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v musl-gcc >/dev/null || missing+=(musl-tools)
command -v cpio >/dev/null || missing+=(cpio)
command -v xz >/dev/null || missing+=(xz-utils)      # .ko.xz modules (6.12)
command -v zstd >/dev/null || missing+=(zstd)        # .ko.zst, for newer kernels
command -v flock >/dev/null || missing+=(util-linux)
command -v readelf >/dev/null || missing+=(binutils)   # PVH note check
if ((${#missing[@]})); then
    [[ $(id -u) == 0 ]] || die "missing packages: ${missing[*]} (install them as root)"
    # A fresh machine has no package lists yet.
    apt-cache show "${missing[0]}" >/dev/null 2>&1 || apt_update
    log "installing ${missing[*]}"
    # dpkg's progress output goes to a log, shown only if the install fails.
    apt_install() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >"$WORK/apt.log" 2>&1 || { cat "$WORK/apt.log" >&2; return 1; }
    }
    # Stale lists point at versions the mirror has dropped: refresh, retry.
    apt_install || { apt_update && apt_install; }
fi

# Fetch a .deb into $WORK without installing it. Debian mirrors drop old
# versions, so a stale package list gives 404s: refresh once and retry.
# (The sandbox option only silences apt's warning that _apt cannot write here.)
download_deb() {
    local pkg=$1
    (cd "$WORK" && apt-get download -qq -o APT::Sandbox::User=root "$pkg" >&2) || {
        apt_update
        (cd "$WORK" && apt-get download -qq -o APT::Sandbox::User=root "$pkg" >&2)
    } || die "cannot download $pkg"
    ls "$WORK/${pkg}_"*.deb
}

# --- kernel -----------------------------------------------------------------

# Newest linux-image-X.Y.* package for the standard amd64 flavour (not cloud,
# rt or dbg). The -unsigned variant is preferred: the same kernel without the
# Secure Boot signature, which QEMU's direct kernel boot does not use; the
# signed package is taken when apt offers no unsigned one.
resolve_kernel_package() {
    local re names base pkg
    re="^linux-image-${FLAVOUR//./\\.}\\.[0-9][0-9a-z.+~-]*[0-9]-amd64(-unsigned)?\$"
    names=$(apt-cache pkgnames linux-image- | grep -E "$re" || true)
    if [[ -z $names ]]; then
        apt_update
        names=$(apt-cache pkgnames linux-image- | grep -E "$re" || true)
    fi
    [[ -n $names ]] || die "apt offers no linux-image-$FLAVOUR.*-amd64 package"
    for base in $(sed 's/-unsigned$//' <<<"$names" | sort -uV -r); do
        for pkg in "$base-unsigned" "$base"; do
            # Listed names include packages known only by reference; a real
            # one has a Filename. (No `| grep -q`: with pipefail its early
            # exit would turn apt-cache's SIGPIPE into a failure.)
            if grep -qx "$pkg" <<<"$names" &&
                [[ $(apt-cache show --no-all-versions "$pkg" 2>/dev/null) == *$'\nFilename: '* ]]; then
                echo "$pkg"
                return
            fi
        done
    done
    die "no downloadable linux-image-$FLAVOUR.*-amd64 package"
}

# busybox insmod cannot be relied on to decompress: store plain .ko.
unpack_module() {
    case $1 in
        *.xz) xz -dc "$1" >"$2" ;;
        *.zst) zstd -qdc "$1" >"$2" ;;
        *) cp "$1" "$2" ;;
    esac
}

# modinfo-style "depends=" field, read straight from the .modinfo strings so
# that kmod does not have to be installed.
module_depends() {
    tr '\0' '\n' <"$1" | sed -n 's/^depends=//p' | tr ',' ' '
}

# Uncompressed ELF kernel out of a bzImage (what the kernel's
# scripts/extract-vmlinux does): try every offset where a compressed stream
# may start until one decompresses to an ELF file. Trailing bytes after the
# stream make the decompressors complain, hence the ignored status.
extract_vmlinux() {
    local img=$1 out=$2 tool_magic tool magic off
    # (bash strings stop at NUL, so the xz magic loses its last byte: harmless)
    for tool_magic in "xz:"$'\xfd7zXZ' "zstd:"$'\x28\xb5\x2f\xfd' "gzip:"$'\x1f\x8b\x08'; do
        tool=${tool_magic%%:*} magic=${tool_magic#*:}
        for off in $(LC_ALL=C grep -aboF -- "$magic" "$img" | cut -d: -f1); do
            tail -c +$((off + 1)) "$img" | "$tool" -dc >"$out" 2>/dev/null || true
            [[ $(head -c 4 "$out" | od -An -c | tr -d ' ') == '177ELF' ]] && return 0
        done
    done
    rm -f "$out"
    return 1
}

# QEMU's -kernel accepts an ELF vmlinux only if it carries the PVH entry note
# (XEN_ELFNOTE_PHYS32_ENTRY, type 0x12; CONFIG_PVH=y, as in Debian's kernels).
has_pvh_note() {
    [[ $(readelf -n "$1" 2>/dev/null) == *"Xen"*"0x00000012"* ]]
}

# Extract vmlinuz and the needed modules into $OUT/kernel. Reused as long as
# the cached package is the requested one (or none was requested) and the
# module lists have not changed.
prepare_kernel() {
    local kdir=$OUT/kernel
    local wanted="${MODULES[*]} / ${OPTIONAL_MODULES[*]}"
    if [[ -s $kdir/vmlinuz && -f $kdir/package && -f $kdir/modules.wanted ]] &&
        [[ $(<"$kdir/modules.wanted") == "$wanted" ]] &&
        [[ -z $KERNEL_PACKAGE || $(<"$kdir/package") == "$KERNEL_PACKAGE" ]]; then
        log "kernel: cached $(<"$kdir/package") ($(<"$kdir/release"))"
        return
    fi
    local pkg=${KERNEL_PACKAGE:-$(resolve_kernel_package)}
    log "kernel: downloading $pkg"
    local deb
    deb=$(download_deb "$pkg")
    local x=$WORK/kernel-root
    dpkg-deb -x "$deb" "$x"
    rm -f "$deb"

    local release
    release=$(ls "$x/lib/modules")
    [[ $(wc -w <<<"$release") == 1 ]] || die "expected one kernel release in $pkg, got: $release"
    local mroot=$x/lib/modules/$release
    local new=$WORK/kernel
    mkdir -p "$new/modules"
    cp "$x/boot/vmlinuz-$release" "$new/vmlinuz"
    cp "$x/boot/config-$release" "$new/config"
    if extract_vmlinux "$new/vmlinuz" "$new/vmlinux" && has_pvh_note "$new/vmlinux"; then
        log "kernel: extracted vmlinux (PVH boot)"
    else
        rm -f "$new/vmlinux"
        log "kernel: no bootable vmlinux (not extractable or no PVH note); use vmlinuz"
    fi

    # modules.builtin lists the modules compiled into the kernel; the package
    # ships no modules.dep (depmod runs at install time), so dependencies are
    # checked from each module's own depends= field instead.
    local mod f dep have=" " order=()
    for mod in "${MODULES[@]}"; do
        if grep -Eq "/$mod\\.ko\$" "$mroot/modules.builtin"; then
            log "kernel: $mod is built in"
            have+="$mod "
            continue
        fi
        f=$(find "$mroot/kernel" -name "$mod.ko" -o -name "$mod.ko.xz" -o -name "$mod.ko.zst" |
            head -n1)
        [[ -n $f ]] || die "$mod is neither built into $release nor shipped as a module"
        unpack_module "$f" "$new/modules/$mod.ko"
        for dep in $(module_depends "$new/modules/$mod.ko"); do
            [[ $have == *" $dep "* ]] || die "$mod needs $dep, which is not loaded before it"
        done
        log "kernel: $mod is a module ($(basename "$f"))"
        have+="$mod "
        order+=("$mod")
    done
    for mod in "${OPTIONAL_MODULES[@]}"; do
        if grep -Eq "/$mod\\.ko\$" "$mroot/modules.builtin"; then
            log "kernel: optional $mod is built in"
            continue
        fi
        f=$(find "$mroot/kernel" -name "$mod.ko" -o -name "$mod.ko.xz" -o -name "$mod.ko.zst" |
            head -n1)
        if [[ -z $f ]]; then
            log "kernel: optional $mod is not available; skipped"
            continue
        fi
        unpack_module "$f" "$new/modules/$mod.ko"
        for dep in $(module_depends "$new/modules/$mod.ko"); do
            [[ $have == *" $dep "* ]] || die "optional $mod needs $dep, which is not loaded"
        done
        log "kernel: optional $mod is a module ($(basename "$f"))"
    done
    printf '%s\n' "${order[@]}" >"$new/modules.order"
    echo "$wanted" >"$new/modules.wanted"
    echo "$pkg" >"$new/package"
    echo "$release" >"$new/release"
    rm -rf "$x" "$kdir"
    mkdir -p "$OUT"
    mv "$new" "$kdir"
}

# --- busybox ----------------------------------------------------------------

# busybox-static is downloaded rather than installed: installing it would
# remove the dynamic "busybox" package that many hosts need for their own
# initramfs.
prepare_busybox() {
    local bdir=$CACHE/busybox
    [[ -x $bdir/busybox ]] && return
    log "busybox: downloading busybox-static"
    local deb x=$WORK/busybox-root
    deb=$(download_deb busybox-static)
    dpkg-deb -x "$deb" "$x"
    mkdir -p "$bdir"
    install -m 0755 "$x/bin/busybox" "$bdir/busybox.new"
    mv "$bdir/busybox.new" "$bdir/busybox"
}

# --- initramfs --------------------------------------------------------------

build_initramfs() {
    local root=$WORK/initramfs kdir=$OUT/kernel
    mkdir -p "$root"/{bin,dev,etc,lib/modules,proc,sys,tmp}

    install -m 0755 "$CACHE/busybox/busybox" "$root/bin/busybox"
    local applet
    for applet in $("$root/bin/busybox" --list); do
        [[ $applet == busybox ]] || ln -s busybox "$root/bin/$applet"
    done

    # Static, so the initramfs needs no libc; musl keeps it small (~50 KiB).
    musl-gcc -static -Os -s -Wall -Wextra -o "$root/bin/memhog" "$HERE/memhog.c"

    install -m 0755 "$HERE/init.sh" "$root/init"
    local ko
    for ko in "$kdir"/modules/*.ko; do # none when everything is built in
        [[ -e $ko ]] && cp "$ko" "$root/lib/modules/"
    done
    cp "$kdir/modules.order" "$root/etc/modules.order"

    # newc is the only cpio format the kernel unpacks; --owner makes every
    # file root-owned in the guest even when built by an ordinary user.
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
        cpio -o -H newc --owner=0:0 --quiet) | gzip -9n >"$WORK/initramfs.cpio.gz"
}

prepare_kernel
prepare_busybox
build_initramfs

rm -f "$OUT/stamp"
# Hard links: the kernel images are large and already cached under kernel/.
for img in vmlinuz vmlinux; do
    rm -f "$OUT/$img"
    if [[ -f $OUT/kernel/$img ]]; then
        ln -f "$OUT/kernel/$img" "$OUT/$img" 2>/dev/null || cp "$OUT/kernel/$img" "$OUT/$img"
    fi
done
{
    echo "kernel_package=$(<"$OUT/kernel/package")"
    echo "kernel_release=$(<"$OUT/kernel/release")"
    echo "modules=$(paste -sd, "$OUT/kernel/modules.order")"
    optional=()
    for mod in "${OPTIONAL_MODULES[@]}"; do
        if [[ -f $OUT/kernel/modules/$mod.ko ]]; then optional+=("$mod"); fi
    done
    echo "optional_modules=$(IFS=,; echo "${optional[*]}")"
    echo "pvh_vmlinux=$([[ -f $OUT/vmlinux ]] && echo yes || echo no)"
    echo "busybox=$("$CACHE/busybox/busybox" --help 2>&1 | sed -n 1p)"
} >"$WORK/info"
mv "$WORK/initramfs.cpio.gz" "$OUT/initramfs.cpio.gz"
mv "$WORK/info" "$OUT/info"
# The stamp goes last: its presence means the outputs above are complete.
echo "$want" >"$OUT/stamp"
log "built $OUT ($(<"$OUT/kernel/release"))"
echo "$OUT"
