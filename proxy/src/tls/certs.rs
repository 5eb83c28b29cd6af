//! A domain's certificate files: loading, checks against its host names, the OCSP response.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use openssl::asn1::Asn1Time;
use openssl::error::ErrorStack;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::ocsp::{OcspCertId, OcspCertStatus, OcspResponse, OcspResponseStatus};
use openssl::pkey::{PKey, Private};
use openssl::ssl::SslRef;
use openssl::x509::{X509Ref, X509VerifyResult, X509};
use pingora::tls::ext;

/// Paths of a domain's certificate chain, private key and optional OCSP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM certificates: the domain's certificate first, then its intermediates.
    pub cert: PathBuf,
    /// The unencrypted PEM private key of the first certificate.
    pub key: PathBuf,
    /// A DER OCSP response about the first certificate, stapled to every handshake.
    pub ocsp: Option<PathBuf>,
}

/// A domain's certificate chain and private key, loaded and checked, ready for handshakes.
#[derive(Clone)]
pub struct DomainCert {
    leaf: X509,
    /// The certificates after the first one in the file, in file order.
    chain: Vec<X509>,
    key: PKey<Private>,
    ocsp: Option<Vec<u8>>,
    files: CertFiles,
}

/// The file of a domain that a problem is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertFile {
    Cert,
    Key,
    Ocsp,
}

/// One problem with a domain's certificate files, with a reason that names the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertProblem {
    pub file: CertFile,
    pub reason: String,
}

/// A certificate that loaded, with the problems that do not stop it from being served.
pub struct LoadedCert {
    pub cert: DomainCert,
    pub warnings: Vec<CertProblem>,
}

impl DomainCert {
    /// Reads and checks the files of a domain at time `now`.
    ///
    /// The key must match the first certificate. An expired or not yet valid certificate, a
    /// chain out of order and an OCSP response that is outdated or cannot be checked are
    /// warnings.
    ///
    /// # Errors
    ///
    /// Every problem that stops the certificate from being served: a file that cannot be read,
    /// no PEM certificate, a key that is not an unencrypted PEM private key or does not match,
    /// an OCSP response that is not successful, is about another certificate or reports the
    /// certificate as revoked.
    pub fn load(files: &CertFiles, now: SystemTime) -> Result<LoadedCert, Vec<CertProblem>> {
        let mut problems = Vec::new();
        let mut warnings = Vec::new();
        let certs = read(&files.cert, CertFile::Cert).and_then(|pem| parse_chain(&pem, files));
        let key = read(&files.key, CertFile::Key).and_then(|pem| parse_key(&pem, &files.key));
        let ocsp = files
            .ocsp
            .as_ref()
            .map(|path| read(path, CertFile::Ocsp))
            .transpose();
        let (certs, key, ocsp) = match (certs, key, ocsp) {
            (Ok(certs), Ok(key), Ok(ocsp)) => (certs, key, ocsp),
            (certs, key, ocsp) => {
                problems.extend(certs.err());
                problems.extend(key.err());
                problems.extend(ocsp.err());
                return Err(problems);
            }
        };
        let (leaf, chain) = certs;
        if !leaf.public_key().is_ok_and(|public| public.public_eq(&key)) {
            problems.push(problem(
                CertFile::Key,
                format!(
                    "the key does not belong to the first certificate in {}; use the key that \
                     certificate was issued for",
                    files.cert.display()
                ),
            ));
        }
        warnings.extend(validity_warning(&leaf, now));
        warnings.extend(chain_order_warning(&leaf, &chain));
        if let Some(der) = &ocsp {
            match check_ocsp(der, &leaf, &chain) {
                Ok(warning) => warnings.extend(warning),
                Err(reason) => problems.push(problem(CertFile::Ocsp, reason)),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let cert = DomainCert {
            leaf,
            chain,
            key,
            ocsp,
            files: files.clone(),
        };
        Ok(LoadedCert { cert, warnings })
    }

    /// Returns the host patterns that the certificate's subjectAltName does not cover.
    ///
    /// A name is covered by an equal DNS name or by a wildcard for its parent: `*.b.test`
    /// covers `x.b.test` but not `x.y.b.test`. A wildcard pattern is covered only by the same
    /// wildcard, and an IP address only by an equal IP address entry. The subject's common
    /// name is not read, as browsers do not read it either.
    pub fn uncovered<'a>(&self, hosts: &'a [String]) -> Vec<&'a str> {
        let names = self.names();
        hosts
            .iter()
            .map(String::as_str)
            .filter(|host| !names.covers(host))
            .collect()
    }

