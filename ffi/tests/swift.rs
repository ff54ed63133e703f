//! The Swift bindings are generated, and they carry every exported function
//! and type. Compiling them needs a Swift toolchain, which this machine
//! lacks (see the README, "In an Android or iOS app").

mod common;

/// The names of the items of `ffi/src/` derived (or, for a trait, exported)
/// for UniFFI, by kind: the source of truth for what must be in the bindings.
fn exported_types() -> Vec<(&'static str, String)> {
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
    let mut types = Vec::new();
    for entry in std::fs::read_dir(src).expect("ffi/src") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("source");
        let mut pending = None;
        for line in text.lines().map(str::trim) {
            for (marker, kind) in [
                ("uniffi::Record", "struct"),
                ("uniffi::Enum", "enum"),
                ("uniffi::Error", "enum"),
                ("uniffi::Object", "class"),
                ("#[uniffi::export(foreign)]", "protocol"),
            ] {
                if line.contains(marker) {
                    pending = Some(kind);
                }
            }
            let declared = ["pub struct ", "pub enum ", "pub trait "]
                .iter()
                .find_map(|p| line.strip_prefix(p));
            if let (Some(kind), Some(rest)) = (pending, declared) {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                types.push((kind, name));
                pending = None;
            }
        }
    }
    types
}

fn camel_case(snake: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn swift_bindings_carry_every_exported_function_and_type() {
    let dir = tempfile::tempdir().expect("temporary directory");
    common::generate(&[uniffi::TargetLanguage::Swift], dir.path());
    let swift = std::fs::read_to_string(dir.path().join("fedrec_ffi.swift")).expect("Swift file");
    let header = std::fs::read_to_string(dir.path().join("fedrec_ffiFFI.h")).expect("C header");

    // Every function the library exports (the header's scaffolding symbols)
    // is called from Swift, and each method or constructor is a Swift func.
    let symbols: std::collections::BTreeSet<&str> = header
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("uniffi_fedrec_ffi_fn_"))
        .collect();
    let mut methods = 0;
    for symbol in &symbols {
        assert!(
            swift.contains(symbol),
            "{symbol} is not used by the Swift bindings"
        );
        let name = ["method_fedrecclient_", "constructor_fedrecclient_", "func_"]
            .iter()
            .find_map(|p| symbol.strip_prefix(&format!("uniffi_fedrec_ffi_fn_{p}")));
        if let Some(name) = name {
            let func = camel_case(name);
            assert!(
                swift.contains(&format!("func {func}("))
                    || swift.contains(&format!("func `{func}`(")),
                "no Swift func {func} for {symbol}"
            );
            methods += 1;
        }
    }
    assert!(methods >= 18, "only {methods} methods found in the header");

    // Every record, enum, error, object and foreign trait is a Swift type.
    let types = exported_types();
    assert!(
        types.len() >= 20,
        "only {} exported types found: {types:?}",
        types.len()
    );
    for (kind, name) in &types {
        assert!(
            swift.contains(&format!("{kind} {name}:"))
                || swift.contains(&format!("{kind} {name} ")),
            "no Swift {kind} {name}"
        );
    }
}
