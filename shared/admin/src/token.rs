//! A bearer token read from a file (a mounted Kubernetes Secret), compared in constant
//! time: the model server's management token and ingest's HTTP token.

use std::sync::Arc;

/// A bearer token; never printed.
#[derive(Clone)]
pub struct Token(Arc<[u8]>);

impl Token {
    /// The token in a token file: its text without surrounding whitespace (the newline an
    /// editor or `echo` leaves). Empty is refused: it would match an empty bearer.
    pub fn from_file_text(text: &str) -> Result<Token, &'static str> {
        let token = text.trim();
        if token.is_empty() {
            return Err("the file is empty");
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("the token has whitespace inside: a file holds one token");
        }
        Ok(Token(token.as_bytes().into()))
    }

    /// Reads and checks the token file at `path`; the error names the file.
    pub fn from_file(path: &std::path::Path) -> Result<Token, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Token::from_file_text(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Constant time in the contents (the length may show: tokens are random strings of a
    /// fixed length).
    pub fn matches(&self, offered: &[u8]) -> bool {
        let expected = &self.0[..];
        if expected.len() != offered.len() {
            return false;
        }
        let difference = expected.iter().zip(offered).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(difference) == 0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::Token;

    #[test]
    fn a_token_file_holds_one_token_and_only_it_matches() {
        let token = Token::from_file_text("s3cret\n").unwrap();
        assert!(token.matches(b"s3cret"));
        assert!(!token.matches(b"s3cre"), "a prefix");
        assert!(!token.matches(b"s3cret\n"), "the newline is not part of it");
        assert!(!token.matches(b""));
        assert!(Token::from_file_text(" \n").is_err(), "empty");
        assert!(Token::from_file_text("two tokens").is_err());
        assert_eq!(format!("{token:?}"), "Token(<redacted>)");
    }
}
