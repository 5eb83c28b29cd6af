//! Reads htpasswd files, parses their entries and verifies passwords against their hashes.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read};
use std::path::Path;

use base64::Engine;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::apr1;
use crate::watched_file::{open_nonblocking, FileStamp};

/// Largest htpasswd file read, in bytes.
pub const MAX_FILE_LEN: u64 = 16 * 1024 * 1024;

/// Cost of the stand-in bcrypt hash when the file has no usable entry to copy the cost from.
const FALLBACK_BCRYPT_COST: u32 = 10;

/// Unsupported hash formats recognised by their prefix, with the name used in warnings.
const UNSUPPORTED_PREFIXES: &[(&str, &str)] = &[
    ("$1$", "MD5-crypt `$1$`"),
    ("$2x$", "bcrypt `$2x$`"),
    ("$5$", "SHA-256-crypt `$5$`"),
    ("$6$", "SHA-512-crypt `$6$`"),
    ("{SSHA}", "salted SHA-1 `{SSHA}`"),
    ("{PLAIN}", "plain text `{PLAIN}`"),
];

/// The users of one htpasswd file and what a password check against each costs.
pub struct Users {
    entries: HashMap<String, Entry>,
    /// A hash of the same kind and cost as the first usable entry, checked for unknown users
    /// so that they cost as much time as known ones.
    stand_in: Hash,
}

impl Users {
    /// Tells whether `password` is the password of `user`.
    ///
    /// An unknown user, or one whose hash is unusable, does the work of a real check against a
    /// stand-in hash and gets `false`.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.entries.get(user) {
            Some(Entry::Usable(hash)) => hash.verify(password),
            _ => {
                std::hint::black_box(self.stand_in.verify(password));
                false
            }
        }
    }

    /// Counts the users that can log in.
    pub fn usable(&self) -> usize {
        self.entries
            .values()
            .filter(|entry| matches!(entry, Entry::Usable(_)))
            .count()
    }
}

/// One line of a file that gives no usable entry, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineIssue {
    /// 1-based line number.
    pub line: usize,
    /// The user name of the line, when it has one.
    pub user: Option<String>,
    pub problem: Problem,
}

/// Reason a line gives no usable entry. It never contains the hash itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    NoSeparator,
    EmptyUser,
    Unsupported(&'static str),
    Malformed(&'static str),
    Duplicate { first_line: usize },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const REDO: &str = "regenerate the entry with `htpasswd -B`";
        match self {
            Self::NoSeparator => write!(f, "no `:` between user name and hash; {REDO}"),
            Self::EmptyUser => write!(f, "empty user name; {REDO}"),
            Self::Unsupported(kind) => write!(
                f,
                "unsupported hash format ({kind}); only bcrypt, `$apr1$` and `{{SHA}}` are \
                 accepted, so this user cannot log in; {REDO}"
            ),
            Self::Malformed(what) => {
                write!(
                    f,
                    "malformed hash ({what}), so this user cannot log in; {REDO}"
                )
            }
            Self::Duplicate { first_line } => write!(
                f,
                "duplicate user; the entry on line {first_line} applies and this one is ignored"
            ),
        }
    }
}

/// Parses the text of an htpasswd file.
///
/// Blank lines and lines starting with `#` are skipped; line ends may be CRLF and lines may
/// carry surrounding whitespace. Each data line is `user:hash`, and fields after a further `:`
/// are ignored. The first line for a user applies, even when its hash is unusable. Every line
/// that gives no usable entry is returned as an issue.
pub fn parse(text: &str) -> (Users, Vec<LineIssue>) {
    let mut entries = HashMap::new();
    let mut first_lines: HashMap<&str, usize> = HashMap::new();
    let mut issues = Vec::new();
    let mut first_usable: Option<Hash> = None;
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let number = index + 1;
        let issue = |user: Option<&str>, problem| LineIssue {
            line: number,
            user: user.map(str::to_owned),
            problem,
        };
        let Some((user, rest)) = line.split_once(':') else {
            issues.push(issue(None, Problem::NoSeparator));
            continue;
        };
        if user.is_empty() {
            issues.push(issue(None, Problem::EmptyUser));
            continue;
        }
        if let Some(first_line) = first_lines.get(user) {
            let problem = Problem::Duplicate {
                first_line: *first_line,
            };
            issues.push(issue(Some(user), problem));
            continue;
        }
        first_lines.insert(user, number);
        let field = rest.split(':').next().unwrap_or_default();
        let entry = match Hash::parse(field) {
            Ok(hash) => {
                first_usable.get_or_insert_with(|| hash.stand_in());
                Entry::Usable(hash)
            }
            Err(problem) => {
                issues.push(issue(Some(user), problem));
                Entry::Unusable
            }
        };
        entries.insert(user.to_owned(), entry);
    }
    let stand_in = first_usable.unwrap_or_else(|| Hash::bcrypt_stand_in(FALLBACK_BCRYPT_COST));
    (Users { entries, stand_in }, issues)
}

