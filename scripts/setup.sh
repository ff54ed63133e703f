#!/usr/bin/env bash
# Installs what the mobile library's tests and checks need beyond Rust:
#
# - kotlinc and the Kotlin standard library (the npm package
#   `kotlin-compiler`), for ffi/tests/kotlin.rs; installed into
#   $FEDREC_TOOLS (default: ${XDG_CACHE_HOME:-$HOME/.cache}/fedrec), a cache
#   outside the repository, so that it survives `git clean` and is shared by
#   worktrees; the test finds it there (or on PATH, or at $FEDREC_KOTLINC);
# - JNA (Debian's `libjna-java`, /usr/share/java/jna.jar), which Kotlin
#   bindings load the library with; a Java runtime (`java`, 11 or newer);
# - clang, the C cross compiler ring's build script uses for the Android and
#   iOS targets (see docs/mobile.md);
# - the rustup targets of the mobile checks;
# - PostgreSQL (Debian's `postgresql`: initdb, pg_ctl, createdb), which the
#   store's tests (store/tests) start on a temporary directory; found through
#   `pg_config --bindir` (the tests never use a cluster the package may set up).
#
#   scripts/setup.sh            # everything
#   scripts/setup.sh --no-apt   # skip apt-get (not root, or already there)
#
# Idempotent: what is already there is not fetched again.
set -euo pipefail
cd "$(dirname "$0")/.."

tools="${FEDREC_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/fedrec}"
KOTLIN_VERSION=2.3.21
ANDROID_TARGETS=(aarch64-linux-android armv7-linux-androideabi x86_64-linux-android)
# Best effort: the iOS standard libraries may be missing from the mirror
# this machine reaches (aarch64-apple-ios-sim answered 404 here).
IOS_TARGETS=(aarch64-apple-ios aarch64-apple-ios-sim)

apt=1
[[ "${1:-}" == "--no-apt" ]] && apt=0

if (( apt )); then
    missing=()
    [[ -f /usr/share/java/jna.jar ]] || missing+=(libjna-java)
    command -v clang >/dev/null || missing+=(clang)
    command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
    if ! command -v pg_config >/dev/null || [[ ! -x "$(pg_config --bindir)/initdb" ]]; then
        missing+=(postgresql)
    fi
    if (( ${#missing[@]} )); then
        echo "setup: apt-get install ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
fi

kotlinc="$tools/kotlin/node_modules/kotlin-compiler/bin/kotlinc"
if [[ ! -x "$kotlinc" ]]; then
    echo "setup: npm install kotlin-compiler@$KOTLIN_VERSION into $tools/kotlin"
    mkdir -p "$tools/kotlin"
    npm install --silent --no-audit --no-fund --prefix "$tools/kotlin" "kotlin-compiler@$KOTLIN_VERSION"
fi

installed="$(rustup target list --installed)"
for t in "${ANDROID_TARGETS[@]}"; do
    grep -qx "$t" <<<"$installed" || rustup target add "$t"
done
for t in "${IOS_TARGETS[@]}"; do
    grep -qx "$t" <<<"$installed" || rustup target add "$t" >/dev/null 2>&1 \
        || echo "setup: WARNING: rustup cannot add $t here; its check is skipped" >&2
done
echo "setup: kotlinc at $kotlinc; JNA at /usr/share/java/jna.jar"
