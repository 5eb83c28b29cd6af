//! Validation of the TLS keys: listeners, certificate files, default domain, HTTPS redirects.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use toml::{Table, Value};

use super::super::schema::{DomainTlsSection, ServerTlsSection};
use super::super::{Domain, DomainTls, TlsConfig};
use super::{resolve, Errors};
use crate::tls::{CertFile, CertFiles, DomainCert};

/// The TLS keys taken out of `[server]` and out of each domain's table.
pub(super) struct TlsKeys {
    server: Option<Value>,
    domains: BTreeMap<String, Value>,
}

/// Takes the TLS keys out of `[server]` and each `[domains.<id>]`, so that those sections
/// parse without them.
pub(super) fn take_keys(root: &mut Table) -> TlsKeys {
    let server = root
        .get_mut("server")
        .and_then(Value::as_table_mut)
        .and_then(|t| take(t, ServerTlsSection::KEYS));
    let mut domains = BTreeMap::new();
    if let Some(tables) = root.get_mut("domains").and_then(Value::as_table_mut) {
        for (id, table) in tables.iter_mut() {
            let keys = table
                .as_table_mut()
                .and_then(|t| take(t, DomainTlsSection::KEYS));
            if let Some(keys) = keys {
                domains.insert(id.clone(), keys);
            }
        }
    }
    TlsKeys { server, domains }
}

/// The context of the TLS checks: config directory, time, and the error and warning lists.
pub(super) struct TlsCheck<'e, 'a> {
    pub dir: &'e Path,
    /// The time certificates and OCSP responses must be valid at.
    pub now: SystemTime,
    pub errors: &'e mut Errors<'a>,
    pub warnings: &'e mut Errors<'a>,
}

impl TlsCheck<'_, '_> {
    /// Validates the TLS keys against the validated domains and the plain-HTTP listeners.
    pub(super) fn run(
        &mut self,
        keys: TlsKeys,
        domains: &[Domain],
        plain_listen: &[SocketAddr],
    ) -> TlsConfig {
        let server: ServerTlsSection = self.errors.section(keys.server, "server");
        let listen = self.listen(&server.tls_listen, plain_listen);
        let has_listen = !server.tls_listen.is_empty();
        let mut config = TlsConfig {
            listen,
            ..TlsConfig::default()
        };
        let mut declared = BTreeSet::new();
        for (id, value) in keys.domains {
            let key = format!("domains.{id}");
            let Some(section) = self.errors.parse::<DomainTlsSection>(value, &key) else {
                continue;
            };
            if section.tls_cert.is_some() && section.tls_key.is_some() {
                declared.insert(id.clone());
            }
            let hosts = domains
                .iter()
                .find(|d| d.id == id)
                .map(|d| d.hosts.as_slice());
            if let Some(tls) = self.domain(&key, section, hosts, has_listen) {
                config.domains.insert(id, tls);
            }
        }
        self.listeners_and_certs(has_listen, &declared);
        config.default_domain = self.default_domain(server.tls_default_domain, &declared);
        if has_listen {
            self.ip_hosts(domains, &config);
        }
        config
    }

    /// Warns about each IP address in the `hosts` of a domain with a certificate other than
    /// `tls_default_domain`. A client that connects to an IP address sends no server name
    /// (RFC 6066, section 3), so its handshake selects no domain and fails.
    fn ip_hosts(&mut self, domains: &[Domain], config: &TlsConfig) {
        for domain in domains {
            let has_cert = config
                .domains
                .get(&domain.id)
                .is_some_and(|tls| tls.cert.is_some());
            if !has_cert || config.default_domain.as_deref() == Some(domain.id.as_str()) {
                continue;
            }
            let addresses = domain.hosts.iter().filter(|host| {
                let bare = host.trim_start_matches('[').trim_end_matches(']');
                bare.parse::<std::net::IpAddr>().is_ok()
            });
            for host in addresses {
                let reason = format!(
                    "an IP address: HTTPS clients that connect to it send no server name (SNI), \
                     so no certificate is selected and the handshake fails; set \
                     server.tls_default_domain = {:?} if clients reach this domain by address",
                    domain.id
                );
                self.warnings.push(
                    &format!("domains.{}.hosts", domain.id),
                    Some(format!("{host:?}")),
                    reason,
                );
            }
        }
    }

