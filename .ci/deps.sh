#!/usr/bin/env bash
# .ci/deps.sh: install what the build and the tests need, if it is missing.
# Idempotent and quick when everything is there (no apt-get update, no cargo
# install). Runs non-interactively; needs root (or passwordless sudo) only
# when an apt package is missing.
#   apt:   fuse3 (fusermount3), fio, libnfs-utils, qemu-utils + qemu-block-extra (qemu's
#          nfs:// driver; both of one version), python3, make,
#          gcc + libc6-dev (linker, zstd-sys), util-linux (mountpoint), ca-certificates,
#          tar + zstd (fs-tests/fixtures), curl + prometheus (promtool and the server:
#          fs-tests/metrics.sh), python3-matplotlib (packaging/render-dashboard.py),
#          lintian (fs-tests/package.sh), python3-venv (moto's S3 server for fs-tests/s3.sh,
#          pip-installed into /var/tmp/tessera-moto)
#   rustup components rustfmt and clippy (for `make lint`)
#   cargo: pjdfstest 0.2.2 (fs-tests/pjdfstest.sh), cargo-deb 3.8.0 (make deb, fs-tests/package.sh)
set -euo pipefail
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
APT_PACKAGES=(fuse3 fio libnfs-utils qemu-utils python3 python3-venv make gcc libc6-dev util-linux coreutils ca-certificates tar zstd curl prometheus python3-matplotlib lintian)
# RUNTIME_ONLY=1 (used by `make run`): only what building and mounting need.
[ -n "${RUNTIME_ONLY:-}" ] && APT_PACKAGES=(fuse3 make gcc libc6-dev util-linux ca-certificates)
PJDFSTEST_VERSION=0.2.2
CARGO_DEB_VERSION="cargo-deb 3.8.0"

say() { echo "deps: $*"; }
die() { echo "deps: ERROR: $*" >&2; exit 1; }

# ---- apt packages
if command -v dpkg-query >/dev/null; then
    missing=()
    for p in "${APT_PACKAGES[@]}"; do
        [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null)" = "ii " ] || missing+=("$p")
    done
    # qemu's nfs:// driver is a module in qemu-block-extra that loads only into a qemu-img of
    # exactly its version: a qemu-utils from elsewhere (backports) is replaced by the one
    # that matches the module from the release's own archive.
    if [ -z "${RUNTIME_ONLY:-}" ]; then
        qv=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
        bv=$(dpkg-query -W -f='${db:Status-Abbrev}${Version}' qemu-block-extra 2>/dev/null || true)
        [ "$bv" = "ii $qv" ] || missing+=(qemu-block-extra)
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing: ${missing[*]}"
        if [ "$(id -u)" = 0 ]; then sudo=(); elif command -v sudo >/dev/null; then sudo=(sudo -n); else
            die "missing packages (${missing[*]}) and not root: apt-get install ${missing[*]}"
        fi
        export DEBIAN_FRONTEND=noninteractive
        "${sudo[@]}" apt-get update -q </dev/null
        if [[ " ${missing[*]} " == *" qemu-block-extra "* ]]; then
            v=$(apt-cache policy qemu-block-extra | awk '/Candidate:/ {print $2}')
            [ -n "$v" ] && [ "$v" != "(none)" ] || die "no qemu-block-extra package in the apt sources"
            missing=("${missing[@]/qemu-block-extra/}")
            missing=("${missing[@]/qemu-utils/}")
            missing+=("qemu-utils=$v" "qemu-block-extra=$v")
        fi
        "${sudo[@]}" apt-get install -y -q --no-install-recommends --allow-downgrades ${missing[*]} </dev/null
    else
        say "apt packages present"
    fi
else
    say "no dpkg: not a Debian system, checking commands only"
    for c in fusermount3 fio nfs-ls qemu-img python3 make cc mountpoint; do
        command -v "$c" >/dev/null || die "$c not found; install it"
    done
fi
[ -c /dev/fuse ] || say "WARNING: /dev/fuse is missing: the fs-tests cannot mount"

# ---- Rust toolchain
command -v cargo >/dev/null || die "cargo not found (install Rust with rustup: https://rustup.rs)"
if [ -n "${RUNTIME_ONLY:-}" ]; then
    say "$(cargo --version) (runtime only: lint tools and pjdfstest not checked)"
    exit 0
fi
for comp in rustfmt:fmt clippy:clippy; do
    if ! cargo "${comp#*:}" --version >/dev/null 2>&1; then
        command -v rustup >/dev/null || die "cargo ${comp#*:} is missing and rustup is not available"
        say "adding rustup component ${comp%%:*}"
        rustup component add "${comp%%:*}" </dev/null
    fi
done
say "$(cargo --version), $(cargo fmt --version | head -n 1), $(cargo clippy --version)"

# ---- pjdfstest
pjd=$(command -v pjdfstest || true)
if [ -z "$pjd" ] || [ "$("$pjd" --version 2>/dev/null)" != "pjdfstest $PJDFSTEST_VERSION" ]; then
    say "cargo install pjdfstest $PJDFSTEST_VERSION"
    cargo install pjdfstest --locked --version "$PJDFSTEST_VERSION" </dev/null
    pjd=$(command -v pjdfstest) || die "pjdfstest not in PATH after cargo install"
fi
say "$("$pjd" --version) at $pjd"

# ---- moto's S3 API server (fs-tests/s3.sh), in a virtualenv of its own
MOTO_VERSION=5.2.5
MOTO_VENV=${MOTO_VENV:-/var/tmp/tessera-moto}
if [ "$("$MOTO_VENV/bin/python" -c 'import moto; print(moto.__version__)' 2>/dev/null)" != "$MOTO_VERSION" ]; then
    say "installing moto[server] $MOTO_VERSION into $MOTO_VENV"
    rm -rf "$MOTO_VENV"
    python3 -m venv "$MOTO_VENV" </dev/null || die "python3 -m venv failed (apt-get install python3-venv)"
    "$MOTO_VENV/bin/pip" install -q --disable-pip-version-check "moto[server]==$MOTO_VERSION" </dev/null
fi
say "moto $MOTO_VERSION at $MOTO_VENV/bin/moto_server"

# ---- cargo-deb (make deb, fs-tests/package.sh)
if [ "$(cargo deb --version 2>/dev/null)" != "$CARGO_DEB_VERSION" ]; then
    say "cargo install cargo-deb ${CARGO_DEB_VERSION#cargo-deb }"
    cargo install cargo-deb --locked --version "${CARGO_DEB_VERSION#cargo-deb }" </dev/null
fi
say "$(cargo deb --version)"
