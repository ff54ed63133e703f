//! UniFFI's bindings generator at the workspace's UniFFI version, so that
//! the generated Kotlin, Swift and Python match the scaffolding compiled
//! into `fedrec-ffi`. `scripts/bindings.sh` runs it on the built library:
//!
//! ```text
//! cargo run -p uniffi-bindgen -- generate --library target/debug/libfedrec_ffi.so \
//!     --language python --out-dir target/bindings/python
//! ```

fn main() {
    uniffi::uniffi_bindgen_main()
}
