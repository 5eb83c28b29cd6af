//! Verification before publishing: digests listed in manifests, cosign and JWS signatures.

mod common;

use std::path::Path;
use std::sync::Arc;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use common::*;
use ed25519_dalek::Signer;
use mirror_sync::signature::PublicKey;
use mirror_sync::{run_job, DirSource, JobSettings, SyncError};
use p256::ecdsa::signature::hazmat::PrehashSigner;
use p256::pkcs8::{EncodePublicKey, LineEnding};
use sha2::{Digest, Sha256};

const BUNDLE: &str = "mirror/primary/bundle.json";

fn p256_key() -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).expect("key")
}

fn ed_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[9u8; 32])
}

fn p256_public(key: &p256::ecdsa::SigningKey) -> Arc<PublicKey> {
    let pem = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("pem");
    Arc::new(PublicKey::from_pem(&pem).expect("parse"))
}

fn ed_public(key: &ed25519_dalek::SigningKey) -> Arc<PublicKey> {
    let pem = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("pem");
    Arc::new(PublicKey::from_pem(&pem).expect("parse"))
}

fn cosign(key: &p256::ecdsa::SigningKey, data: &[u8]) -> String {
    let sig: p256::ecdsa::Signature = key.sign_prehash(&Sha256::digest(data)).expect("sign");
    STANDARD.encode(sig.to_der().as_bytes())
}