/// The contents of the file at one moment, with the metadata it had when it was opened.
pub struct Snapshot {
    pub stamp: FileStamp,
    /// SHA-256 of the contents, to tell a touched file from a changed one.
    pub digest: [u8; 32],
    pub text: String,
}

/// Error from loading an htpasswd file.
#[derive(Debug)]
pub enum LoadError {
    Io(io::Error),
    NotAFile,
    TooLarge,
    NotUtf8 { line: usize },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(err) => write!(f, "{err}; check the path and the file's permissions"),
            Self::NotAFile => f.write_str("not a regular file; point `file` at an htpasswd file"),
            Self::TooLarge => write!(
                f,
                "larger than {} MiB; this is not an htpasswd file",
                MAX_FILE_LEN >> 20
            ),
            Self::NotUtf8 { line } => write!(
                f,
                "line {line} is not valid UTF-8; save the file as UTF-8 text"
            ),
        }
    }
}

/// Reads the file at `path`, with the stamp it had when it was opened.
///
/// The stamp is taken before the contents are read, so a write that lands during the read
/// shows as a changed stamp on the next check.
pub fn read_snapshot(path: &Path) -> Result<Snapshot, LoadError> {
    let file = open_nonblocking(path).map_err(LoadError::Io)?;
    let meta = file.metadata().map_err(LoadError::Io)?;
    if !meta.is_file() {
        return Err(LoadError::NotAFile);
    }
    let stamp = FileStamp::of(&meta);
    let mut bytes = Vec::new();
    file.take(MAX_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(LoadError::Io)?;
    if bytes.len() as u64 > MAX_FILE_LEN {
        return Err(LoadError::TooLarge);
    }
    let digest = Sha256::digest(&bytes).into();
    let text = String::from_utf8(bytes).map_err(|err| {
        let valid = &err.as_bytes()[..err.utf8_error().valid_up_to()];
        let line = valid.iter().filter(|b| **b == b'\n').count() + 1;
        LoadError::NotUtf8 { line }
    })?;
    Ok(Snapshot {
        stamp,
        digest,
        text,
    })
}

/// The file's entry for one user.
enum Entry {
    Usable(Hash),
    /// The user's first line has a hash that cannot be checked: the user cannot log in.
    Unusable,
}

/// A parsed password hash.
enum Hash {
    /// The whole `$2y$`/`$2a$`/`$2b$` string, already checked to be well formed.
    Bcrypt {
        cost: u32,
        text: String,
    },
    Apr1 {
        salt: Vec<u8>,
        digest: [u8; apr1::DIGEST_LEN],
    },
    Sha1([u8; 20]),
}

impl Hash {
    /// Parses the hash field of a line.
    fn parse(field: &str) -> Result<Self, Problem> {
        if field.is_empty() {
            return Err(Problem::Malformed("empty hash"));
        }
        if ["$2y$", "$2a$", "$2b$"]
            .iter()
            .any(|p| field.starts_with(p))
        {
            return parse_bcrypt(field);
        }
        if let Some(rest) = field.strip_prefix("$apr1$") {
            return parse_apr1(rest);
        }
        if let Some(rest) = field.strip_prefix("{SHA}") {
            return parse_sha1(rest);
        }
        let kind = UNSUPPORTED_PREFIXES
            .iter()
            .find(|(prefix, _)| field.starts_with(prefix))
            .map(|(_, kind)| *kind);
        Err(Problem::Unsupported(kind.unwrap_or(
            match field.as_bytes().first() {
                Some(b'$') => "unknown `$` scheme",
                Some(b'{') => "unknown `{}` scheme",
                _ => "plain text or crypt(3) DES",
            },
        )))
    }

    /// Tells whether `password` matches, comparing digests in constant time.
    fn verify(&self, password: &[u8]) -> bool {
        match self {
            Self::Bcrypt { text, .. } => bcrypt::verify(password, text).unwrap_or(false),
            Self::Apr1 { salt, digest } => apr1::digest(password, salt).ct_eq(digest).into(),
            Self::Sha1(digest) => Sha1::digest(password).as_slice().ct_eq(digest).into(),
        }
    }

    /// Builds a hash of the same kind and cost that no password is expected to match.
    fn stand_in(&self) -> Self {
        match self {
            Self::Bcrypt { cost, .. } => Self::bcrypt_stand_in(*cost),
            Self::Apr1 { salt, .. } => Self::Apr1 {
                salt: vec![b'.'; salt.len()],
                digest: [b'.'; apr1::DIGEST_LEN],
            },
            Self::Sha1(_) => Self::Sha1([0; 20]),
        }
    }

    /// Builds a well-formed bcrypt hash of `cost` whose salt and digest are all zero bits.
    fn bcrypt_stand_in(cost: u32) -> Self {
        Self::Bcrypt {
            cost,
            text: format!("$2y${cost:02}${}", ".".repeat(53)),
        }
    }
}

/// Parses `$2y$CC$<22 salt chars><31 digest chars>`, rejecting what `bcrypt` would refuse.
fn parse_bcrypt(field: &str) -> Result<Hash, Problem> {
    let mut parts = field.splitn(4, '$').skip(2);
    let (Some(cost), Some(body)) = (parts.next(), parts.next()) else {
        return Err(Problem::Malformed("bcrypt without cost"));
    };
    let two_digits = cost.len() == 2 && cost.bytes().all(|b| b.is_ascii_digit());
    let cost = match cost.parse::<u32>() {
        Ok(cost) if two_digits && (4..=31).contains(&cost) => cost,
        _ => {
            return Err(Problem::Malformed(
                "bcrypt cost is not two digits from 04 to 31",
            ))
        }
    };
    let decodes_to = |text: &str, len: usize| {
        bcrypt::BASE_64
            .decode(text)
            .is_ok_and(|bytes| bytes.len() == len)
    };
    let well_formed = body.len() == 53
        && body.is_char_boundary(22)
        && decodes_to(&body[..22], 16)
        && decodes_to(&body[22..], 23);
    if !well_formed {
        return Err(Problem::Malformed(
            "bcrypt salt and digest are not 53 characters of the bcrypt alphabet",
        ));
    }
    Ok(Hash::Bcrypt {
        cost,
        text: field.to_owned(),
    })
}

/// Parses `<salt>$<digest>`, the part of an `$apr1$` hash after the prefix.
fn parse_apr1(rest: &str) -> Result<Hash, Problem> {
    let Some((salt, digest)) = rest.split_once('$') else {
        return Err(Problem::Malformed("`$apr1$` without `$` after the salt"));
    };
    if !apr1::is_valid_salt(salt.as_bytes()) {
        return Err(Problem::Malformed(
            "`$apr1$` salt longer than 8 characters or outside the crypt alphabet",
        ));
    }
    let Ok(digest) = <[u8; apr1::DIGEST_LEN]>::try_from(digest.as_bytes()) else {
        return Err(Problem::Malformed("`$apr1$` digest is not 22 characters"));
    };
    if !apr1::is_canonical_digest(&digest) {
        return Err(Problem::Malformed(
            "`$apr1$` digest has characters outside the crypt alphabet",
        ));
    }
    Ok(Hash::Apr1 {
        salt: salt.as_bytes().to_vec(),
        digest,
    })
}

/// Parses the base-64 SHA-1 digest that follows `{SHA}`.
fn parse_sha1(rest: &str) -> Result<Hash, Problem> {
    base64::engine::general_purpose::STANDARD
        .decode(rest)
        .ok()
        .and_then(|bytes| <[u8; 20]>::try_from(bytes).ok())
        .map(Hash::Sha1)
        .ok_or(Problem::Malformed(
            "`{SHA}` value is not base64 of 20 bytes",
        ))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Entries made here with `htpasswd -nb`: -B -C 4, -m and -s, each for password "pw".
    const BCRYPT: &str = "bob:$2y$04$vHrJkLaBmnEn/uJ9AGtuSuFksIqpQuhEwlYGUjA6a3dHOeTK73r46";
    const APR1: &str = "amy:$apr1$Oc37A.hY$i2ql/lh/lsFjguB64sjzO0";
    const SHA: &str = "sam:{SHA}8Wyi36Noi/CMek4hVErxW9WYy3A=";

    fn users(text: &str) -> Users {
        parse(text).0
    }

    fn problems(text: &str) -> Vec<(usize, Option<String>, Problem)> {
        let issues = parse(text).1;
        issues
            .into_iter()
            .map(|i| (i.line, i.user, i.problem))
            .collect()
    }

    #[test]
    fn bcrypt_accepts_right_password() {
        assert!(users(BCRYPT).verify("bob", b"pw"));
    }

    #[test]
    fn bcrypt_rejects_wrong_password() {
        assert!(!users(BCRYPT).verify("bob", b"pW"));
    }

    #[test]
    fn bcrypt_accepts_2a_and_2b() {
        let hash = bcrypt::hash("pw", 4).expect("hash");
        let a = hash.replacen("$2b$", "$2a$", 1);
        assert!(users(&format!("x:{hash}\ny:{a}")).verify("y", b"pw"));
        assert!(users(&format!("x:{hash}")).verify("x", b"pw"));
    }

    #[test]
    fn apr1_accepts_right_password() {
        assert!(users(APR1).verify("amy", b"pw1"));
    }

    #[test]
    fn apr1_rejects_wrong_password() {
        assert!(!users(APR1).verify("amy", b"pw2"));
    }

    #[test]
    fn sha_accepts_right_password() {
        assert!(users(SHA).verify("sam", b"pw2"));
    }

    #[test]
    fn sha_rejects_wrong_password() {
        assert!(!users(SHA).verify("sam", b"pw1"));
    }

    #[test]
    fn unknown_user_rejected() {
        assert!(!users(SHA).verify("nobody", b"pw2"));
    }

    #[test]
    fn unknown_user_costs_like_known() {
        let hash = bcrypt::hash("pw", 6).expect("hash");
        let parsed = users(&format!("bob:{hash}"));
        // The fastest of several runs, so that a loaded machine slowing one run down cannot
        // make the comparison fail.
        let fastest = |user: &str| {
            (0..3)
                .map(|_| {
                    let started = std::time::Instant::now();
                    parsed.verify(user, b"wrong");
                    started.elapsed()
                })
                .min()
                .unwrap_or_default()
        };
        let known = fastest("bob");
        let unknown = fastest("nobody");
        // Without the stand-in an unknown user costs a hash lookup, thousands of times less.
        assert!(unknown * 4 > known, "unknown {unknown:?}, known {known:?}");
    }

    #[test]
    fn malformed_lines_fail_closed() {
        let text = "plain:secret\ndes:qWeo3KVUEnwFc\nsix:$6$abc$def\nfive:$5$abc$def\n\
                    odd:$9$x\nbrace:{MD5}x\nempty:\nshortb:$2y$05$abc\ncost:$2y$99$x\n\
                    salt:$apr1$toolongsalt$i2ql/lh/lsFjguB64sjzO0\nsha:{SHA}AAAA\n";
        let parsed = users(text);
        for user in [
            "plain", "des", "six", "five", "odd", "brace", "empty", "shortb",
        ] {
            assert!(!parsed.verify(user, b"secret"), "user {user}");
        }
        assert_eq!(parsed.usable(), 0);
        assert_eq!(problems(text).len(), 11);
    }

    #[test]
    fn plain_text_not_accepted_with_its_own_password() {
        assert!(!users("plain:secret").verify("plain", b"secret"));
    }

    #[test]
    fn plain_scheme_named_in_problem() {
        assert!(!users("plain:{PLAIN}secret").verify("plain", b"secret"));
        let found = problems("plain:{PLAIN}secret\n");
        let expected = (
            1,
            Some("plain".to_owned()),
            Problem::Unsupported("plain text `{PLAIN}`"),
        );
        assert_eq!(found, vec![expected]);
    }

    #[test]
    fn issues_name_line_and_user() {
        let found = problems("# header\n\nok:{SHA}8Wyi36Noi/CMek4hVErxW9WYy3A=\nbad:$6$x$y\n");
        let expected = (
            4,
            Some("bad".to_owned()),
            Problem::Unsupported("SHA-512-crypt `$6$`"),
        );
        assert_eq!(found, vec![expected]);
    }

    #[test]
    fn issue_text_never_holds_hash() {
        for (_, _, problem) in problems("a:secretpass\nb:$6$saltsalt$hashhash\nc:{SHA}zz") {
            let shown = problem.to_string();
            assert!(!shown.contains("secretpass"), "{shown}");
            assert!(!shown.contains("hashhash"), "{shown}");
        }
    }

    #[test]
    fn missing_separator_reported_without_user() {
        assert_eq!(problems("justtext"), vec![(1, None, Problem::NoSeparator)]);
    }

    #[test]
    fn empty_user_reported() {
        assert_eq!(problems(":{SHA}x")[0].2, Problem::EmptyUser);
    }

    #[test]
    fn crlf_and_trailing_whitespace_tolerated() {
        let text = format!("# c\r\n{SHA} \t\r\n\r\n{APR1}\r\n");
        let parsed = users(&text);
        assert!(parsed.verify("sam", b"pw2"));
        assert!(parsed.verify("amy", b"pw1"));
    }

    #[test]
    fn comments_skipped() {
        assert!(problems("# just a comment\n   # indented comment\n").is_empty());
    }

    #[test]
    fn extra_fields_ignored() {
        assert!(users(&format!("{SHA}:Sam Smith")).verify("sam", b"pw2"));
    }

    #[test]
    fn duplicate_first_wins() {
        let text = format!("{SHA}\nsam:{{SHA}}Sx/p3CumeGNqNvSxKr0/u+VQ3Pc=\n");
        let parsed = users(&text);
        assert!(parsed.verify("sam", b"pw2"));
    }

    #[test]
    fn duplicate_reported() {
        let text = format!("{SHA}\n{SHA}\n");
        let expected = (
            2,
            Some("sam".to_owned()),
            Problem::Duplicate { first_line: 1 },
        );
        assert_eq!(problems(&text), vec![expected]);
    }

    #[test]
    fn duplicate_of_unusable_line_stays_unusable() {
        let text = format!("sam:plain\n{SHA}\n");
        assert!(!users(&text).verify("sam", b"pw2"));
    }

    #[test]
    fn stand_in_copies_bcrypt_cost() {
        let parsed = users(&format!("{SHA}\n{BCRYPT}"));
        assert!(matches!(parsed.stand_in, Hash::Sha1(_)));
        let parsed = users(&format!("{BCRYPT}\n{SHA}"));
        assert!(matches!(parsed.stand_in, Hash::Bcrypt { cost: 4, .. }));
    }

    #[test]
    fn stand_in_defaults_to_bcrypt_ten() {
        assert!(matches!(users("").stand_in, Hash::Bcrypt { cost: 10, .. }));
    }

    #[test]
    fn stand_in_bcrypt_is_checkable() {
        let Hash::Bcrypt { text, .. } = Hash::bcrypt_stand_in(4) else {
            panic!("bcrypt stand-in");
        };
        assert_eq!(bcrypt::verify("pw", &text).ok(), Some(false));
    }

    #[test]
    fn stand_in_apr1_is_well_formed() {
        let parsed = users(APR1);
        assert!(matches!(&parsed.stand_in, Hash::Apr1 { salt, .. } if salt.len() == 8));
    }

    #[test]
    fn snapshot_reports_invalid_utf8_line() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("users");
        std::fs::write(&path, b"a:{SHA}x\nb:\xff\n").expect("write");
        let err = read_snapshot(&path).err();
        assert!(
            matches!(err, Some(LoadError::NotUtf8 { line: 2 })),
            "{err:?}"
        );
    }

    #[test]
    fn snapshot_rejects_directory() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = read_snapshot(dir.path()).err();
        assert!(matches!(err, Some(LoadError::NotAFile)), "{err:?}");
    }

    #[test]
    fn snapshot_rejects_fifo_without_waiting() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("users");
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .expect("run mkfifo");
        assert!(made.success(), "mkfifo");
        let err = read_snapshot(&path).err();
        assert!(matches!(err, Some(LoadError::NotAFile)), "{err:?}");
    }
}
