//! Checks detached signatures of bundles: cosign's blob form and detached JWS.
//!
//! - Cosign blob form (what `cosign sign-blob` and `openssl dgst -sha256 -sign | base64`
//!   write): base64 of a DER ECDSA P-256 signature over the file's SHA-256.
//! - Detached JWS (RFC 7515 compact form with an empty payload part, `header..signature`),
//!   with `alg` `ES256` or `EdDSA` (Ed25519). With `"b64": false` (RFC 7797) the signed
//!   payload is the file's bytes; otherwise it is their base64url form.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::pkcs8::DecodePublicKey;
use sha2::{Digest, Sha256};

/// Largest signature file read, in bytes.
const MAX_SIGNATURE_LEN: usize = 16 * 1024;

/// A public key that signatures are checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// ECDSA over P-256 (cosign blobs, JWS `ES256`).
    P256(p256::ecdsa::VerifyingKey),
    /// Ed25519 (JWS `EdDSA`).
    Ed25519(ed25519_dalek::VerifyingKey),
}

impl PublicKey {
    /// Parses a PEM `PUBLIC KEY` (SubjectPublicKeyInfo) holding a P-256 or Ed25519 key.
    pub fn from_pem(pem: &str) -> Result<Self, String> {
        if let Ok(key) = p256::ecdsa::VerifyingKey::from_public_key_pem(pem) {
            return Ok(Self::P256(key));
        }
        ed25519_dalek::VerifyingKey::from_public_key_pem(pem)
            .map(Self::Ed25519)
            .map_err(|_| {
                "is not a PEM public key (-----BEGIN PUBLIC KEY-----) for P-256 or Ed25519"
                    .to_string()
            })
    }

    /// Reads and parses a PEM public key file.
    pub fn from_pem_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::from_pem(&text).map_err(|e| format!("{} {e}", path.display()))
    }
}

/// Checks the detached signature `signature` (a file's content) over the file `payload`,
/// whose SHA-256 is `payload_sha256`.
///
/// Returns why the check failed: an unknown format or algorithm, a key of the wrong type,
/// or a signature that does not match.
pub fn verify(
    key: &PublicKey,
    signature: &[u8],
    payload: &Path,
    payload_sha256: &[u8; 32],
) -> Result<(), String> {
    if signature.len() > MAX_SIGNATURE_LEN {
        return Err(format!("the signature is over {MAX_SIGNATURE_LEN} bytes"));
    }
    let text = std::str::from_utf8(signature)
        .map_err(|_| "the signature is not text".to_string())?
        .trim();
    if text.contains('.') {
        verify_jws(key, text, payload)
    } else {
        verify_cosign(key, text, payload_sha256)
    }
}

fn verify_cosign(key: &PublicKey, text: &str, sha256: &[u8; 32]) -> Result<(), String> {
    let PublicKey::P256(key) = key else {
        return Err("a cosign blob signature needs a P-256 public key".to_string());
    };
    let der = STANDARD
        .decode(text)
        .map_err(|e| format!("the signature is not base64: {e}"))?;
    let signature = p256::ecdsa::Signature::from_der(&der)
        .map_err(|_| "the signature is not a DER ECDSA signature".to_string())?;
    key.verify_prehash(sha256, &signature)
        .map_err(|_| "the signature does not match the file and key".to_string())
}

/// The protected header fields this module understands.
#[derive(serde::Deserialize)]
struct JwsHeader {
    alg: String,
    #[serde(default = "yes")]
    b64: bool,
    #[serde(default)]
    crit: Vec<String>,
}

fn yes() -> bool {
    true
}

fn verify_jws(key: &PublicKey, text: &str, payload: &Path) -> Result<(), String> {
    let mut parts = text.split('.');
    let (Some(header_b64), Some(""), Some(sig_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("a JWS must be detached: header..signature".to_string());
    };
    let header_json = URL_SAFE_NO_PAD
        .decode(header_b64)
        .map_err(|e| format!("the JWS header is not base64url: {e}"))?;
    let header: JwsHeader = serde_json::from_slice(&header_json)
        .map_err(|e| format!("the JWS header is not valid: {e}"))?;
    if let Some(name) = header.crit.iter().find(|c| *c != "b64") {
        return Err(format!(
            "the JWS header marks {name:?} critical, which is not supported"
        ));
    }
    let sig = URL_SAFE_NO_PAD
        .decode(sig_b64)
        .map_err(|e| format!("the JWS signature is not base64url: {e}"))?;
    let mismatch = || "the JWS signature does not match the file and key".to_string();
    match (header.alg.as_str(), key) {
        ("ES256", PublicKey::P256(key)) => {
            let signature = p256::ecdsa::Signature::from_slice(&sig)
                .map_err(|_| "an ES256 signature must be 64 bytes".to_string())?;
            let digest = signing_input_sha256(header_b64, header.b64, payload)?;
            key.verify_prehash(&digest, &signature)
                .map_err(|_| mismatch())
        }
        ("EdDSA", PublicKey::Ed25519(key)) => {
            let signature = ed25519_dalek::Signature::from_slice(&sig)
                .map_err(|_| "an EdDSA signature must be 64 bytes".to_string())?;
            let input = signing_input(header_b64, header.b64, payload)?;
            key.verify_strict(&input, &signature)
                .map_err(|_| mismatch())
        }
        ("ES256" | "EdDSA", _) => Err(format!(
            "the JWS algorithm {} does not fit the configured public key",
            header.alg
        )),
        (alg, _) => Err(format!(
            "the JWS algorithm {alg:?} is not supported (ES256, EdDSA)"
        )),
    }
}

/// Hashes the JWS signing input, streaming the payload file when it is not base64url-encoded.
fn signing_input_sha256(header_b64: &str, b64: bool, payload: &Path) -> Result<[u8; 32], String> {
    if b64 {
        return Ok(Sha256::digest(signing_input(header_b64, true, payload)?).into());
    }
    let mut hasher = Sha256::new();
    hasher.update(header_b64.as_bytes());
    hasher.update(b".");
    let mut file = open(payload)?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf).map_err(|e| read_err(payload, e))?;
        if n == 0 {
            return Ok(hasher.finalize().into());
        }
        hasher.update(&buf[..n]);
    }
}

/// Builds the whole JWS signing input in memory (EdDSA needs it whole).
fn signing_input(header_b64: &str, b64: bool, payload: &Path) -> Result<Vec<u8>, String> {
    let mut data = Vec::new();
    open(payload)?
        .read_to_end(&mut data)
        .map_err(|e| read_err(payload, e))?;
    let body = if b64 {
        URL_SAFE_NO_PAD.encode(&data).into_bytes()
    } else {
        data
    };
    let mut input = Vec::with_capacity(header_b64.len() + 1 + body.len());
    input.extend_from_slice(header_b64.as_bytes());
    input.push(b'.');
    input.extend_from_slice(&body);
    Ok(input)
}

fn open(path: &Path) -> Result<File, String> {
    File::open(path).map_err(|e| read_err(path, e))
}

fn read_err(path: &Path, e: std::io::Error) -> String {
    format!("reading {}: {e}", path.display())
}
