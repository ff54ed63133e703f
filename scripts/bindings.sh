#!/usr/bin/env bash
# Builds the device SDK's mobile library (fedrec-ffi) and generates its
# Kotlin, Swift and Python bindings with the workspace's uniffi-bindgen.
#
#   scripts/bindings.sh [--release]
#
# Output: target/bindings/{python,kotlin,swift}/ (the Python directory also
# holds a copy of the library, which the generated module loads from beside
# itself). Generated code is not committed: it is rebuilt from the library.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=debug
args=()
if [[ "${1:-}" == "--release" ]]; then
    profile=release
    args=(--release)
fi
target="${CARGO_TARGET_DIR:-target}"
cargo build "${args[@]}" -p fedrec-ffi -p uniffi-bindgen
case "$(uname -s)" in
    Darwin) lib="$target/$profile/libfedrec_ffi.dylib" ;;
    *) lib="$target/$profile/libfedrec_ffi.so" ;;
esac
out="$target/bindings"
rm -rf "$out"
for language in python kotlin swift; do
    "$target/$profile/uniffi-bindgen" generate --library "$lib" \
        --language "$language" --out-dir "$out/$language" --no-format
done
cp "$lib" "$out/python/"
echo "bindings in $out/{python,kotlin,swift}"
