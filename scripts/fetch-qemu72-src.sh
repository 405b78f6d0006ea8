#!/usr/bin/env bash
# Fetch the two C files of QEMU 7.2 (Debian bookworm's qemu source package) that
# tests/test_xbzrle.py compiles as its reference: migration/xbzrle.c and
# util/cutils.c, into
#
#   DIR=${VMSD_QEMU72_SRC:-$HOME/.cache/vmsd/qemu-7.2-src}
#
# The mirror is the host's (its apt configuration's first bookworm repository,
# as `apt-get indextargets` lists it); the source package is downloaded with a
# private deb-src list and apt state under a temporary folder (nothing under
# /etc/apt or /var/lib/apt is written) and only those files are kept.
# Idempotent: exits at once when $DIR holds both files.
set -euo pipefail

DIR=${VMSD_QEMU72_SRC:-$HOME/.cache/vmsd/qemu-7.2-src}
DIR=${DIR%/}
FILES=(migration/xbzrle.c util/cutils.c)
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

log() { echo "fetch-qemu72-src: $*" >&2; }
die() { echo "fetch-qemu72-src: error: $*" >&2; exit 1; }

have() { local f; for f in "${FILES[@]}"; do [ -s "$DIR/$f" ] || return 1; done; }
if have; then
    log "QEMU 7.2 sources already in $DIR"
    exit 0
fi
for tool in apt-get tar mktemp; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found; this needs a Debian bookworm host"
done
mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null \
         | awk '$2 == "bookworm" { print $1; exit }')
[ -n "$mirror" ] || die "no bookworm repository in the host's apt sources"
[ -r "$KEYRING" ] || die "keyring $KEYRING not found (apt-get install debian-archive-keyring)"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/vmsd-qemu72-src.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
chmod 755 "$TMP"
mkdir -p "$TMP/lists/partial" "$TMP/cache/archives/partial" "$TMP/src"
if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then
    chown _apt "$TMP/src"  # apt downloads as the unprivileged _apt user when run as root
fi
echo "deb-src [signed-by=$KEYRING] ${mirror%/} bookworm main" >"$TMP/sources.list"
APT_OPTS=(
    -o "Dir::Etc::SourceList=$TMP/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$TMP/lists" -o "Dir::Cache=$TMP/cache" -o "APT::Get::List-Cleanup=false"
)
log "apt-get update (deb-src bookworm) from $mirror"
apt-get "${APT_OPTS[@]}" -qq update || die "apt-get update failed"
log "downloading the qemu source package"
(cd "$TMP/src" && apt-get "${APT_OPTS[@]}" -qq source --download-only qemu) || die "apt-get source qemu failed"
orig=$(ls "$TMP"/src/qemu_7.2*.orig.tar.* 2>/dev/null | head -n1)
[ -n "$orig" ] || die "bookworm's qemu source is not 7.2: $(ls "$TMP/src")"
patterns=()
for f in "${FILES[@]}"; do patterns+=("*/$f"); done
tar -xf "$orig" -C "$TMP/src" --wildcards "${patterns[@]}" || die "the files are not in $orig"
mkdir -p "$DIR"
for f in "${FILES[@]}"; do
    found=$(ls "$TMP"/src/*/"$f" | head -n1)
    mkdir -p "$DIR/$(dirname "$f")"
    cp "$found" "$DIR/$f.partial" && mv "$DIR/$f.partial" "$DIR/$f"
done
log "QEMU 7.2 sources in $DIR"
