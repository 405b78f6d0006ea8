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

DIR=${VMSD_QEMU10_DIR:-$HOME/.cache/vmsd/qemu-10.0}
DIR=${DIR%/}
SUITE=bookworm-backports
WANT_MAJOR_MINOR=10.0
MARKER=.vmsd-qemu10
DEFAULT_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
QEMU_PKGS=(qemu-system-x86 qemu-system-common qemu-system-data seabios)

log() { echo "fetch-qemu10: $*" >&2; }
die() { echo "fetch-qemu10: error: $*" >&2; exit 1; }

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

# ---- preconditions -----------------------------------------------------------
for tool in apt-get apt-cache dpkg dpkg-deb dpkg-query ldd flock mktemp; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found; this script needs a Debian bookworm (amd64) host"
done
arch=$(dpkg --print-architecture)
[ "$arch" = amd64 ] || die "host architecture is '$arch'; only amd64 is supported"
codename=$( (. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}") || true)
if [ "$codename" != bookworm ]; then
    log "warning: host is '${codename:-unknown}', not Debian bookworm; trying anyway"
fi

# Mirror and keyring of the host's first enabled "deb" entry for bookworm:
# deb822 stanzas in sources.list.d/*.sources, then one-line entries in
# sources.list and sources.list.d/*.list, as apt reads them.
APT_SOURCES_LIST=/etc/apt/sources.list
APT_SOURCES_DIR=/etc/apt/sources.list.d
mirror="" keyring=""
shopt -s nullglob
deb822_files=("$APT_SOURCES_DIR"/*.sources)
oneline_files=("$APT_SOURCES_DIR"/*.list)
shopt -u nullglob
[ -r "$APT_SOURCES_LIST" ] && oneline_files=("$APT_SOURCES_LIST" "${oneline_files[@]}")
if [ "${#deb822_files[@]}" -gt 0 ]; then
    read -r mirror keyring < <(awk '
        function flush() {
            if (!done && enabled && types ~ / deb / && suites ~ / bookworm / && uri != "") { print uri, key; done = 1 }
            types = ""; uri = ""; suites = ""; key = ""; enabled = 1
        }
        FNR == 1 { flush() }                  # a stanza ends with its file
        /^[[:space:]]*#/ { next }
        /^[[:space:]]*$/ { flush(); next }
        tolower($1) == "types:"     { $1 = ""; types = $0 " " }
        tolower($1) == "uris:"      { uri = $2 }
        tolower($1) == "suites:"    { $1 = ""; suites = $0 " " }
        tolower($1) == "signed-by:" { key = $2 }  # a path; an inline key leaves it empty
        tolower($1) == "enabled:"   { enabled = tolower($2) != "no" }
        END { flush() }' "${deb822_files[@]}") || true
fi
if [ -z "$mirror" ] && [ "${#oneline_files[@]}" -gt 0 ]; then
    # deb [opt=value ...] URI SUITE COMPONENT...
    read -r mirror keyring < <(awk '
        { sub(/#.*/, "") }
        $1 == "deb" {
            i = 2; key = ""
            if ($2 ~ /^\[/) {
                for (; i <= NF; i++) {
                    if ($i ~ /signed-by=/) { key = $i; sub(/.*signed-by=/, "", key); sub(/\].*/, "", key) }
                    if ($i ~ /\]$/) { i++; break }
                }
            }
            if ($(i + 1) == "bookworm") { print $i, key; exit }
        }' "${oneline_files[@]}") || true
fi
mirror=${VMSD_DEBIAN_MIRROR:-$mirror}
[ -n "$mirror" ] || die "no apt source for bookworm in $APT_SOURCES_DIR/*.sources, $APT_SOURCES_LIST or" \
    "$APT_SOURCES_DIR/*.list; add one, or set VMSD_DEBIAN_MIRROR to the URL of a Debian mirror"
