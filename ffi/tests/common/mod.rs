//! Fixtures of the bindings' tests: the built library and the bindings
//! generated from it, as `scripts/bindings.sh` generates them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The shared library cargo built for these tests (`libfedrec_ffi.so`),
/// found next to the test binary (`target/<profile>/deps/`) or one level up.
pub fn library() -> PathBuf {
    let name = format!(
        "{}fedrec_ffi{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("deps directory");
    [deps, deps.parent().expect("profile directory")]
        .iter()
        .map(|dir| dir.join(&name))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{name} not found next to {}", exe.display()))
}

/// Generates the bindings for `languages` into `out` from [`library`].
pub fn generate(languages: &[uniffi::TargetLanguage], out: &Path) {
    let utf8 = |p: &Path| p.to_str().expect("UTF-8 path").to_owned().into();
    uniffi::generate(uniffi::GenerateOptions {
        languages: languages.to_vec(),
        source: utf8(&library()),
        out_dir: utf8(out),
        config_override: None,
        format: false,
        crate_filter: None,
        metadata_no_deps: true,
    })
    .expect("bindings generated");
}
