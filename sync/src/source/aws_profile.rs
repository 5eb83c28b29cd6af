//! Reads static credentials from the AWS shared credentials file, which `object_store` does
//! not read itself.

use std::path::PathBuf;

/// Static credentials of one profile.
#[derive(Clone, PartialEq, Eq)]
pub struct ProfileCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for ProfileCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProfileCredentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// Returns the credentials of profile `AWS_PROFILE` (default `default`) from the file
/// `AWS_SHARED_CREDENTIALS_FILE` (default `$HOME/.aws/credentials`), looked up in `env`.
///
/// Returns `Ok(None)` when there is no such file or profile and `AWS_PROFILE` is not set,
/// so that other sources of credentials are tried. Fails when `AWS_PROFILE` names a profile
/// the file lacks (the other sources would hide the mistake), when the file exists but
/// cannot be read, or when the profile lacks a key.
pub fn from_env(env: &[(String, String)]) -> Result<Option<ProfileCredentials>, String> {
    let var = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let chosen = var("AWS_PROFILE");
    let profile = chosen.unwrap_or("default");
    let path = match (var("AWS_SHARED_CREDENTIALS_FILE"), var("HOME")) {
        (Some(path), _) => PathBuf::from(path),
        (None, Some(home)) => PathBuf::from(home).join(".aws/credentials"),
        (None, None) if chosen.is_some() => {
            return Err(format!(
                "AWS_PROFILE is {profile:?}, but there is no credentials file (set HOME or \
                 AWS_SHARED_CREDENTIALS_FILE, or unset AWS_PROFILE)"
            ))
        }
        (None, None) => return Ok(None),
    };
    let missing = || {
        format!(
            "AWS_PROFILE is {profile:?}, but {} has no such profile with keys; fix AWS_PROFILE \
             or add the profile (profiles of ~/.aws/config, such as SSO, are not read)",
            path.display()
        )
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && chosen.is_some() => {
            return Err(missing())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    match parse(&text, profile) {
        Ok(None) if chosen.is_some() => Err(missing()),
        parsed => parsed.map_err(|e| format!("{}: profile {profile:?}: {e}", path.display())),
    }
}

/// Finds `profile` in the INI text of a credentials file.
pub fn parse(text: &str, profile: &str) -> Result<Option<ProfileCredentials>, String> {
    let mut in_profile = false;
    let mut found = false;
    let (mut id, mut secret, mut token) = (None, None, None);
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_profile = name.trim() == profile;
            found |= in_profile;
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if in_profile {
            let value = Some(value.trim().to_string());
            match key.trim() {
                "aws_access_key_id" => id = value,
                "aws_secret_access_key" => secret = value,
                "aws_session_token" => token = value,
                _ => {}
            }
        }
    }
    match (found, id, secret) {
        (false, _, _) => Ok(None),
        (true, Some(access_key_id), Some(secret_access_key)) => Ok(Some(ProfileCredentials {
            access_key_id,
            secret_access_key,
            session_token: token,
        })),
        _ => Err("needs both aws_access_key_id and aws_secret_access_key".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "[default]\naws_access_key_id = AK1\naws_secret_access_key = S1\n\n\
                        [ops]\naws_access_key_id=AK2\naws_secret_access_key=S2\naws_session_token=T\n";

    #[test]
    fn parse_default_profile() {
        let creds = parse(FILE, "default").expect("valid").expect("present");
        assert_eq!(creds.access_key_id, "AK1");
    }

    #[test]
    fn parse_named_profile_with_token() {
        let creds = parse(FILE, "ops").expect("valid").expect("present");
        assert_eq!(creds.session_token.as_deref(), Some("T"));
    }

    #[test]
    fn parse_missing_profile() {
        assert_eq!(parse(FILE, "nope"), Ok(None));
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn chosen_profile_must_exist() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("credentials");
        std::fs::write(&file, FILE).expect("write");
        let file = file.to_str().expect("utf-8");
        let found = from_env(&env(&[
            ("AWS_SHARED_CREDENTIALS_FILE", file),
            ("AWS_PROFILE", "ops"),
        ]));
        assert_eq!(found.expect("valid").expect("present").access_key_id, "AK2");
        let typo = from_env(&env(&[
            ("AWS_SHARED_CREDENTIALS_FILE", file),
            ("AWS_PROFILE", "prod-typo"),
        ]))
        .expect_err("a named profile that is missing");
        assert!(typo.contains("\"prod-typo\""), "{typo}");
        assert!(typo.contains(file), "{typo}");
        let no_file = from_env(&env(&[
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials"),
            ("AWS_PROFILE", "ops"),
        ]));
        assert!(no_file.is_err());
        // Without AWS_PROFILE a missing default profile lets other sources be tried.
        let other = env(&[("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")]);
        assert_eq!(from_env(&other), Ok(None));
    }

    #[test]
    fn parse_incomplete_profile() {
        assert!(parse("[x]\naws_access_key_id = A\n", "x").is_err());
    }
}