    /// Returns the subjectAltName entries as text, for messages: `a.test, *.b.test, 127.0.0.1`.
    pub fn names_text(&self) -> String {
        let names = self.names();
        let dns = names.dns.iter().cloned();
        let ips = names.ips.iter().map(IpAddr::to_string);
        let all: Vec<String> = dns.chain(ips).collect();
        if all.is_empty() {
            "none".into()
        } else {
            all.join(", ")
        }
    }

    /// Returns the files the certificate was loaded from.
    pub fn files(&self) -> &CertFiles {
        &self.files
    }

    /// Sets the chain, the key and the OCSP response as this handshake's certificate.
    pub(crate) fn install(&self, ssl: &mut SslRef) -> Result<(), ErrorStack> {
        ext::ssl_use_certificate(ssl, &self.leaf)?;
        for cert in &self.chain {
            ext::ssl_add_chain_cert(ssl, cert)?;
        }
        ext::ssl_use_private_key(ssl, &self.key)?;
        if let Some(der) = &self.ocsp {
            ssl.set_ocsp_status(der)?;
        }
        Ok(())
    }

    fn names(&self) -> AltNames {
        let mut names = AltNames::default();
        for name in self.leaf.subject_alt_names().into_iter().flatten() {
            if let Some(dns) = name.dnsname() {
                names.dns.push(normalize(dns));
            } else if let Some(ip) = name.ipaddress().and_then(ip_from_bytes) {
                names.ips.push(ip);
            }
        }
        names
    }
}

impl fmt::Debug for DomainCert {
    /// Shows the file and the subject, never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DomainCert")
            .field("cert", &self.files.cert)
            .field("subject", &common_name(&self.leaf))
            .field("chain_len", &self.chain.len())
            .field("ocsp", &self.ocsp.is_some())
            .finish()
    }
}

/// The subjectAltName entries of a certificate, DNS names in lower case.
#[derive(Default)]
struct AltNames {
    dns: Vec<String>,
    ips: Vec<IpAddr>,
}

impl AltNames {
    fn covers(&self, pattern: &str) -> bool {
        let host = normalize(pattern);
        if let Some(ip) = parse_ip(&host) {
            return self.ips.contains(&ip);
        }
        if host.starts_with("*.") {
            return self.dns.contains(&host);
        }
        self.dns.iter().any(|name| match name.strip_prefix("*.") {
            Some(parent) => host
                .split_once('.')
                .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
            None => *name == host,
        })
    }
}

fn problem(file: CertFile, reason: String) -> CertProblem {
    CertProblem { file, reason }
}

fn read(path: &Path, file: CertFile) -> Result<Vec<u8>, CertProblem> {
    std::fs::read(path).map_err(|e| {
        problem(
            file,
            format!(
                "cannot read {}: {e}; check the path (relative to the config file's directory) \
                 and that the gateway's user may read it",
                path.display()
            ),
        )
    })
}

/// Splits the PEM file into the domain's certificate and the rest of the chain.
fn parse_chain(pem: &[u8], files: &CertFiles) -> Result<(X509, Vec<X509>), CertProblem> {
    let path = files.cert.display();
    let mut certs = X509::stack_from_pem(pem).map_err(|e| {
        problem(
            CertFile::Cert,
            format!(
                "{path} is not a valid PEM certificate file ({e}); write the certificate, then \
                 its intermediates, each as a -----BEGIN CERTIFICATE----- block"
            ),
        )
    })?;
    if certs.is_empty() {
        return Err(problem(
            CertFile::Cert,
            format!(
                "{path} holds no -----BEGIN CERTIFICATE----- block; write the certificate, then \
                 its intermediates"
            ),
        ));
    }
    let leaf = certs.remove(0);
    Ok((leaf, certs))
}

fn parse_key(pem: &[u8], path: &Path) -> Result<PKey<Private>, CertProblem> {
    let mut encrypted = false;
    // A key that asks for a passphrase gets none, rather than a prompt on the terminal.
    let parsed = PKey::private_key_from_pem_callback(pem, |_| {
        encrypted = true;
        Ok(0)
    });
    parsed.map_err(|e| {
        let reason = if encrypted {
            format!(
                "{} is encrypted and the gateway cannot ask for a passphrase; store it \
                 unencrypted (openssl pkey -in FILE -out FILE.plain) with mode 0600",
                path.display()
            )
        } else {
            format!(
                "{} is not a PEM private key ({e}); point tls_key at the -----BEGIN PRIVATE \
                 KEY----- file of the certificate",
                path.display()
            )
        };
        problem(CertFile::Key, reason)
    })
}

