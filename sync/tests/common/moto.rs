//! Starts moto's S3 server on a free loopback port, for the S3 tests; stops it on drop.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use mirror_sync::config::S3Settings;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};

/// A running moto server.
pub struct Moto {
    child: Child,
    pub port: u16,
}

/// Credentials moto accepts (it checks none).
pub fn env() -> Vec<(String, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
    ]
}

impl Moto {
    /// Starts moto from the workspace's `.venv`; panics with the fix when it is missing.
    pub fn start() -> Self {
        let bin = moto_binary();
        let port = free_port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut moto = Self { child, port };
        moto.wait_ready();
        moto
    }

    /// Returns source settings for `bucket` and `prefix` through `port` (moto's or a proxy's).
    pub fn settings(port: u16, bucket: &str, prefix: &str) -> S3Settings {
        S3Settings {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            region: Some("us-east-1".into()),
            endpoint: Some(format!("http://127.0.0.1:{port}")),
            path_style: true,
            allow_http: true,
        }
    }

    /// Creates `bucket` with a plain path-style request.
    pub fn create_bucket(&self, bucket: &str) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to moto");
        let request = format!(
            "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n",
            self.port
        );
        stream.write_all(request.as_bytes()).expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read");
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "create bucket: {response}"
        );
    }

    /// Returns a client writing straight to moto.
    pub fn client(&self, bucket: &str) -> Arc<AmazonS3> {
        let store = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region("us-east-1")
            .with_endpoint(format!("http://127.0.0.1:{}", self.port))
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .with_access_key_id("testing")
            .with_secret_access_key("testing")
            .build()
            .expect("client");
        Arc::new(store)
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("moto_server exited at start with {status}");
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "moto_server did not listen on port {} within 30 s",
            self.port
        );
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `objects` (key, content) into the bucket, 32 at a time.
pub async fn put_all(store: &Arc<AmazonS3>, objects: Vec<(String, Vec<u8>)>) {
    futures::stream::iter(objects)
        .map(|(key, data)| {
            let store = store.clone();
            async move {
                store
                    .put(&ObjectPath::from(key.as_str()), PutPayload::from(data))
                    .await
                    .unwrap_or_else(|e| panic!("put {key}: {e}"));
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
}

fn moto_binary() -> PathBuf {
    let bin = super::workspace_root().join(".venv/bin/moto_server");
    assert!(
        bin.is_file(),
        "{} is missing: the S3 tests need moto. Create it with scripts/test.sh, or run \
         `python3 -m venv .venv && .venv/bin/pip install -q 'moto[server]==5.2.*'` at the \
         workspace root",
        bin.display()
    );
    bin
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}
