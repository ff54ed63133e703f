//! The generated Kotlin bindings on the JVM against real coordinators on
//! 127.0.0.1 (port 0, one plain, one TLS): `kotlin/story.kt` plays the same
//! shop-app story and bad input as `story.py`, compiled with kotlinc and
//! run with JNA, as an Android app would load the library (there through
//! JNA's Android build).
//!
//! Needs `java`, kotlinc (the npm package `kotlin-compiler`) and JNA
//! (Debian's `libjna-java`): `scripts/setup.sh` installs them. Where one is
//! missing the test says so loudly and passes, except under `CI=true`,
//! where it fails. kotlinc takes about half a minute to compile the
//! bindings.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

const ROUNDS: u32 = 2;
/// Bounds kotlinc and the story's run (about 35 s and 2 s here).
const COMPILE_TIMEOUT_SECS: u32 = 300;
const RUN_TIMEOUT_SECS: u32 = 120;
const STORY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/kotlin/story.kt");

/// kotlinc: `$FEDREC_KOTLINC`, else where `scripts/setup.sh` installs it,
/// else on `PATH`.
fn kotlinc() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("FEDREC_KOTLINC") {
        return Some(path.into());
    }
    let tools = std::env::var_os("FEDREC_TOOLS")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
                .map(|cache| cache.join("fedrec"))
        });
    let installed = tools.map(|t| t.join("kotlin/node_modules/kotlin-compiler/bin/kotlinc"));
    if let Some(path) = installed.filter(|p| p.exists()) {
        return Some(path);
    }
    runs("kotlinc").then(|| "kotlinc".into())
}

/// JNA's jar: `$FEDREC_JNA_JAR`, else Debian's.
fn jna() -> Option<PathBuf> {
    let path: PathBuf = std::env::var_os("FEDREC_JNA_JAR")
        .map(Into::into)
        .unwrap_or_else(|| "/usr/share/java/jna.jar".into());
    path.exists().then_some(path)
}

fn runs(program: &str) -> bool {
    Command::new(program)
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The tools, or why the test cannot run: then it skips loudly, or fails
/// under `CI=true`.
fn tools() -> Option<(PathBuf, PathBuf)> {
    let found = (runs("java"), kotlinc(), jna());
    if let (true, Some(kotlinc), Some(jna)) = found {
        return Some((kotlinc, jna));
    }
    let missing = format!(
        "the Kotlin test needs java ({}), kotlinc ({}) and JNA ({}): run scripts/setup.sh",
        if found.0 { "found" } else { "missing" },
        if found.1.is_some() {
            "found"
        } else {
            "missing"
        },
        if found.2.is_some() {
            "found"
        } else {
            "missing"
        },
    );
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{missing} (CI=true: not skipped)"
    );
    eprintln!("\n!!!!!!!!!! SKIPPED: {missing} !!!!!!!!!!\n");
    None
}

/// The story's block between `README:start` and `README:end`, without its
/// indentation.
fn readme_block(story: &str) -> String {
    let start = story
        .find("// README:start\n")
        .expect("README:start in story.kt");
    let end = story.find("// README:end").expect("README:end in story.kt");
    let block = &story[start + "// README:start\n".len()..end];
    let lines: String = block
        .lines()
        .map(str::trim_start)
        .map(|l| format!("{l}\n"))
        .collect();
    format!("{}\n", lines.trim_end())
}

#[test]
fn the_readme_kotlin_snippet_is_the_tested_code() {
    let story = std::fs::read_to_string(STORY).expect("story.kt");
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let block = readme_block(&story);
    assert!(block.lines().count() > 5, "the block is the story's start");
    let snippets: Vec<String> = readme
        .split("```kotlin\n")
        .skip(1)
        .map(|rest| readme_block(&format!("// README:start\n{rest}// README:end")))
        .map(|s| {
            let code = s.split("```").next().unwrap_or_default();
            format!("{}\n", code.trim_end())
        })
        .collect();
    assert!(
        snippets.contains(&block),
        "README.md's Kotlin snippet must be story.kt's README block (indentation aside):\n{block}"
    );
}

#[test]
fn kotlin_plays_the_shop_app_story_on_the_jvm() {
    let Some((kotlinc, jna)) = tools() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temporary directory");
    let bindings = dir.path().join("kotlin");
    common::generate(&[uniffi::TargetLanguage::Kotlin], &bindings);
    let source = bindings.join("uniffi/fedrec_ffi/fedrec_ffi.kt");
    let jar = dir.path().join("story.jar");
    let compiled = Command::new("timeout")
        .arg(COMPILE_TIMEOUT_SECS.to_string())
        .arg(&kotlinc)
        .arg("-nowarn")
        .arg(&source)
        .arg(STORY)
        .arg("-cp")
        .arg(&jna)
        .arg("-include-runtime")
        .arg("-d")
        .arg(&jar)
        .output()
        .expect("kotlinc runs");
    assert!(
        compiled.status.success(),
        "kotlinc failed ({}):\n{}",
        compiled.status,
        String::from_utf8_lossy(&compiled.stderr)
    );

    let library_dir = common::library()
        .parent()
        .expect("library directory")
        .to_owned();
    let mut classpath = jar.into_os_string();
    classpath.push(":");
    classpath.push(&jna);
    let mut java = Command::new("timeout");
    java.arg(RUN_TIMEOUT_SECS.to_string())
        .arg("java")
        .arg(format!("-Djna.library.path={}", library_dir.display()))
        .arg("-cp")
        .arg(classpath)
        .arg("StoryKt");
    common::play_story(dir.path(), ROUNDS, "story.kt (java)", java);
}