fn validity_warning(leaf: &X509Ref, now: SystemTime) -> Option<CertProblem> {
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let now = Asn1Time::from_unix(i64::try_from(secs).unwrap_or(i64::MAX)).ok()?;
    let reason = if leaf.not_after() < now {
        format!(
            "the certificate expired on {}; clients will refuse it: renew it",
            leaf.not_after()
        )
    } else if leaf.not_before() > now {
        format!(
            "the certificate is valid only from {}; clients will refuse it until then",
            leaf.not_before()
        )
    } else {
        return None;
    };
    Some(problem(CertFile::Cert, reason))
}

/// Warns when a certificate of the chain was not issued by the one after it.
fn chain_order_warning(leaf: &X509, chain: &[X509]) -> Option<CertProblem> {
    let all: Vec<&X509Ref> = std::iter::once(&**leaf)
        .chain(chain.iter().map(|c| &**c))
        .collect();
    let broken = all
        .windows(2)
        .position(|pair| pair[1].issued(pair[0]) != X509VerifyResult::OK)?;
    Some(problem(
        CertFile::Cert,
        format!(
            "certificate {} of the file did not issue certificate {}; order the file as the \
             certificate, then the intermediate that issued it, and so on, or clients may fail \
             to build the chain",
            broken + 2,
            broken + 1
        ),
    ))
}

/// Checks a DER OCSP response: `Err` for one that must not be stapled, `Ok(Some)` for a warning.
fn check_ocsp(der: &[u8], leaf: &X509, chain: &[X509]) -> Result<Option<CertProblem>, String> {
    let response = OcspResponse::from_der(der).map_err(|e| {
        format!("not a DER OCSP response ({e}); fetch one with `openssl ocsp ... -respout FILE`")
    })?;
    if response.status() != OcspResponseStatus::SUCCESSFUL {
        return Err(format!(
            "the OCSP responder did not answer successfully (status {}); fetch a new response",
            response.status().as_raw()
        ));
    }
    let basic = response
        .basic()
        .map_err(|e| format!("the response has no basic OCSP response ({e}); fetch a new one"))?;
    let Some(issuer) = chain
        .iter()
        .find(|c| c.issued(leaf) == X509VerifyResult::OK)
    else {
        return Ok(Some(problem(
            CertFile::Ocsp,
            "cannot check that the response is about this certificate: the certificate file \
             has no issuer certificate after it; add the intermediate"
                .into(),
        )));
    };
    let id = OcspCertId::from_cert(MessageDigest::sha1(), leaf, issuer)
        .map_err(|e| format!("cannot compute the certificate's OCSP id ({e})"))?;
    let status = basic.find_status(&id).ok_or_else(|| {
        "the response is about another certificate; fetch the response for this one".to_string()
    })?;
    if status.status == OcspCertStatus::REVOKED {
        return Err("the response says the certificate is revoked; renew the certificate".into());
    }
    if status.check_validity(300, None).is_err() {
        return Ok(Some(problem(
            CertFile::Ocsp,
            "the response is outdated or not yet valid; clients may ignore it: fetch a new one \
             and reload"
                .into(),
        )));
    }
    Ok(None)
}

fn common_name(cert: &X509Ref) -> String {
    cert.subject_name()
        .entries_by_nid(Nid::COMMONNAME)
        .next()
        .and_then(|entry| entry.data().to_string().ok())
        .unwrap_or_default()
}

/// Lower-cases a name and removes one trailing dot.
fn normalize(name: &str) -> String {
    let lower = name.to_ascii_lowercase();
    match lower.strip_suffix('.') {
        Some(stripped) => stripped.to_string(),
        None => lower,
    }
}

