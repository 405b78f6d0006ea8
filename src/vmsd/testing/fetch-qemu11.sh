#!/usr/bin/env bash
# Fetch QEMU 11.1 from Debian sid into a private folder, without installing it
# and without building it: the system QEMU 7.2 stays untouched.
#
#   DIR=${VMSD_QEMU11_DIR:-$HOME/.cache/vmsd/qemu-11.1}
#
# sid's QEMU needs a newer glibc than bookworm's, so this fetches
# qemu-system-{x86,common,data}, seabios, ipxe-qemu and their whole dependency
# closure, glibc included, from sid (the host's own Debian mirror, read from its
# apt sources as fetch-qemu10.sh does), unpacks every package with `dpkg -x`
# into $DIR, and runs QEMU through sid's dynamic loader with sid's libraries
# only.  $DIR/bin/qemu-system-x86_64 is the command to run: a wrapper that
# execs that loader (same PID, descriptors and environment, so it can be the
# argv[0] of a QEMU cpr-exec-command).  Packages that are no libraries
# (systemd, debconf, passwd, ...) are left out of the closure.
#
# VMSD_QEMU11_VERSION (default 11.1) is the upstream major.minor required of
# sid's qemu-system-x86; the script stops when sid has another.
#
# Idempotent: exits at once when $DIR already holds a working QEMU of that version.
set -euo pipefail

PROG=fetch-qemu11
ENV_VAR=VMSD_QEMU11_DIR
DIR=${VMSD_QEMU11_DIR:-$HOME/.cache/vmsd/qemu-11.1}
DIR=${DIR%/}
MARKER=.vmsd-qemu11
SUITE=sid
WANT_MAJOR_MINOR=${VMSD_QEMU11_VERSION:-11.1}
QEMU_PKGS=(qemu-system-x86 qemu-system-common qemu-system-data seabios ipxe-qemu)
# Not needed to run QEMU, and their dependencies (PAM, debconf front ends, a
# second systemd library) would be dragged in with them.
EXCLUDE=" adduser base-passwd cdebconf debconf dpkg init-system-helpers login login.defs opensysusers passwd
          perl-base sensible-utils systemd systemd-standalone-sysusers systemd-sysv systemd-timesyncd "
WRAPPER=bin/qemu-system-x86_64
LIB=usr/lib/x86_64-linux-gnu
LOADER=$LIB/ld-linux-x86-64.so.2
DEPENDS_OPTS=(--no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces --no-enhances)

# shellcheck source=fetch-qemu-common.sh
. "$(dirname "${BASH_SOURCE[0]}")/fetch-qemu-common.sh"

# Does folder $1 hold a QEMU $WANT_MAJOR_MINOR that runs through its wrapper?
works() {
    local out
    [ -x "$1/$WRAPPER" ] && [ -x "$1/$LOADER" ] || return 1
    out=$("$1/$WRAPPER" --version 2>&1 </dev/null) || return 1
    grep -Eq "version ${WANT_MAJOR_MINOR//./\\.}([.[:space:]]|$)" <<<"$out"
}

if works "$DIR"; then
    log "QEMU $WANT_MAJOR_MINOR already present in $DIR"
    exit 0
fi

check_host
host_mirror
lock_and_stage "$WANT_MAJOR_MINOR"

# closure PACKAGE...: the packages and everything they depend on (Depends and
# Pre-Depends, first alternative of each), breadth first, without the excluded
# ones and without virtual packages (a library QEMU needs is never only virtual:
# the loader check below would say so).
closure() {
    local -A seen=()
    local -a level=("$@") next
    local p
    while [ "${#level[@]}" -gt 0 ]; do
        for p in "${level[@]}"; do seen[$p]=1; done
        mapfile -t next < <(apt-cache "${APT_OPTS[@]}" depends "${DEPENDS_OPTS[@]}" "${level[@]}" | awk '
            /^[^ ]/ { alt = 0; next }                       # a package of this level
            /^ [ |](Pre)?Depends: / {
                take = !alt; alt = ($1 ~ /^\|/)             # "|Depends:" has another alternative after it
                if (take && $2 !~ /^</) print $2
            }' | sort -u)
        level=()
        for p in "${next[@]}"; do
            [ -n "${seen[$p]:-}" ] && continue
            case "$EXCLUDE" in *" $p "*) continue ;; esac
            level+=("$p")
        done
    done
    printf '%s\n' "${!seen[@]}" | sort
}

apt_update "$SUITE"
mapfile -t pkgs < <(closure "${QEMU_PKGS[@]}")
log "downloading ${#pkgs[@]} packages from $SUITE: ${pkgs[*]}"
specs=()
for p in "${pkgs[@]}"; do specs+=("$p/$SUITE"); done
download "${specs[@]}" || die "apt-get download failed"
version=$(deb_version qemu-system-x86 "$WANT_MAJOR_MINOR")
log "qemu-system-x86 $version"
for deb in "$TMP"/debs/*.deb; do unpack "$deb"; done
printf '%s\n' "${pkgs[@]}" >"$STAGE/packages.txt"

[ -x "$STAGE/usr/bin/qemu-system-x86_64" ] || die "qemu-system-x86_64 missing after unpacking"
[ -x "$STAGE/$LOADER" ] || die "sid's libc6 has no $LOADER"
# Every library QEMU needs must come from the folder, none from the host.
missing=$("$STAGE/$LOADER" --library-path "$STAGE/$LIB" --list "$STAGE/usr/bin/qemu-system-x86_64" 2>&1 \
          | awk '/not found/ { print $1 }' | sort -u)
[ -z "$missing" ] || die "libraries missing from the closure: $(echo $missing)"

# The wrapper finds its folder from its own path, so the stage can be renamed;
# the private firmware folders come before QEMU's compiled-in /usr/share/qemu
# (the host's QEMU 7.2 data).
mkdir -p "$STAGE/bin"
cat >"$STAGE/$WRAPPER" <<EOF
#!/bin/sh
# QEMU $version from Debian $SUITE with its own glibc (written by $PROG.sh).
# exec keeps the PID, descriptors and environment: usable as a cpr-exec-command.
root=\$(cd "\$(dirname "\$0")/.." && pwd) || exit 127
QEMU_MODULE_DIR=\$root/$LIB/qemu
export QEMU_MODULE_DIR
exec "\$root/$LOADER" --library-path "\$root/$LIB" "\$root/usr/bin/qemu-system-x86_64" \\
    -L "\$root/usr/share/qemu" -L "\$root/usr/share/seabios" -L "\$root/usr/lib/ipxe/qemu" "\$@"
EOF
chmod 755 "$STAGE/$WRAPPER"

works "$STAGE" || {
    "$STAGE/$WRAPPER" --version >&2 || true
    die "the unpacked qemu-system-x86_64 does not report version $WANT_MAJOR_MINOR"
}
put_in_place "$version"
log "$("$DIR/$WRAPPER" --version | head -n1) in $DIR (run $DIR/$WRAPPER)"
