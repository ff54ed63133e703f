//! Device authentication by enrollment token (`[auth]`).
//!
//! A token is a random secret given to one device when it is enrolled. The
//! coordinator keeps only the SHA-256 digests of the valid tokens, read from
//! `auth.enrollment_tokens` at start-up ([`TokenSet::load`]), and checks the
//! token a device presents when it joins ([`TokenSet::check`]), which names
//! the token by a [`TokenId`]. The pseudonym the join returns is the
//! device's session credential; its expiry, and the most live sessions a
//! token holds, are kept by the round core ([`crate::round::RoundCore::join`]).
//!
//! The lookup compares digests, so timing can only reveal something about
//! a digest, from which no token can be found (SHA-256 is preimage
//! resistant and tokens carry 256 random bits).

use std::collections::HashMap;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::CoordinatorError;

/// The SHA-256 digest of `token`, as 64 lowercase hex digits: what the
/// coordinator's token file holds for it.
pub fn digest(token: &str) -> String {
    hex(&Sha256::digest(token.trim().as_bytes()))
}

/// `bytes` as lowercase hex digits (the form of tokens and digests).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Which enrollment token a device joined with: the token's place in its
/// [`TokenSet`] (valid for that set only, so not kept across restarts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TokenId(u32);

/// The digests of the tokens that may join.
#[derive(Clone, Debug, Default)]
pub struct TokenSet {
    digests: HashMap<String, TokenId>,
}

impl TokenSet {
    /// Reads a token file: one digest (64 hex digits) per line; blank lines
    /// and lines starting with `#` are skipped. Errors name the file and
    /// the line. An empty file is refused: no device could ever join.
    pub fn load(path: &Path) -> Result<Self, CoordinatorError> {
        let err = |message: String| CoordinatorError::ConfigFile {
            path: path.to_owned(),
            message,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(format!("auth.enrollment_tokens: cannot read: {e}")))?;
        let mut digests = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.len() != 64 || !line.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err(format!(
                    "line {}: expected the SHA-256 digest of a token (64 hex digits), got {:?} \
                     (`fedrec tokens` writes this file; never put the tokens themselves here)",
                    index + 1,
                    truncate(line)
                )));
            }
            let id = TokenId(digests.len() as u32);
            digests.entry(line.to_ascii_lowercase()).or_insert(id);
        }
        if digests.is_empty() {
            return Err(err(
                "auth.enrollment_tokens: the file lists no token digest, so no device could join"
                    .to_owned(),
            ));
        }
        Ok(Self { digests })
    }

    /// A set of the given tokens (for tests and embedding).
    pub fn from_tokens<'a>(tokens: impl IntoIterator<Item = &'a str>) -> Self {
        let mut digests = HashMap::new();
        for token in tokens {
            let id = TokenId(digests.len() as u32);
            digests.entry(digest(token)).or_insert(id);
        }
        Self { digests }
    }

    /// Number of tokens that may join.
    pub fn len(&self) -> usize {
        self.digests.len()
    }

    /// Whether no token may join.
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Accepts `token` if its digest is in the set, and says which it is.
    pub fn check(&self, token: &str) -> Result<TokenId, CoordinatorError> {
        if token.trim().is_empty() {
            return Err(CoordinatorError::MissingToken);
        }
        self.digests
            .get(&digest(token))
            .copied()
            .ok_or(CoordinatorError::UnknownToken)
    }
}

/// At most 20 characters of `line`, for an error message that must not
/// print a whole secret someone put in the wrong file.
fn truncate(line: &str) -> String {
    match line.char_indices().nth(20) {
        Some((end, _)) => format!("{}…", &line[..end]),
        None => line.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_sha256_hex() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(
            digest("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(digest("abc\n"), digest("abc"), "surrounding space ignored");
    }

    #[test]
    fn a_token_file_is_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.sha256");
        let text = format!(
            "# enrolled devices\n\n{}\n{}\n",
            digest("alpha"),
            digest("beta").to_uppercase()
        );
        std::fs::write(&path, text).unwrap();
        let set = TokenSet::load(&path).unwrap();
        assert_eq!(set.len(), 2);
        let (alpha, beta) = (set.check("alpha").unwrap(), set.check("beta").unwrap());
        assert_ne!(alpha, beta, "each token is told apart");
        assert_eq!(set.check(" alpha\n").unwrap(), alpha);
        assert!(matches!(
            set.check("gamma"),
            Err(CoordinatorError::UnknownToken)
        ));
        assert!(matches!(
            set.check(" "),
            Err(CoordinatorError::MissingToken)
        ));
    }

    #[test]
    fn bad_token_files_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.sha256");
        std::fs::write(
            &path,
            format!("{}\na-token-not-a-digest-0123456789\n", digest("x")),
        )
        .unwrap();
        let e = TokenSet::load(&path).unwrap_err().to_string();
        assert!(e.contains("tokens.sha256") && e.contains("line 2"), "{e}");
        assert!(!e.contains("0123456789"), "the secret is not echoed: {e}");

        std::fs::write(&path, "# nobody\n").unwrap();
        let e = TokenSet::load(&path).unwrap_err().to_string();
        assert!(e.contains("no token digest"), "{e}");

        let e = TokenSet::load(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing") && e.contains("cannot read"), "{e}");
    }
}