/// Parses `192.0.2.1` or `[2001:db8::1]` as written in `hosts`.
fn parse_ip(host: &str) -> Option<IpAddr> {
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse().ok(),
        None => host.parse().ok(),
    }
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::test_certs::{self_signed, write_pair, Names};

    fn files(dir: &Path) -> CertFiles {
        CertFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            ocsp: None,
        }
    }

    fn hosts(names: &[&str]) -> Vec<String> {
        names.iter().map(|h| h.to_string()).collect()
    }

    #[test]
    fn load_valid_pair() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_pair(dir.path(), &self_signed(&Names::dns(&["a.test"])));
        let loaded = DomainCert::load(&files(dir.path()), SystemTime::now()).expect("loads");
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    }

    #[test]
    fn load_key_mismatch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, _) = self_signed(&Names::dns(&["a.test"]));
        let (_, other_key) = self_signed(&Names::dns(&["a.test"]));
        write_pair(dir.path(), &(cert, other_key));
        let problems = DomainCert::load(&files(dir.path()), SystemTime::now()).err();
        let files: Vec<CertFile> = problems.into_iter().flatten().map(|p| p.file).collect();
        assert_eq!(files, vec![CertFile::Key]);
    }

    #[test]
    fn load_reports_both_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("cert.pem"), "not pem").expect("write");
        let problems = DomainCert::load(&files(dir.path()), SystemTime::now()).err();
        let files: Vec<CertFile> = problems.into_iter().flatten().map(|p| p.file).collect();
        assert_eq!(files, vec![CertFile::Cert, CertFile::Key]);
    }

    #[test]
    fn load_encrypted_key_names_passphrase() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = self_signed(&Names::dns(&["a.test"]));
        write_pair(dir.path(), &(cert, key.clone()));
        let cipher = openssl::symm::Cipher::aes_128_cbc();
        let pem = key
            .private_key_to_pem_pkcs8_passphrase(cipher, b"secret")
            .expect("encrypt");
        std::fs::write(dir.path().join("key.pem"), pem).expect("write");
        let problems = DomainCert::load(&files(dir.path()), SystemTime::now()).err();
        let reason = problems
            .into_iter()
            .flatten()
            .map(|p| p.reason)
            .collect::<String>();
        assert!(reason.contains("encrypted"), "{reason}");
    }

    #[test]
    fn load_expired_warns() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_pair(dir.path(), &self_signed(&Names::dns(&["a.test"])));
        let later = SystemTime::now() + std::time::Duration::from_secs(400 * 86_400);
        let loaded = DomainCert::load(&files(dir.path()), later).expect("loads");
        let reasons: Vec<String> = loaded.warnings.into_iter().map(|w| w.reason).collect();
        assert!(reasons.iter().any(|r| r.contains("expired")), "{reasons:?}");
    }

    #[test]
    fn load_ocsp_garbage_is_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_pair(dir.path(), &self_signed(&Names::dns(&["a.test"])));
        std::fs::write(dir.path().join("ocsp.der"), b"\x30\x03abc").expect("write");
        let mut files = files(dir.path());
        files.ocsp = Some(dir.path().join("ocsp.der"));
        let problems = DomainCert::load(&files, SystemTime::now()).err();
        let files: Vec<CertFile> = problems.into_iter().flatten().map(|p| p.file).collect();
        assert_eq!(files, vec![CertFile::Ocsp]);
    }

    #[test]
    fn uncovered_exact_and_wildcard() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_pair(
            dir.path(),
            &self_signed(&Names::dns(&["a.test", "*.b.test"])),
        );
        let cert = DomainCert::load(&files(dir.path()), SystemTime::now())
            .expect("loads")
            .cert;
        let hosts = hosts(&[
            "A.test.",
            "x.b.test",
            "*.b.test",
            "x.y.b.test",
            "b.test",
            "*.test",
            "c.test",
        ]);
        assert_eq!(
            cert.uncovered(&hosts),
            vec!["x.y.b.test", "b.test", "*.test", "c.test"]
        );
    }

    #[test]
    fn uncovered_ip_addresses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let names = Names {
            dns: vec!["a.test".into()],
            ips: vec!["127.0.0.1".into(), "::1".into()],
        };
        write_pair(dir.path(), &self_signed(&names));
        let cert = DomainCert::load(&files(dir.path()), SystemTime::now())
            .expect("loads")
            .cert;
        let hosts = hosts(&["127.0.0.1", "[0::1]", "127.0.0.2"]);
        assert_eq!(cert.uncovered(&hosts), vec!["127.0.0.2"]);
    }

    #[test]
    fn debug_hides_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_pair(dir.path(), &self_signed(&Names::dns(&["a.test"])));
        let cert = DomainCert::load(&files(dir.path()), SystemTime::now())
            .expect("loads")
            .cert;
        let text = format!("{cert:?}");
        assert!(!text.to_ascii_lowercase().contains("private"), "{text}");
        assert!(text.contains("a.test"), "{text}");
    }
}
