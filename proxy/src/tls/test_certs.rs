//! Test certificates made in memory: self-signed P-256 certificates with chosen names.

use std::path::Path;

use openssl::asn1::Asn1Time;
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::SubjectAlternativeName;
use openssl::x509::{X509NameBuilder, X509};

/// The subjectAltName entries of a test certificate.
pub struct Names {
    pub dns: Vec<String>,
    pub ips: Vec<String>,
}

impl Names {
    /// DNS names only.
    pub fn dns(names: &[&str]) -> Self {
        Self {
            dns: names.iter().map(|n| n.to_string()).collect(),
            ips: Vec::new(),
        }
    }
}

/// Makes a self-signed certificate valid for 30 days, its common name the first DNS name.
pub fn self_signed(names: &Names) -> (X509, PKey<Private>) {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("curve");
    let key = PKey::from_ec_key(EcKey::generate(&group).expect("ec key")).expect("pkey");
    let mut name = X509NameBuilder::new().expect("name builder");
    let cn = names.dns.first().map_or("test", String::as_str);
    name.append_entry_by_nid(Nid::COMMONNAME, cn).expect("cn");
    let name = name.build();
    let mut builder = X509::builder().expect("builder");
    builder.set_version(2).expect("version");
    let serial = BigNum::from_u32(1).and_then(|n| n.to_asn1_integer());
    builder
        .set_serial_number(&serial.expect("serial"))
        .expect("set serial");
    builder.set_subject_name(&name).expect("subject");
    builder.set_issuer_name(&name).expect("issuer");
    builder.set_pubkey(&key).expect("pubkey");
    let not_before = Asn1Time::days_from_now(0).expect("now");
    let not_after = Asn1Time::days_from_now(30).expect("later");
    builder.set_not_before(&not_before).expect("not before");
    builder.set_not_after(&not_after).expect("not after");
    let mut san = SubjectAlternativeName::new();
    for dns in &names.dns {
        san.dns(dns);
    }
    for ip in &names.ips {
        san.ip(ip);
    }
    let san = san.build(&builder.x509v3_context(None, None)).expect("san");
    builder.append_extension(san).expect("append san");
    builder.sign(&key, MessageDigest::sha256()).expect("sign");
    (builder.build(), key)
}

/// Writes `cert.pem` and `key.pem` into `dir`.
pub fn write_pair(dir: &Path, (cert, key): &(X509, PKey<Private>)) {
    let cert = cert.to_pem().expect("cert pem");
    let key = key.private_key_to_pem_pkcs8().expect("key pem");
    std::fs::write(dir.join("cert.pem"), cert).expect("write cert");
    std::fs::write(dir.join("key.pem"), key).expect("write key");
}