    fn listen(&mut self, texts: &[String], plain: &[SocketAddr]) -> Vec<SocketAddr> {
        let mut listen: Vec<SocketAddr> = Vec::new();
        for (i, text) in texts.iter().enumerate() {
            let key = format!("server.tls_listen[{i}]");
            let value = Some(format!("{text:?}"));
            match text.parse::<SocketAddr>() {
                Ok(addr) if addr.port() != 0 && plain.contains(&addr) => self.errors.push(
                    &key,
                    value,
                    "server.listen has this address too; one port serves either plain HTTP or \
                     TLS, so change one of them",
                ),
                Ok(addr) if addr.port() != 0 && listen.contains(&addr) => self.errors.push(
                    &key,
                    value,
                    "listed twice; the second bind would fail, so remove one",
                ),
                Ok(addr) => listen.push(addr),
                Err(_) => self.errors.push(
                    &key,
                    value,
                    "not an IP address with a port; write e.g. \"0.0.0.0:443\" or \"[::]:8443\"",
                ),
            }
        }
        listen
    }

    /// Checks one domain's keys and loads its certificate; `None` when it serves no TLS or
    /// has errors.
    fn domain(
        &mut self,
        key: &str,
        section: DomainTlsSection,
        hosts: Option<&[String]>,
        has_listen: bool,
    ) -> Option<DomainTls> {
        let (cert, private) = self.key_rules(key, &section, has_listen)?;
        let at = |name: &str| format!("{key}.{name}");
        let files = CertFiles {
            cert: resolve(self.dir, &cert),
            key: resolve(self.dir, &private),
            ocsp: section.tls_ocsp.as_deref().map(|o| resolve(self.dir, o)),
        };
        let text = |file: CertFile| match file {
            CertFile::Cert => Some(format!("{cert:?}")),
            CertFile::Key => Some(format!("{private:?}")),
            CertFile::Ocsp => section.tls_ocsp.as_ref().map(|o| format!("{o:?}")),
        };
        let loaded = match DomainCert::load(&files, self.now) {
            Ok(loaded) => loaded,
            Err(problems) => {
                for p in problems {
                    self.errors
                        .push(&at(file_key(p.file)), text(p.file), p.reason);
                }
                return None;
            }
        };
        for w in loaded.warnings {
            self.warnings
                .push(&at(file_key(w.file)), text(w.file), w.reason);
        }
        let uncovered = hosts.map(|h| loaded.cert.uncovered(h)).unwrap_or_default();
        if !uncovered.is_empty() {
            let reason = format!(
                "the certificate does not cover {uncovered:?} (its names: {}); clients that \
                 check names refuse it for those hosts, which is fine only for hosts never \
                 reached over HTTPS",
                loaded.cert.names_text()
            );
            self.warnings
                .push(&at("tls_cert"), text(CertFile::Cert), reason);
        }
        Some(DomainTls {
            cert: Some(Arc::new(loaded.cert)),
            redirect_to_https: section.redirect_to_https,
        })
    }

    /// Checks which keys a domain sets together; returns its certificate and key paths when
    /// it sets both.
    fn key_rules(
        &mut self,
        key: &str,
        section: &DomainTlsSection,
        has_listen: bool,
    ) -> Option<(String, String)> {
        let at = |name: &str| format!("{key}.{name}");
        let (cert, private) = (&section.tls_cert, &section.tls_key);
        if cert.is_some() && private.is_none() {
            let reason = "missing; tls_cert needs its private key: set tls_key to the PEM key file";
            self.errors.push(&at("tls_key"), None, reason);
        }
        if cert.is_none() && private.is_some() {
            let reason = "missing; tls_key needs its certificate: set tls_cert to the PEM \
                          certificate chain file";
            self.errors.push(&at("tls_cert"), None, reason);
        }
        let pair = cert.clone().zip(private.clone());
        if pair.is_none() {
            if let Some(ocsp) = &section.tls_ocsp {
                let reason = "needs tls_cert and tls_key: a response is stapled to the domain's \
                              certificate";
                self.errors
                    .push(&at("tls_ocsp"), Some(format!("{ocsp:?}")), reason);
            }
            if section.redirect_to_https {
                let reason = "the domain has no certificate (tls_cert and tls_key), so the HTTPS \
                              URL would fail; add them or set false";
                self.errors
                    .push(&at("redirect_to_https"), Some("true".into()), reason);
            }
        }
        if section.redirect_to_https && !has_listen {
            let reason = "server.tls_listen is empty, so there is no HTTPS listener to redirect \
                          to; add one or set false";
            self.errors
                .push(&at("redirect_to_https"), Some("true".into()), reason);
        }
        pair
    }

    fn listeners_and_certs(&mut self, has_listen: bool, declared: &BTreeSet<String>) {
        let names = declared.iter().cloned().collect::<Vec<_>>().join(", ");
        if has_listen && declared.is_empty() {
            self.errors.push(
                "server.tls_listen",
                None,
                "no domain has tls_cert and tls_key, so every handshake would fail; add them to \
                 a domain or remove tls_listen",
            );
        }
        if !has_listen && !declared.is_empty() {
            self.warnings.push(
                "server.tls_listen",
                Some("[]".into()),
                format!(
                    "no TLS listener, so the certificates of {names} are not used; add an \
                     address such as \"0.0.0.0:443\""
                ),
            );
        }
    }