fn jws_header(alg: &str, b64: bool) -> String {
    let header = match b64 {
        false => format!(r#"{{"alg":"{alg}","b64":false,"crit":["b64"]}}"#),
        true => format!(r#"{{"alg":"{alg}"}}"#),
    };
    URL_SAFE_NO_PAD.encode(header)
}

fn jws_es256(key: &p256::ecdsa::SigningKey, data: &[u8], b64: bool) -> String {
    let header = jws_header("ES256", b64);
    let payload = match b64 {
        true => URL_SAFE_NO_PAD.encode(data).into_bytes(),
        false => data.to_vec(),
    };
    let input = [header.as_bytes(), b".", &payload].concat();
    let sig: p256::ecdsa::Signature = key.sign_prehash(&Sha256::digest(&input)).expect("sign");
    format!("{header}..{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
}

fn jws_eddsa(key: &ed25519_dalek::SigningKey, data: &[u8]) -> String {
    let header = jws_header("EdDSA", false);
    let input = [header.as_bytes(), b".", data].concat();
    format!(
        "{header}..{}",
        URL_SAFE_NO_PAD.encode(key.sign(&input).to_bytes())
    )
}

/// Writes a one-domain export whose bundle is `bundle`, signed as `sig`.
fn export(dir: &Path, bundle: &str, sig: &str) {
    let manifest = format!(
        r#"{{"bundle": {{"path": "bundle.json", "sha256": "{}", "size": {}}}}}"#,
        sha256_hex(bundle.as_bytes()),
        bundle.len()
    );
    let index = format!(
        r#"{{"domains": [{{"manifest": {{"path": "mirror/primary/manifest.json", "sha256": "{}"}}}}]}}"#,
        sha256_hex(manifest.as_bytes())
    );
    write_tree(
        dir,
        &[
            (BUNDLE, bundle.as_bytes()),
            ("mirror/primary/bundle.json.jws", sig.as_bytes()),
            ("mirror/primary/manifest.json", manifest.as_bytes()),
            ("mirror/index.json", index.as_bytes()),
        ],
    );
}

fn signed_job(src: &Path, dest: &Path, key: Arc<PublicKey>) -> JobSettings {
    let mut job = dir_job(src, dest);
    job.public_key = Some(key);
    job
}

#[tokio::test]
async fn cosign_signature_published() {
    let (src, dest) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let key = p256_key();
    export(src.path(), r#"{"n": 1}"#, &cosign(&key, br#"{"n": 1}"#));
    let job = signed_job(src.path(), dest.path(), p256_public(&key));
    let report = run_job(&job, &DirSource::new(src.path()), &at(0))
        .await
        .expect("run");
    assert_eq!(
        (report.verified.signatures, report.verified.digests),
        (1, 2)
    );
}

#[tokio::test]
async fn bad_signature_blocks_publish() {
    let (src, dest) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let key = p256_key();
    export(src.path(), r#"{"n": 1}"#, &cosign(&key, br#"{"n": 1}"#));
    let job = signed_job(src.path(), dest.path(), p256_public(&key));
    run_job(&job, &DirSource::new(src.path()), &at(0))
        .await
        .expect("first");
    export(src.path(), r#"{"n": 2}"#, &cosign(&key, br#"{"n": 1}"#));
    let err = run_job(&job, &DirSource::new(src.path()), &at(60))
        .await
        .expect_err("must fail");
    assert!(
        matches!(&err, SyncError::Verify { key, .. } if key == BUNDLE),
        "{err}"
    );
    assert_eq!(read_latest(dest.path(), BUNDLE), r#"{"n": 1}"#);
    assert_eq!(temp_entries(dest.path()), Vec::<String>::new());
}

#[tokio::test]
async fn missing_signature_blocks_publish() {
    let (src, dest) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let key = p256_key();
    export(src.path(), "{}", &cosign(&key, b"{}"));
    std::fs::remove_file(src.path().join("mirror/primary/bundle.json.jws")).expect("test i/o");
    let job = signed_job(src.path(), dest.path(), p256_public(&key));
    let err = run_job(&job, &DirSource::new(src.path()), &at(0))
        .await
        .expect_err("must fail");
    assert!(err.to_string().contains("has no signature"), "{err}");
}

#[tokio::test]
async fn digest_mismatch_blocks_publish() {
    let (src, dest) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    export(src.path(), "{}", "unused");
    write_tree(src.path(), &[(BUNDLE, b"{ }")]);
    let job = dir_job(src.path(), dest.path());
    let err = run_job(&job, &DirSource::new(src.path()), &at(0))
        .await
        .expect_err("must fail");
    assert!(err.to_string().contains("lists sha256"), "{err}");
    assert!(!dest.path().join("latest").exists());
}

#[tokio::test]
async fn missing_listed_file_blocks_publish() {
    let (src, dest) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    export(src.path(), "{}", "unused");
    std::fs::remove_file(src.path().join(BUNDLE)).expect("test i/o");
    let job = dir_job(src.path(), dest.path());
    let err = run_job(&job, &DirSource::new(src.path()), &at(0))
        .await
        .expect_err("must fail");
    assert!(err.to_string().contains("not in the export"), "{err}");
}

#[tokio::test]
async fn jws_es256_detached_unencoded_accepted() {
    let (src, dest) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let key = p256_key();
    export(src.path(), "{}", &jws_es256(&key, b"{}", false));
    let job = signed_job(src.path(), dest.path(), p256_public(&key));
    let report = run_job(&job, &DirSource::new(src.path()), &at(0))
        .await
        .expect("run");
    assert_eq!(report.verified.signatures, 1);
}

#[tokio::test]
async fn jws_es256_detached_encoded_accepted() {
    let (src, dest) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let key = p256_key();
    export(src.path(), "{}", &jws_es256(&key, b"{}", true));
    let job = signed_job(src.path(), dest.path(), p256_public(&key));
    assert!(run_job(&job, &DirSource::new(src.path()), &at(0))
        .await
        .is_ok());
}

#[tokio::test]
async fn jws_es256_over_other_file_rejected() {
    let (src, dest) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let key = p256_key();
    export(src.path(), "{}", &jws_es256(&key, b"[]", false));
    let job = signed_job(src.path(), dest.path(), p256_public(&key));
    let err = run_job(&job, &DirSource::new(src.path()), &at(0))
        .await
        .expect_err("must fail");
    assert!(err.to_string().contains("does not match"), "{err}");
}

#[tokio::test]
async fn jws_eddsa_accepted() {
    let (src, dest) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let key = ed_key();
    export(src.path(), "{}", &jws_eddsa(&key, b"{}"));
    let job = signed_job(src.path(), dest.path(), ed_public(&key));
    let report = run_job(&job, &DirSource::new(src.path()), &at(0))
        .await
        .expect("run");
    assert_eq!(report.verified.signatures, 1);
}

#[tokio::test]
async fn jws_eddsa_other_key_rejected() {
    let (src, dest) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    export(src.path(), "{}", &jws_eddsa(&ed_key(), b"{}"));
    let other = ed25519_dalek::SigningKey::from_bytes(&[3u8; 32]);
    let job = signed_job(src.path(), dest.path(), ed_public(&other));
    let err = run_job(&job, &DirSource::new(src.path()), &at(0))
        .await
        .expect_err("must fail");
    assert!(matches!(err, SyncError::Verify { .. }), "{err}");
}

#[tokio::test]
async fn cosign_with_ed25519_key_rejected() {
    let (src, dest) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    export(src.path(), "{}", &cosign(&p256_key(), b"{}"));
    let job = signed_job(src.path(), dest.path(), ed_public(&ed_key()));
    let err = run_job(&job, &DirSource::new(src.path()), &at(0))
        .await
        .expect_err("must fail");
    assert!(err.to_string().contains("needs a P-256"), "{err}");
}

#[test]
fn from_pem_rejects_garbage() {
    assert!(
        PublicKey::from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
            .is_err()
    );
}

/// The sample mirror's bundles, signed by openssl with the sample key, verify.
#[tokio::test]
async fn sample_mirror_verifies() {
    let sample = workspace_root().join("conf/sample-mirror");
    let src = sample.join("data/concelier/latest");
    assert!(
        src.is_dir(),
        "{} is missing; run conf/sample-mirror/generate.sh (scripts/test.sh does)",
        src.display()
    );
    let dest = tempfile::tempdir().expect("tempdir");
    let key = PublicKey::from_pem_file(&sample.join("signing-key.pub")).expect("sample key");
    let job = signed_job(&src, dest.path(), Arc::new(key));
    // A run after the export was made (2026-12-03), so its time is not in the run's future.
    let after = mirror_sync::RunOptions::new(time(1_796_169_600 + 86_400));
    let report = run_job(&job, &DirSource::new(&src), &after)
        .await
        .expect("run");
    assert_eq!(report.verified.signatures, 2);
    // Every document of the sample's latest export has generatedAt 2026-12-02T00:00:00Z.
    let time = report.export_time.expect("an export time");
    assert_eq!(time.unix, 1_796_169_600);
    assert_eq!(time.basis, mirror_sync::TimeBasis::GeneratedAt);
}