mirror=${mirror%/}
case "$keyring" in /*) [ -r "$keyring" ] || keyring="" ;; *) keyring="" ;; esac
keyring=${keyring:-$DEFAULT_KEYRING}
[ -r "$keyring" ] || die "keyring $keyring not found (apt-get install debian-archive-keyring)"

# ---- one fetch at a time ------------------------------------------------------
parent=$(dirname "$DIR")
mkdir -p "$parent" || die "cannot create $parent"
exec 9>"$parent/.$(basename "$DIR").lock"
flock 9
if works "$DIR"; then   # another process fetched it while we waited
    log "QEMU $WANT_MAJOR_MINOR already present in $DIR"
    exit 0
fi
if [ -e "$DIR" ] && [ ! -e "$DIR/$MARKER" ] && [ -n "$(ls -A "$DIR" 2>/dev/null)" ]; then
    die "$DIR exists, is not empty and was not made by this script; remove it or set VMSD_QEMU10_DIR"
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/vmsd-qemu10.XXXXXX")
STAGE="$parent/.$(basename "$DIR").partial.$$"
cleanup() { rm -rf "$TMP" "$STAGE"; }
trap cleanup EXIT
chmod 755 "$TMP"
mkdir -p "$TMP/lists/partial" "$TMP/cache/archives/partial" "$TMP/debs" "$STAGE"
if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then
    chown _apt "$TMP/debs"    # apt downloads as the unprivileged _apt user when run as root
fi

APT_OPTS=(
    -o "Dir::Etc::SourceList=$TMP/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::Etc::Preferences=/dev/null"
    -o "Dir::Etc::PreferencesParts=/dev/null"
    -o "Dir::State::Lists=$TMP/lists"
    -o "Dir::Cache=$TMP/cache"
    -o "APT::Get::List-Cleanup=false"
)

# apt_update SUITE...: a private sources.list with these suites, then update.
apt_update() {
    local s
    : >"$TMP/sources.list"
    for s in "$@"; do
        echo "deb [signed-by=$keyring] $mirror $s main" >>"$TMP/sources.list"
    done
    log "apt-get update ($*) from $mirror"
    if ! apt-get "${APT_OPTS[@]}" -q update >"$TMP/update.log" 2>&1 \
         || grep -Eq '^(E:|W: (Failed|GPG error|The repository|Some index))' "$TMP/update.log"; then
        cat "$TMP/update.log" >&2
        die "apt-get update failed for $* (private sources list: $(tr '\n' ' ' <"$TMP/sources.list"))"
    fi
}

# download SPEC...: apt-get download into $TMP/debs.
download() {
    (cd "$TMP/debs" && apt-get "${APT_OPTS[@]}" -q download "$@") >"$TMP/download.log" 2>&1 || {
        cat "$TMP/download.log" >&2
        return 1
    }
}

# Unpack a .deb into the stage; libraries under /lib go to /usr/lib.
unpack() {
    dpkg-deb -x "$1" "$STAGE" || die "dpkg -x $1 failed"
    if [ -d "$STAGE/lib/x86_64-linux-gnu" ] && [ ! -L "$STAGE/lib" ]; then
        mkdir -p "$STAGE/usr/lib/x86_64-linux-gnu"
        cp -a "$STAGE/lib/x86_64-linux-gnu/." "$STAGE/usr/lib/x86_64-linux-gnu/"
        rm -rf "$STAGE/lib/x86_64-linux-gnu"
    fi
}

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

qemu_deb=$(ls "$TMP"/debs/qemu-system-x86_*.deb 2>/dev/null | head -n1)
[ -n "$qemu_deb" ] || die "qemu-system-x86 .deb was not downloaded"
version=$(dpkg-deb -f "$qemu_deb" Version)
case "$version" in
    *:"$WANT_MAJOR_MINOR".*|"$WANT_MAJOR_MINOR".*) ;;
    *) die "$SUITE has qemu-system-x86 $version, not QEMU $WANT_MAJOR_MINOR" ;;
esac
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
echo "$version" >"$STAGE/$MARKER"
rm -rf "$DIR"
mv "$STAGE" "$DIR"
log "$(LD_LIBRARY_PATH=$DIR/usr/lib/x86_64-linux-gnu "$DIR/usr/bin/qemu-system-x86_64" --version | head -n1) in $DIR"