    fn default_domain(
        &mut self,
        id: Option<String>,
        declared: &BTreeSet<String>,
    ) -> Option<String> {
        let id = id?;
        if declared.contains(&id) {
            return Some(id);
        }
        let known = if declared.is_empty() {
            "none has".to_string()
        } else {
            format!(
                "these have: {}",
                declared.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        };
        self.errors.push(
            "server.tls_default_domain",
            Some(format!("{id:?}")),
            format!(
                "no domain of that id has tls_cert and tls_key ({known}); name one of them, or \
                 remove the key to refuse handshakes without a known server name"
            ),
        );
        None
    }
}

/// Returns the config key of a domain's file.
fn file_key(file: CertFile) -> &'static str {
    match file {
        CertFile::Cert => "tls_cert",
        CertFile::Key => "tls_key",
        CertFile::Ocsp => "tls_ocsp",
    }
}

/// Moves `keys` out of `table` into a new table; `None` when it has none of them.
fn take(table: &mut Table, keys: &[&str]) -> Option<Value> {
    let taken: Table = keys
        .iter()
        .filter_map(|k| table.remove(*k).map(|v| (k.to_string(), v)))
        .collect();
    (!taken.is_empty()).then_some(Value::Table(taken))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Loads a config with one domain `a` (`a.test`) whose table ends with `domain`, and a
    /// `[server]` section with `server`; returns the keys of its errors.
    fn error_keys(dir: &Path, server: &str, domain: &str) -> Vec<String> {
        let text = format!(
            "[server]\nlisten = [\"127.0.0.1:8080\"]\n{server}\n\
             [domains.a]\nhosts = [\"a.test\"]\n{domain}\n\
             [domains.a.origins.web]\nkind = \"http\"\naddresses = [\"127.0.0.1:9\"]\n\
             [[domains.a.routes]]\nprefix = \"/\"\norigin = \"web\"\n"
        );
        let path = dir.join("gateway.toml");
        match crate::config::load_str(&text, &path, Vec::new()) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.into_iter().map(|e| e.key).collect(),
        }
    }

    #[test]
    fn tls_listen_without_certificates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = error_keys(dir.path(), "tls_listen = [\"127.0.0.1:8443\"]", "");
        assert_eq!(keys, vec!["server.tls_listen"]);
    }

    #[test]
    fn tls_listen_shared_with_listen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = "tls_listen = [\"127.0.0.1:8080\"]";
        let keys = error_keys(
            dir.path(),
            server,
            "tls_cert = \"a.pem\"\ntls_key = \"a.key\"",
        );
        assert!(
            keys.contains(&"server.tls_listen[0]".to_string()),
            "{keys:?}"
        );
    }

    #[test]
    fn tls_listen_port_zero_twice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = "tls_listen = [\"127.0.0.1:0\", \"127.0.0.1:0\", \"127.0.0.1:x\"]";
        let keys = error_keys(dir.path(), server, "");
        assert_eq!(keys, vec!["server.tls_listen[2]", "server.tls_listen"]);
    }

    #[test]
    fn half_pair_and_orphans() {
        let dir = tempfile::tempdir().expect("tempdir");
        let domain = "tls_cert = \"a.pem\"\ntls_ocsp = \"a.ocsp\"\nredirect_to_https = true";
        let keys = error_keys(dir.path(), "", domain);
        let want = [
            "domains.a.tls_key",
            "domains.a.tls_ocsp",
            "domains.a.redirect_to_https",
            "domains.a.redirect_to_https",
        ];
        assert_eq!(keys, want);
    }

    #[test]
    fn default_domain_unknown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = error_keys(dir.path(), "tls_default_domain = \"a\"", "");
        assert_eq!(keys, vec!["server.tls_default_domain"]);
    }

    #[test]
    fn missing_files_name_each_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = "tls_listen = [\"127.0.0.1:0\"]";
        let domain = "tls_cert = \"a.pem\"\ntls_key = \"a.key\"\ntls_ocsp = \"a.ocsp\"";
        let keys = error_keys(dir.path(), server, domain);
        let want = [
            "domains.a.tls_cert",
            "domains.a.tls_key",
            "domains.a.tls_ocsp",
        ];
        assert_eq!(keys, want);
    }

    #[test]
    fn wrong_type_names_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = error_keys(dir.path(), "tls_listen = \"127.0.0.1:443\"", "");
        assert_eq!(keys, vec!["server.tls_listen"]);
    }
}
