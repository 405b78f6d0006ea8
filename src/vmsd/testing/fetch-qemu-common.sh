# Shared by fetch-qemu10.sh and fetch-qemu11.sh (sourced, not run): the host's
# Debian mirror, a private apt configuration, one fetch at a time, and a stage
# folder renamed into place only once the QEMU in it works.
#
# The sourcing script sets, before calling anything here:
#   PROG     name in messages
#   DIR      target folder (no trailing slash)
#   MARKER   file name written into DIR by a complete fetch
#   ENV_VAR  the variable that overrides DIR (named in messages)
# and defines works FOLDER: does FOLDER hold the wanted QEMU, running?

DEFAULT_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

log() { echo "$PROG: $*" >&2; }
die() { echo "$PROG: error: $*" >&2; exit 1; }

# check_host TOOL...: the tools exist, the host is amd64 (and, ideally, bookworm).
check_host() {
    local tool arch codename
    for tool in apt-get apt-cache dpkg dpkg-deb flock mktemp "$@"; do
        command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found; this script needs a Debian bookworm (amd64) host"
    done
    arch=$(dpkg --print-architecture)
    [ "$arch" = amd64 ] || die "host architecture is '$arch'; only amd64 is supported"
    codename=$( (. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}") || true)
    if [ "$codename" != bookworm ]; then
        log "warning: host is '${codename:-unknown}', not Debian bookworm; trying anyway"
    fi
}

# host_mirror: sets mirror and keyring from the host's first enabled "deb" entry
# for bookworm: deb822 stanzas in sources.list.d/*.sources, then one-line
# entries in sources.list and sources.list.d/*.list, as apt reads them.
# $VMSD_DEBIAN_MIRROR overrides the mirror; with neither, the script stops (it
# names no mirror of its own).  Other suites (backports, sid) are asked of the
# same mirror.
host_mirror() {
    local sources_list=/etc/apt/sources.list sources_dir=/etc/apt/sources.list.d
    local -a deb822_files oneline_files
    mirror="" keyring=""
    shopt -s nullglob
    deb822_files=("$sources_dir"/*.sources)
    oneline_files=("$sources_dir"/*.list)
    shopt -u nullglob
    [ -r "$sources_list" ] && oneline_files=("$sources_list" "${oneline_files[@]}")
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
    [ -n "$mirror" ] || die "no apt source for bookworm in $sources_dir/*.sources, $sources_list or" \
        "$sources_dir/*.list; add one, or set VMSD_DEBIAN_MIRROR to the URL of a Debian mirror"
    mirror=${mirror%/}
    case "$keyring" in /*) [ -r "$keyring" ] || keyring="" ;; *) keyring="" ;; esac
    keyring=${keyring:-$DEFAULT_KEYRING}
    [ -r "$keyring" ] || die "keyring $keyring not found (apt-get install debian-archive-keyring)"
}

# lock_and_stage WANTED: waits for any other fetch of DIR, exits when that one
# left a working QEMU, and otherwise makes TMP (apt's private state), STAGE
# (the folder being filled, beside DIR) and APT_OPTS; both go away on exit.
lock_and_stage() {
    local parent
    parent=$(dirname "$DIR")
    mkdir -p "$parent" || die "cannot create $parent"
    exec 9>"$parent/.$(basename "$DIR").lock"
    flock 9
    if works "$DIR"; then   # another process fetched it while we waited
        log "QEMU $1 already present in $DIR"
        exit 0
    fi
    if [ -e "$DIR" ] && [ ! -e "$DIR/$MARKER" ] && [ -n "$(ls -A "$DIR" 2>/dev/null)" ]; then
        die "$DIR exists, is not empty and was not made by this script; remove it or set $ENV_VAR"
    fi
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/$PROG.XXXXXX")
    STAGE="$parent/.$(basename "$DIR").partial.$$"
    trap 'rm -rf "$TMP" "$STAGE"' EXIT
    chmod 755 "$TMP"
    mkdir -p "$TMP/lists/partial" "$TMP/cache/archives/partial" "$TMP/debs" "$STAGE"
    if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then
        chown _apt "$TMP/debs"    # apt downloads as the unprivileged _apt user when run as root
    fi
    # Nothing of the host's apt state is read (but the keyring) or written;
    # an empty dpkg status keeps the host's installed packages out of apt-cache's answers.
    APT_OPTS=(
        -o "Dir::Etc::SourceList=$TMP/sources.list"
        -o "Dir::Etc::SourceParts=/dev/null"
        -o "Dir::Etc::Preferences=/dev/null"
        -o "Dir::Etc::PreferencesParts=/dev/null"
        -o "Dir::State::Lists=$TMP/lists"
        -o "Dir::State::status=/dev/null"
        -o "Dir::Cache=$TMP/cache"
        -o "APT::Get::List-Cleanup=false"
    )
}

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

# deb_version PACKAGE WANTED: the version of the downloaded PACKAGE .deb, which
# must be upstream version WANTED (e.g. 10.0 matches 1:10.0.2+ds-1~bpo12+1).
deb_version() {
    local deb version
    deb=$(ls "$TMP"/debs/"$1"_*.deb 2>/dev/null | head -n1)
    [ -n "$deb" ] || die "$1 .deb was not downloaded"
    version=$(dpkg-deb -f "$deb" Version)
    case "$version" in
        *:"$2".*|"$2".*) ;;
        *) die "the suite has $1 $version, not QEMU $2" ;;
    esac
    echo "$version"
}

# Unpack a .deb into the stage; libraries under /lib go to /usr/lib (a
# merged-/usr layout whatever the package's age).
unpack() {
    dpkg-deb -x "$1" "$STAGE" || die "dpkg -x $1 failed"
    if [ -d "$STAGE/lib/x86_64-linux-gnu" ] && [ ! -L "$STAGE/lib" ]; then
        mkdir -p "$STAGE/usr/lib/x86_64-linux-gnu"
        cp -a "$STAGE/lib/x86_64-linux-gnu/." "$STAGE/usr/lib/x86_64-linux-gnu/"
        rm -rf "$STAGE/lib/x86_64-linux-gnu"
    fi
}

# put_in_place VERSION: the verified stage becomes DIR, marked with VERSION.
put_in_place() {
    echo "$1" >"$STAGE/$MARKER"
    rm -rf "$DIR"
    mv "$STAGE" "$DIR"
}
