#!/usr/bin/env bash
# Set up a fresh machine: system packages (QEMU 7.2 is the interop peer, iproute2, openssl) and
# a virtualenv in .venv with vmsd installed in editable mode plus dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."

# iproute2 (ip, tc): tests/test_network_faults.py builds two network namespaces joined by a veth pair.
# openssl makes the certificates of the TLS tests (vmsd.testing.tls_certs).
missing=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || missing+=(qemu-system-x86)
{ command -v ip && command -v tc; } >/dev/null 2>&1 || missing+=(iproute2)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# QEMU 10.0 (bookworm-backports) and 11.1 (sid, with its own glibc) are the other
# peers, unpacked into ~/.cache/vmsd/qemu-10.0 and qemu-11.1 rather than installed.
# A failure here is only a warning: the tests that use them retry the fetch in
# their fixtures and fail loudly.  The scripts are package data of vmsd.testing
# (so an installed vmsd has them too), run here from the source tree.
for v in 10 11; do
    if ! bash "src/vmsd/testing/fetch-qemu$v.sh"; then
        echo "setup.sh: warning: fetching QEMU $v (src/vmsd/testing/fetch-qemu$v.sh) failed; its interop tests will fail" >&2
    fi
done

# QEMU 7.2's XBZRLE C source, the reference tests/test_xbzrle.py compiles (same rule: a warning here,
# the test's fixture retries and fails loudly).
if ! bash scripts/fetch-qemu72-src.sh; then
    echo "setup.sh: warning: fetching QEMU 7.2's sources failed (scripts/fetch-qemu72-src.sh); tests/test_xbzrle.py will fail" >&2
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[dev]"
# Byte-compile as a wheel install would: the CLI imports dozens of generated
# modules, and an environment with PYTHONDONTWRITEBYTECODE never caches them.
.venv/bin/python -m compileall -q src/vmsd >/dev/null
