//! Who may connect to the MQTT proxy, and where each device may publish.
//!
//! Logins come from a users file (`username:password` per line, as a mounted Secret),
//! compared in constant time. The ACL is a list of topic patterns in which `{device}`
//! stands for the connection's device identity (its client id, username or certificate
//! CN, by config), as Mosquitto's `pattern write .../%c` does: a device may publish only
//! to a topic one of its patterns matches, so it cannot pass readings off as another's.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Where a connection's device identity comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceIdFrom {
    #[default]
    ClientId,
    Username,
    /// The common name of the client certificate (TLS with client certificates).
    CertificateCn,
}

/// Logins, read from the users file.
pub struct Users {
    passwords: HashMap<String, admin::token::Token>,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Users({} logins)", self.passwords.len())
    }
}

impl Users {
    /// `username:password` per line; blank lines and `#` comments are skipped. The error
    /// names the file and line (never the password).
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut passwords = HashMap::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, password) =
                line.split_once(':').ok_or_else(|| format!("line {}: expected username:password", number + 1))?;
            if user.is_empty() {
                return Err(format!("line {}: empty username", number + 1));
            }
            let password = admin::token::Token::from_file_text(password)
                .map_err(|e| format!("line {}: password: {e}", number + 1))?;
            if passwords.insert(user.to_owned(), password).is_some() {
                return Err(format!("line {}: user {user:?} is listed twice", number + 1));
            }
        }
        if passwords.is_empty() {
            return Err("no logins in the file".into());
        }
        Ok(Self { passwords })
    }

    /// Whether `username` exists and `password` is its password.
    pub fn check(&self, username: Option<&str>, password: Option<&str>) -> bool {
        match (username.and_then(|u| self.passwords.get(u)), password) {
            (Some(expected), Some(offered)) => expected.matches(offered.as_bytes()),
            _ => false,
        }
    }
}

/// The ACL: topic filters with `{device}` in them.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    patterns: Vec<String>,
}

impl Acl {
    /// Each pattern must be a valid topic filter once `{device}` is filled in.
    pub fn new(patterns: &[String]) -> Result<Self, String> {
        for pattern in patterns {
            if !rumqttc::valid_filter(&pattern.replace("{device}", "d")) {
                return Err(format!("{pattern:?} is not a valid MQTT topic filter"));
            }
        }
        Ok(Self { patterns: patterns.to_vec() })
    }

    /// No patterns: every topic is allowed (the routing rules still decide where it goes).
    pub fn is_open(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether the device `identity` may publish to `topic`. An identity that could
    /// widen a pattern (`+`, `#`, `/`) or is empty matches nothing.
    pub fn allows(&self, identity: Option<&str>, topic: &str) -> bool {
        if self.is_open() {
            return true;
        }
        let Some(identity) = identity.filter(|i| !i.is_empty() && !i.contains(['/', '+', '#'])) else {
            return false;
        };
        self.patterns.iter().any(|pattern| rumqttc::matches(topic, &pattern.replace("{device}", identity)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logins_match_only_their_own_password() {
        let users = Users::parse("# fleet\ncar-1:s3cret\n\ncar-2:other\n").unwrap();
        assert!(users.check(Some("car-1"), Some("s3cret")));
        assert!(!users.check(Some("car-1"), Some("other")));
        assert!(!users.check(Some("car-3"), Some("s3cret")));
        assert!(!users.check(Some("car-1"), None));
        assert!(!users.check(None, Some("s3cret")));
        assert!(Users::parse("car-1\n").unwrap_err().contains("line 1"));
        assert!(Users::parse("a:x\na:y").unwrap_err().contains("twice"));
        assert!(Users::parse("").is_err());
        assert!(!format!("{users:?}").contains("s3cret"));
    }

    #[test]
    fn a_device_publishes_only_where_its_patterns_allow() {
        let acl = Acl::new(&["vehicles/sensor/data/{device}".into(), "plant/{device}/#".into()]).unwrap();
        assert!(acl.allows(Some("car-1"), "vehicles/sensor/data/car-1"));
        assert!(acl.allows(Some("m7"), "plant/m7/temp/1"));
        assert!(!acl.allows(Some("car-1"), "vehicles/sensor/data/car-2"), "another's topic");
        assert!(!acl.allows(Some("+"), "vehicles/sensor/data/car-2"), "a wildcard identity");
        assert!(!acl.allows(Some("#"), "plant/x/y"));
        assert!(!acl.allows(Some("a/b"), "plant/a/b/c"));
        assert!(!acl.allows(None, "vehicles/sensor/data/car-1"));
        assert!(Acl::default().allows(None, "anything/at/all"));
        assert!(Acl::new(&["a/#/b".into()]).is_err());
    }
}
