#!/usr/bin/env bash
# Checks (cargo check: compiles, does not link) the device SDK and the
# mobile library for Android and iOS targets, without the Android NDK or
# Apple's SDK.
#
#   scripts/check-mobile.sh [TARGET...]    # default: every target below
#
# ring's build script compiles C and assembly for the target. Without the
# NDK or Xcode there is no target libc to include, but ring needs none when
# told so: Debian's clang with --target, freestanding, no system include
# directories, and RING_CORE_NOSTDLIBINC (ring's own switch for
# cross-building without a libc). For iOS, cc-rs asks xcrun for the SDK
# unless SDKROOT is set (an empty directory here), and ring's base.h
# includes Apple's <TargetConditionals.h> for two macros: a two-line
# stand-in (below) declares an iPhone. Nothing is linked: the C objects are
# compiled and the Rust code is type-checked, no more. What this checks and
# what it cannot, and why, is in docs/mobile.md. scripts/setup.sh installs
# clang and the targets.
set -euo pipefail
cd "$(dirname "$0")/.."

# Rust target -> clang target (Android API level 21, cargo-ndk's default).
declare -A CLANG=(
    [aarch64-linux-android]=aarch64-linux-android21
    [armv7-linux-androideabi]=armv7a-linux-androideabi21
    [x86_64-linux-android]=x86_64-linux-android21
    [aarch64-apple-ios]=arm64-apple-ios13.0
    [aarch64-apple-ios-sim]=arm64-apple-ios13.0-simulator
)
targets=("$@")
(( ${#targets[@]} )) || targets=(aarch64-linux-android armv7-linux-androideabi
                                 x86_64-linux-android aarch64-apple-ios aarch64-apple-ios-sim)
installed="$(rustup target list --installed)"
failed=0
stub="$(mktemp -d)"
trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/sdk" "$stub/include"
cat >"$stub/include/TargetConditionals.h" <<'H'
/* Stand-in for Apple's header, for scripts/check-mobile.sh only. */
#define TARGET_OS_MAC 1
#define TARGET_OS_OSX 0
#define TARGET_OS_IPHONE 1
#define TARGET_OS_IOS 1
H
for t in "${targets[@]}"; do
    if ! grep -qx "$t" <<<"$installed"; then
        case "$t" in
            *-apple-*) echo "check-mobile: SKIPPED $t: rustup has no standard library for it here"; continue ;;
            *) echo "check-mobile: $t is not installed: run scripts/setup.sh" >&2; exit 1 ;;
        esac
    fi
    var="${t//-/_}"
    cflags="--target=${CLANG[$t]} -ffreestanding -nostdlibinc -DRING_CORE_NOSTDLIBINC=1"
    apple=()
    if [[ "$t" == *-apple-* ]]; then
        cflags+=" -I$stub/include"
        apple=("SDKROOT=$stub/sdk")
    fi
    echo "check-mobile: $t"
    if env "${apple[@]}" "CC_$var=clang" "AR_$var=llvm-ar" "CFLAGS_$var=$cflags" \
        cargo check --quiet -p fedrec-client -p fedrec-ffi --target "$t"; then
        echo "check-mobile: $t ok"
    else
        echo "check-mobile: $t FAILED" >&2
        failed=1
    fi
done
exit "$failed"
