#!/usr/bin/env bash
# Fetch QEMU 10.0 from Debian bookworm-backports into a private folder, without
# installing it: the system QEMU 7.2 (the other interop peer) stays untouched.
#
#   DIR=${VMSD_QEMU10_DIR:-$HOME/.cache/vmsd/qemu-10.0}
#
# The mirror is the host's: the first bookworm entry of its apt sources, or
# $VMSD_DEBIAN_MIRROR; with neither the script stops (it names no mirror of its
# own).  The packages are downloaded with a private apt configuration (the
# host's sources are only read for that entry, nothing under /etc/apt or
# /var/lib/apt is written) and unpacked with `dpkg -x` into $DIR.  Besides
# qemu-system-{x86,common,data} this fetches seabios from backports (QEMU 10.0
# depends on seabios >> 1.16.3, bookworm has 1.16.2).  Shared libraries the
# binary needs but the host lacks are fetched too (from backports if there,
# else from bookworm) and unpacked into $DIR/usr/lib/x86_64-linux-gnu; they are
# listed in $DIR/extra-packages.txt and callers must then set LD_LIBRARY_PATH to
# that folder (vmsd/testing/qemu10.py, which runs this script from the
# installed package, does).
#
# Idempotent: exits at once when $DIR already holds a working QEMU 10.0.
set -euo pipefail

PROG=fetch-qemu10
ENV_VAR=VMSD_QEMU10_DIR
DIR=${VMSD_QEMU10_DIR:-$HOME/.cache/vmsd/qemu-10.0}
DIR=${DIR%/}
SUITE=bookworm-backports
WANT_MAJOR_MINOR=10.0
MARKER=.vmsd-qemu10
QEMU_PKGS=(qemu-system-x86 qemu-system-common qemu-system-data seabios)

# shellcheck source=fetch-qemu-common.sh
. "$(dirname "${BASH_SOURCE[0]}")/fetch-qemu-common.sh"

# Does folder $1 hold a QEMU $WANT_MAJOR_MINOR that runs?
works() {
    local bin=$1/usr/bin/qemu-system-x86_64 out
    [ -x "$bin" ] || return 1
    out=$(LD_LIBRARY_PATH=$1/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
          "$bin" --version 2>&1 </dev/null) || return 1
    grep -Eq "version ${WANT_MAJOR_MINOR//./\\.}([.[:space:]]|$)" <<<"$out"
}

if works "$DIR"; then
    log "QEMU $WANT_MAJOR_MINOR already present in $DIR"
    exit 0
fi

check_host dpkg-query ldd
host_mirror
lock_and_stage "$WANT_MAJOR_MINOR"

missing_libs() {
    LD_LIBRARY_PATH=$STAGE/usr/lib/x86_64-linux-gnu ldd "$STAGE/usr/bin/qemu-system-x86_64" 2>/dev/null \
        | awk '/not found/ { print $1 }' | sort -u
}

# Package names a .deb depends on (first alternative, no version).
deps_of() {
    { dpkg-deb -f "$1" Depends; dpkg-deb -f "$1" Pre-Depends; } | tr ',' '\n' | sed -e 's/|.*//' -e 's/(.*)//' -e 's/:any//' \
        | awk 'NF { print $1 }'
}

installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

# ---- QEMU 10.0 itself ----------------------------------------------------------
apt_update "$SUITE"
specs=()
for p in "${QEMU_PKGS[@]}"; do specs+=("$p/$SUITE"); done
log "downloading ${QEMU_PKGS[*]} from $SUITE"
download "${specs[@]}" || die "apt-get download ${specs[*]} failed"

version=$(deb_version qemu-system-x86 "$WANT_MAJOR_MINOR")
log "qemu-system-x86 $version"
for deb in "$TMP"/debs/*.deb; do unpack "$deb"; done
[ -x "$STAGE/usr/bin/qemu-system-x86_64" ] || die "qemu-system-x86_64 missing after unpacking"

# ---- shared libraries (and ipxe) the host lacks ----------------------------------
extra=()
need_ipxe=0
[ -d /usr/lib/ipxe/qemu ] || need_ipxe=1
missing=$(missing_libs)
if [ -n "$missing" ] || [ "$need_ipxe" = 1 ]; then
    [ -z "$missing" ] || log "libraries missing on this host: $(echo $missing)"
    apt_update "$SUITE" bookworm   # libraries not in backports come from bookworm
    done_pkgs=" ${QEMU_PKGS[*]} qemu-system-gui qemu-block-extra "
    [ "$need_ipxe" = 1 ] && todo=(ipxe-qemu) || todo=()
    for round in 1 2 3 4 5; do
        if [ -n "$missing" ]; then
            for deb in "$TMP"/debs/*.deb; do
                for d in $(deps_of "$deb"); do
                    case "$done_pkgs" in *" $d "*) continue ;; esac
                    case "$d" in libc6|libgcc-s1|qemu-*|seabios|ipxe-qemu) continue ;; esac
                    installed "$d" && continue
                    todo+=("$d")
                    done_pkgs+="$d "
                done
            done
        fi
        [ "${#todo[@]}" -gt 0 ] || break
        for p in "${todo[@]}"; do
            before=$(ls "$TMP/debs")
            # Prefer the backports build; fall back to bookworm's.
            download "$p/$SUITE" 2>/dev/null || download "$p" || die "cannot download $p"
            for deb in "$TMP"/debs/*.deb; do
                grep -qxF "$(basename "$deb")" <<<"$before" || unpack "$deb"
            done
            extra+=("$p")
        done
        todo=()
        missing=$(missing_libs)
        [ -n "$missing" ] || break
    done
    [ -z "$missing" ] || die "still missing after fetching ${extra[*]:-nothing}: $(echo $missing)"
    log "extra packages unpacked into $DIR: ${extra[*]}"
fi
printf '%s\n' "${extra[@]}" | sed '/^$/d' >"$STAGE/extra-packages.txt"

# ---- verify and put in place ---------------------------------------------------
works "$STAGE" || {
    LD_LIBRARY_PATH=$STAGE/usr/lib/x86_64-linux-gnu "$STAGE/usr/bin/qemu-system-x86_64" --version >&2 || true
    die "the unpacked qemu-system-x86_64 does not report version $WANT_MAJOR_MINOR"
}
put_in_place "$version"
log "$(LD_LIBRARY_PATH=$DIR/usr/lib/x86_64-linux-gnu "$DIR/usr/bin/qemu-system-x86_64" --version | head -n1) in $DIR"
