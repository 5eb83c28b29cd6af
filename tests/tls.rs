//! End-to-end: TLS listeners with a certificate per domain, chosen by SNI.
//!
//! Certificates come from the `openssl` command: a root, an intermediate, and per domain a
//! certificate that the intermediate issued. Handshakes are checked with `openssl s_client`,
//! requests with reqwest over rustls, which trusts only the test root.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{Reply, TestGateway, TestOrigin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `openssl req` arguments for a new P-256 key without a passphrase.
const EC: &str = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";

/// A test certificate authority in a directory: `root.pem`, `int.pem` and their keys.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// Makes the root and the intermediate, and certificates for `a.test` and `*.b.test`.
    fn new(dir: &Path) -> Self {
        let pki = Self {
            dir: dir.to_path_buf(),
        };
        pki.openssl(&format!(
            "req -x509 {EC} -subj /CN=Test-Root -keyout root.key -out root.pem -days 2 \
             -addext basicConstraints=critical,CA:TRUE \
             -addext keyUsage=critical,keyCertSign,cRLSign"
        ));
        pki.openssl(&format!(
            "req -new {EC} -subj /CN=Test-Intermediate -keyout int.key -out int.csr \
             -addext basicConstraints=critical,CA:TRUE,pathlen:0 \
             -addext keyUsage=critical,keyCertSign,cRLSign,digitalSignature"
        ));
        pki.openssl(
            "x509 -req -in int.csr -CA root.pem -CAkey root.key -set_serial 100 -days 2 \
             -copy_extensions copyall -out int.pem",
        );
        pki.issue("a", "a.test", "DNS:a.test", 7);
        pki.issue("b", "*.b.test", "DNS:*.b.test", 9);
        pki
    }

    /// Writes `<stem>.pem` (the certificate, then the intermediate) and `<stem>.key`.
    fn issue(&self, stem: &str, cn: &str, san: &str, serial: u32) {
        self.openssl(&format!(
            "req -new {EC} -subj /CN={cn} -keyout {stem}.key -out {stem}.csr \
             -addext subjectAltName={san} -addext basicConstraints=critical,CA:FALSE \
             -addext extendedKeyUsage=serverAuth"
        ));
        self.openssl(&format!(
            "x509 -req -in {stem}.csr -CA int.pem -CAkey int.key -set_serial {serial} -days 2 \
             -copy_extensions copyall -out {stem}.leaf"
        ));
        let leaf = format!("{stem}.leaf");
        let mut chain = std::fs::read(self.dir.join(&leaf)).expect("read leaf");
        chain.extend(std::fs::read(self.dir.join("int.pem")).expect("read intermediate"));
        std::fs::write(self.dir.join(format!("{stem}.pem")), chain).expect("write chain");
    }

    /// Writes `<stem>.ocsp`, a DER OCSP response saying "good" for `<stem>.leaf`.
    fn ocsp(&self, stem: &str, serial: u32) {
        let index = format!("V\t301231235959Z\t\t{serial:02X}\tunknown\t/CN=x\n");
        std::fs::write(self.dir.join("index.txt"), index).expect("write index");
        self.openssl(&format!(
            "ocsp -issuer int.pem -cert {stem}.leaf -reqout req.der -no_nonce"
        ));
        self.openssl(&format!(
            "ocsp -index index.txt -rsigner int.pem -rkey int.key -CA int.pem -reqin req.der \
             -respout {stem}.ocsp -ndays 1"
        ));
    }

    /// Runs `openssl` with the whitespace-separated arguments of `line` in the directory.
    fn openssl(&self, line: &str) {
        let args: Vec<&str> = line.split_whitespace().collect();
        let out = run("openssl", &args, &self.dir);
        assert!(out.status.success(), "openssl {args:?}: {}", text(&out));
    }

    fn root(&self) -> reqwest::Certificate {
        let pem = std::fs::read(self.dir.join("root.pem")).expect("read root");
        reqwest::Certificate::from_pem(&pem).expect("root certificate")
    }
}

/// Runs a command for at most 10 seconds.
fn run(program: &str, args: &[&str], dir: &Path) -> Output {
    Command::new("timeout")
        .arg("10")
        .arg(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run command")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Handshakes with `openssl s_client` and returns the certificate's subject and serial, as
/// `subject=CN = a.test serial=07`, or the tool's output when the handshake failed.
fn handshake(addr: SocketAddr, args: &[&str]) -> Result<String, String> {
    let connect = addr.to_string();
    let mut all = vec!["s_client", "-connect", &connect];
    all.extend_from_slice(args);
    let out = run("openssl", &all, Path::new("."));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() || !stdout.contains("BEGIN CERTIFICATE") {
        return Err(text(&out));
    }
    let mut x509 = Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-serial"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run openssl x509");
    x509.stdin
        .take()
        .expect("stdin")
        .write_all(stdout.as_bytes())
        .expect("write certificate");
    let parsed = x509.wait_with_output().expect("openssl x509");
    Ok(String::from_utf8_lossy(&parsed.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" "))
}

/// A config with a plain and a TLS listener and two domains: `a` (`a.test`) and `b`
/// (`*.b.test`), both in front of `origin`. `server` and `domain_a` add keys to those tables.
fn config(origin: SocketAddr, server: &str, domain_a: &str) -> String {
    format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
tls_listen = ["127.0.0.1:0"]
threads = 2
grace_period_secs = 0
shutdown_timeout_secs = 1
{server}

[log]
access_log = "off"
level = "warn"

[cache]
memory_bytes = "16MiB"
max_object_bytes = "1MiB"

[domains.a]
hosts = ["a.test"]
tls_cert = "a.pem"
tls_key = "a.key"
{domain_a}
[domains.a.origins.web]
kind = "http"
addresses = ["{origin}"]
[[domains.a.routes]]
prefix = "/"
origin = "web"

[domains.b]
hosts = ["*.b.test"]
tls_cert = "b.pem"
tls_key = "b.key"
[domains.b.origins.web]
kind = "http"
addresses = ["{origin}"]
[[domains.b.routes]]
prefix = "/"
origin = "web"
"#
    )
}

/// An origin that is never reached, for tests that only handshake.
fn unused_origin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9))
}

fn start(dir: &Path, config: &str) -> (TestGateway, SocketAddr) {
    let gateway = TestGateway::start(dir, config);
    let tls = gateway.running.tls_addrs()[0];
    (gateway, tls)
}

/// A client that trusts the test root, sends `a.test` and `x.b.test` to `tls`, and does not
/// follow redirects.
fn https_client(pki: &Pki, tls: SocketAddr) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .use_rustls_tls()
        .no_proxy()
        .add_root_certificate(pki.root())
        .resolve("a.test", tls)
        .resolve("x.b.test", tls)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
}

#[test]
fn sni_selects_exact_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _pki = Pki::new(dir.path());
    let (_gateway, tls) = start(dir.path(), &config(unused_origin(), "", ""));
    let got = handshake(tls, &["-servername", "a.test"]);
    assert_eq!(got, Ok("subject=CN = a.test serial=07".to_string()));
}

#[test]
fn sni_selects_wildcard_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _pki = Pki::new(dir.path());
    let (_gateway, tls) = start(dir.path(), &config(unused_origin(), "", ""));
    let got = handshake(tls, &["-servername", "x.b.test"]);
    assert_eq!(got, Ok("subject=CN = *.b.test serial=09".to_string()));
}

#[test]
fn no_sni_refused_without_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _pki = Pki::new(dir.path());
    let (_gateway, tls) = start(dir.path(), &config(unused_origin(), "", ""));
    let output = handshake(tls, &["-noservername"]).expect_err("the handshake must fail");
    assert!(output.contains("alert handshake failure"), "{output}");
}

#[test]
fn unknown_sni_refused_without_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _pki = Pki::new(dir.path());
    let (_gateway, tls) = start(dir.path(), &config(unused_origin(), "", ""));
    let output =
        handshake(tls, &["-servername", "other.test"]).expect_err("the handshake must fail");
    assert!(output.contains("alert handshake failure"), "{output}");
}

#[test]
fn default_domain_answers_without_sni() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _pki = Pki::new(dir.path());
    let server = r#"tls_default_domain = "a""#;
    let (_gateway, tls) = start(dir.path(), &config(unused_origin(), server, ""));
    let expected = Ok("subject=CN = a.test serial=07".to_string());
    assert_eq!(handshake(tls, &["-noservername"]), expected);
    assert_eq!(handshake(tls, &["-servername", "other.test"]), expected);
}

/// Checks `mirror_gateway_tls_handshakes_total` on the admin listener after one handshake
/// that gets a certificate and one rejected for its unknown server name.
#[tokio::test(flavor = "multi_thread")]
async fn handshakes_counted_by_result() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _pki = Pki::new(dir.path());
    let admin = admin_section(dir.path());
    let (gateway, tls) = start(dir.path(), &(config(unused_origin(), "", "") + &admin));
    let admin = gateway.running.admin_addr().expect("admin listener");
    assert!(handshake(tls, &["-servername", "a.test"]).is_ok());
    assert!(handshake(tls, &["-servername", "other.test"]).is_err());

    let ok = "mirror_gateway_tls_handshakes_total{domain=\"a\",result=\"ok\"} 1\n";
    let error = "mirror_gateway_tls_handshakes_total{domain=\"-\",result=\"error\"} 1\n";
    // The server may finish a handshake just after the client does, so poll for up to 5 s.
    let mut text = String::new();
    for _ in 0..50 {
        text = scrape_metrics(admin).await;
        if text.contains(ok) && text.contains(error) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(text.contains(ok), "{text}");
    assert!(text.contains(error), "{text}");
    let series = text
        .lines()
        .filter(|l| l.starts_with("mirror_gateway_tls_handshakes_total{"));
    assert_eq!(series.count(), 2, "{text}");
}

/// Makes each kind of failed handshake in turn against one gateway and checks that it raises
/// exactly one `mirror_gateway_tls_handshake_failures_total` series by one, with the domain
/// and reason expected, and `mirror_gateway_tls_handshakes_total{result="error"}` with it.
#[tokio::test(flavor = "multi_thread")]
async fn handshake_failures_counted_by_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    // A root that did not issue the gateway's certificates, for a client that rejects them.
    pki.openssl(&format!(
        "req -x509 {EC} -subj /CN=Other-Root -keyout other.key -out other.pem -days 2"
    ));
    let admin = admin_section(dir.path());
    let (gateway, tls) = start(dir.path(), &(config(unused_origin(), "", "") + &admin));
    let admin = gateway.running.admin_addr().expect("admin listener");
    let mut expected = BTreeMap::new();

    assert!(handshake(tls, &["-servername", "a.test"]).is_ok());
    expected.insert(handshakes("a", "ok"), 1);
    assert_tls_series(admin, &expected).await;

    let legacy = [
        "-servername",
        "a.test",
        "-tls1_1",
        "-cipher",
        "DEFAULT:@SECLEVEL=0",
    ];
    assert!(handshake(tls, &legacy).is_err());
    count_failure(&mut expected, "-", "protocol_version");
    assert_tls_series(admin, &expected).await;

    // TLS 1.2 requests the certificate before it picks the cipher, so the domain is known.
    let cipher = ["-servername", "a.test", "-tls1_2", "-cipher", "AES128-SHA"];
    assert!(handshake(tls, &cipher).is_err());
    count_failure(&mut expected, "a", "no_shared_cipher");
    assert_tls_series(admin, &expected).await;

    assert!(handshake(tls, &["-servername", "other.test"]).is_err());
    count_failure(&mut expected, "-", "unknown_sni");
    assert_tls_series(admin, &expected).await;

    assert!(handshake(tls, &["-noservername"]).is_err());
    count_failure(&mut expected, "-", "unknown_sni");
    assert_tls_series(admin, &expected).await;

    let other_root = dir.path().join("other.pem");
    let other_root = other_root.to_str().expect("utf-8 path");
    let rejecting = [
        "-servername",
        "x.b.test",
        "-verify_return_error",
        "-CAfile",
        other_root,
    ];
    assert!(handshake(tls, &rejecting).is_err());
    count_failure(&mut expected, "b", "client_alert");
    assert_tls_series(admin, &expected).await;

    send_raw(tls, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
    count_failure(&mut expected, "-", "plain_http");
    assert_tls_series(admin, &expected).await;

    send_raw(tls, b"SSH-2.0-OpenSSH_9.6\r\n").await;
    count_failure(&mut expected, "-", "malformed");
    assert_tls_series(admin, &expected).await;

    // A handshake record header that announces 512 bytes, then 4, then the end of the stream.
    send_raw(tls, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc]).await;
    count_failure(&mut expected, "-", "aborted");
    assert_tls_series(admin, &expected).await;
}

/// Returns the name and labels of a `mirror_gateway_tls_handshakes_total` series.
fn handshakes(domain: &str, result: &str) -> String {
    format!("mirror_gateway_tls_handshakes_total{{domain=\"{domain}\",result=\"{result}\"}}")
}

/// Adds one failed handshake to the expected series values.
fn count_failure(expected: &mut BTreeMap<String, u64>, domain: &str, reason: &str) {
    *expected.entry(handshakes(domain, "error")).or_default() += 1;
    let failures = format!(
        "mirror_gateway_tls_handshake_failures_total{{domain=\"{domain}\",reason=\"{reason}\"}}"
    );
    *expected.entry(failures).or_default() += 1;
}

/// Polls `/metrics` for up to 5 s until its TLS handshake series are `expected`, then asserts
/// they are.
async fn assert_tls_series(admin: SocketAddr, expected: &BTreeMap<String, u64>) {
    let mut got = BTreeMap::new();
    for _ in 0..50 {
        got = scrape_metrics(admin)
            .await
            .lines()
            .filter(|l| l.starts_with("mirror_gateway_tls_handshake"))
            .filter_map(|l| l.rsplit_once(' '))
            .map(|(series, value)| (series.to_string(), value.parse().expect("counter value")))
            .collect();
        if got == *expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(got, *expected);
}

/// Sends `bytes` to `addr`, closes the sending side and reads until the gateway closes too.
async fn send_raw(addr: SocketAddr, bytes: &[u8]) {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(bytes).await?;
        stream.shutdown().await?;
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.map(|_| ())
    };
    let done = tokio::time::timeout(Duration::from_secs(10), exchange).await;
    // A reset on close is as good as an orderly close here.
    assert!(
        done.is_ok(),
        "the gateway kept the connection open for 10 s"
    );
}

/// Sends `chunks` to `addr` with `gap` after each, without closing the sending side, and
/// returns what the gateway sends until it closes. Panics after 10 s.
async fn exchange_slowly(addr: SocketAddr, chunks: &[&[u8]], gap: Duration) -> Vec<u8> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        for chunk in chunks {
            stream.write_all(chunk).await?;
            tokio::time::sleep(gap).await;
        }
        let mut received = Vec::new();
        stream.read_to_end(&mut received).await?;
        Ok::<_, std::io::Error>(received)
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("the gateway kept the connection open for 10 s")
        .expect("exchange with the TLS listener failed")
}

/// Checks that `raw` is the whole 400 response to plain HTTP on a TLS listener.
fn assert_plain_http_400(raw: &[u8]) {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .expect("missing end of the response header");
    let mut lines = head.split("\r\n");
    assert_eq!(lines.next(), Some("HTTP/1.1 400 Bad Request"), "{text}");
    let headers: BTreeMap<String, &str> = lines
        .filter_map(|line| line.split_once(": "))
        .map(|(name, value)| (name.to_ascii_lowercase(), value))
        .collect();
    let content_type = headers.get("content-type").copied().unwrap_or_default();
    assert!(content_type.starts_with("text/plain"), "{text}");
    assert_eq!(headers.get("connection"), Some(&"close"), "{text}");
    assert_eq!(headers.get("x-cache-status"), Some(&"BYPASS"), "{text}");
    let length = headers.get("content-length").expect("Content-Length");
    assert_eq!(length.parse::<usize>().ok(), Some(body.len()), "{text}");
    assert!(body.contains("plain HTTP"), "{body}");
    assert!(body.contains("https://"), "{body}");
}

/// Plain HTTP to the TLS port gets a 400 and the end of the connection, HTTPS on the same port
/// still works, and the failure counts as `plain_http`.
#[tokio::test(flavor = "multi_thread")]
async fn plain_http_to_tls_port_is_400() {
    let origin = TestOrigin::start(|_| Reply::ok("from origin")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let admin = admin_section(dir.path());
    let (gateway, tls) = start(dir.path(), &(config(origin.addr, "", "") + &admin));
    let admin = gateway.running.admin_addr().expect("admin listener");

    let request = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n";
    let raw = exchange_slowly(tls, &[request], Duration::ZERO).await;
    assert_plain_http_400(&raw);
    assert_eq!(origin.count(), 0);

    assert_file_from_origin(&pki, tls).await;

    let mut expected = BTreeMap::new();
    count_failure(&mut expected, "-", "plain_http");
    expected.insert(handshakes("a", "ok"), 1);
    assert_tls_series(admin, &expected).await;
}

/// A client that sends its request line one byte per 50 ms still gets the 400: the gateway
/// waits for the space after the method.
#[tokio::test(flavor = "multi_thread")]
async fn plain_http_sent_slowly_is_400() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _pki = Pki::new(dir.path());
    let (_gateway, tls) = start(dir.path(), &config(unused_origin(), "", ""));
    let request = b"POST /upload HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\n\r\n";
    let (line, rest) = request.split_at(b"POST /upload HTTP/1.1\r\n".len());
    let mut chunks: Vec<&[u8]> = line.chunks(1).collect();
    chunks.push(rest);
    let raw = exchange_slowly(tls, &chunks, Duration::from_millis(50)).await;
    assert_plain_http_400(&raw);
}

/// A TLS client whose first bytes reach the gateway one per segment still completes its
/// handshake: the bytes read to tell TLS from HTTP go back to OpenSSL in order.
#[tokio::test(flavor = "multi_thread")]
async fn client_hello_in_pieces_handshakes() {
    let origin = TestOrigin::start(|_| Reply::ok("from origin")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let (_gateway, tls) = start(dir.path(), &config(origin.addr, "", ""));
    let relay = split_relay(tls, 32).await;
    assert_file_from_origin(&pki, relay).await;
}

/// Fetches `https://a.test/file` over HTTP/1.1 through `addr` and checks that the origin's
/// body came back.
async fn assert_file_from_origin(pki: &Pki, addr: SocketAddr) {
    let client = https_client(pki, addr)
        .http1_only()
        .build()
        .expect("client");
    let url = format!("https://a.test:{}/file", addr.port());
    let response = client.get(&url).send().await.expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.expect("body"), "from origin");
}

/// Starts a relay on loopback that forwards one connection to `target`, the first `split`
/// bytes from the client one per write with 10 ms between them, and everything else as it
/// comes. Returns the relay's address.
async fn split_relay(target: SocketAddr, split: usize) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind relay");
    let addr = listener.local_addr().expect("relay address");
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.expect("accept at relay");
        let server = tokio::net::TcpStream::connect(target)
            .await
            .expect("connect to the TLS listener");
        server.set_nodelay(true).expect("nodelay");
        let (mut client_read, mut client_write) = client.into_split();
        let (mut server_read, mut server_write) = server.into_split();
        let upstream = async move {
            let mut byte = [0u8; 1];
            for _ in 0..split {
                if client_read.read_exact(&mut byte).await.is_err() {
                    return;
                }
                if server_write.write_all(&byte).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
        };
        let downstream = tokio::io::copy(&mut server_read, &mut client_write);
        let _ = tokio::join!(upstream, downstream);
    });
    addr
}

/// Writes an htpasswd file for user `admin` and returns an `[admin]` section that uses it.
fn admin_section(dir: &Path) -> String {
    let line = common::htpasswd_line(&["-B", "-C", "5"], "admin", "admin-pass");
    let htpasswd = dir.join("admin.htpasswd");
    std::fs::write(&htpasswd, line + "\n").expect("write htpasswd");
    format!(
        "\n[admin]\nlisten = \"127.0.0.1:0\"\nhtpasswd = \"{}\"\n",
        htpasswd.display()
    )
}

/// Returns the body of `/metrics` on the admin listener, with the test's admin credentials.
async fn scrape_metrics(admin: SocketAddr) -> String {
    let credentials = common::basic("admin", "admin-pass");
    let resp = common::raw_get(admin, "/metrics", &[("authorization", &credentials)]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    resp.text()
}

#[test]
fn tls_1_1_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _pki = Pki::new(dir.path());
    let (_gateway, tls) = start(dir.path(), &config(unused_origin(), "", ""));
    // Security level 0 lets the client offer TLS 1.1, so the refusal is the server's.
    let legacy = ["-servername", "a.test", "-cipher", "DEFAULT:@SECLEVEL=0"];
    let tls_1_2 = handshake(tls, &[&legacy[..], &["-tls1_2"]].concat());
    assert!(tls_1_2.is_ok(), "{tls_1_2:?}");
    let tls_1_1 = handshake(tls, &[&legacy[..], &["-tls1_1"]].concat());
    let output = tls_1_1.expect_err("TLS 1.1 must fail");
    assert!(output.contains("protocol version"), "{output}");
}

#[test]
fn ocsp_response_stapled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    pki.ocsp("a", 7);
    let domain_a = r#"tls_ocsp = "a.ocsp""#;
    let (_gateway, tls) = start(dir.path(), &config(unused_origin(), "", domain_a));
    let connect = tls.to_string();
    let args = [
        "s_client",
        "-connect",
        &connect,
        "-servername",
        "a.test",
        "-status",
    ];
    let out = text(&run("openssl", &args, dir.path()));
    assert!(out.contains("OCSP Response Status: successful"), "{out}");
}

#[test]
fn renewed_certificate_served_after_reload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let (gateway, tls) = start(dir.path(), &config(unused_origin(), "", ""));
    pki.issue("a", "a.test", "DNS:a.test", 8);
    let before = handshake(tls, &["-servername", "a.test"]);
    assert_eq!(before, Ok("subject=CN = a.test serial=07".to_string()));

    let outcome = gateway.running.reload(Vec::new());
    assert_eq!(outcome, mirror_proxy::reload::ReloadOutcome::Applied);
    let after = handshake(tls, &["-servername", "a.test"]);
    assert_eq!(after, Ok("subject=CN = a.test serial=08".to_string()));
}

#[tokio::test(flavor = "multi_thread")]
async fn sni_and_host_of_same_domain_proxied() {
    let origin = TestOrigin::start(|_| Reply::ok("from origin")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let (_gateway, tls) = start(dir.path(), &config(origin.addr, "", ""));
    let client = https_client(&pki, tls)
        .http1_only()
        .build()
        .expect("client");
    let url = format!("https://a.test:{}/file", tls.port());
    let response = client.get(&url).send().await.expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.expect("body"), "from origin");
}

#[tokio::test(flavor = "multi_thread")]
async fn host_of_other_domain_is_421() {
    let origin = TestOrigin::start(|_| Reply::ok("from origin")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let (_gateway, tls) = start(dir.path(), &config(origin.addr, "", ""));
    let client = https_client(&pki, tls)
        .http1_only()
        .build()
        .expect("client");
    let url = format!("https://a.test:{}/file", tls.port());
    let response = client
        .get(&url)
        .header("host", "x.b.test")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 421);
    assert_eq!(response.headers()["x-cache-status"], "BYPASS");
    assert_eq!(origin.count(), 0);
}

/// A gateway with TLS in front of an origin that replies "over h2", with an HTTPS client that
/// may use HTTP/2 and the URL of `/file` on domain `b`.
struct H2Setup {
    origin: TestOrigin,
    _dir: tempfile::TempDir,
    _gateway: TestGateway,
    client: reqwest::Client,
    url: String,
}

async fn h2_setup() -> H2Setup {
    let origin = TestOrigin::start(|_| Reply::ok("over h2")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let (gateway, tls) = start(dir.path(), &config(origin.addr, "", ""));
    let client = https_client(&pki, tls).build().expect("client");
    let url = format!("https://x.b.test:{}/file", tls.port());
    H2Setup {
        origin,
        _dir: dir,
        _gateway: gateway,
        client,
        url,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_over_tls() {
    let setup = h2_setup().await;
    let response = setup.client.get(&setup.url).send().await.expect("request");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.expect("body"), "over h2");
}

/// Returns a request body of unknown length: over HTTP/2 it goes as DATA frames without
/// `Content-Length`.
fn streamed_body(chunks: Vec<&'static str>) -> reqwest::Body {
    let chunks = chunks.into_iter().map(Ok::<_, std::io::Error>);
    reqwest::Body::wrap_stream(futures::stream::iter(chunks))
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_get_with_data_is_400() {
    let setup = h2_setup().await;
    let (client, url) = (&setup.client, &setup.url);
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n";
    let response = client
        .get(url)
        .body(streamed_body(vec![smuggled]))
        .send()
        .await
        .expect("request");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 400);
    assert_eq!(setup.origin.count(), 0);

    // A stream ended by an empty data frame carries no body: served as usual.
    let response = client
        .get(url)
        .body(streamed_body(Vec::new()))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.expect("body"), "over h2");
}

#[tokio::test(flavor = "multi_thread")]
async fn redirect_to_https_is_308() {
    let origin = TestOrigin::start(|_| Reply::ok("from origin")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let config = config(origin.addr, "", "redirect_to_https = true");
    let (gateway, tls) = start(dir.path(), &config);
    let client = https_client(&pki, tls).build().expect("client");
    let url = format!("http://{}/dir/file.json?x=1&y=2", gateway.addr);
    let response = client
        .get(&url)
        .header("host", "a.test:8080")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 308);
    let location = format!("https://a.test:{}/dir/file.json?x=1&y=2", tls.port());
    assert_eq!(response.headers()["location"], location.as_str());
    assert_eq!(response.headers()["x-cache-status"], "BYPASS");
    assert_eq!(origin.count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn redirect_off_serves_plain_http() {
    let origin = TestOrigin::start(|_| Reply::ok("from origin")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let _pki = Pki::new(dir.path());
    let (gateway, _tls) = start(dir.path(), &config(origin.addr, "", ""));
    let url = format!("http://{}/file", gateway.addr);
    let response = common::client()
        .get(&url)
        .header("host", "x.b.test")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
}

#[test]
fn config_errors_listed_together() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _pki = Pki::new(dir.path());
    let text = config(unused_origin(), r#"tls_default_domain = "c""#, "")
        .replace("tls_key = \"a.key\"", "tls_key = \"b.key\"")
        .replace(
            "tls_key = \"b.key\"\n[domains.b.origins",
            "[domains.b.origins",
        );
    let path = dir.path().join("gateway.toml");
    let errors = mirror_proxy::config::load_str(&text, &path, Vec::new())
        .err()
        .expect("config is invalid");
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    assert!(keys.contains(&"domains.a.tls_key"), "{errors:#?}");
    assert!(keys.contains(&"domains.b.tls_key"), "{errors:#?}");
    assert!(keys.contains(&"server.tls_default_domain"), "{errors:#?}");
}

#[test]
fn config_warns_uncovered_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _pki = Pki::new(dir.path());
    let text = config(unused_origin(), "", "").replace(
        r#"hosts = ["a.test"]"#,
        r#"hosts = ["a.test", "127.0.0.1"]"#,
    );
    let path = dir.path().join("gateway.toml");
    let config = mirror_proxy::config::load_str(&text, &path, Vec::new()).expect("valid");
    let warning = config
        .warnings
        .iter()
        .find(|w| w.key == "domains.a.tls_cert");
    let reason = warning.map(|w| w.reason.as_str()).unwrap_or_default();
    assert!(reason.contains("127.0.0.1"), "{:#?}", config.warnings);
}

/// An IP address among the hosts of a domain with a certificate gets a warning, because clients
/// that connect by address send no server name, unless the domain is `tls_default_domain`.
#[test]
fn config_warns_ip_host_without_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _pki = Pki::new(dir.path());
    let ip_hosts = |server: &str| {
        let text = config(unused_origin(), server, "").replace(
            r#"hosts = ["a.test"]"#,
            r#"hosts = ["a.test", "127.0.0.1", "[::1]"]"#,
        );
        let path = dir.path().join("gateway.toml");
        let config = mirror_proxy::config::load_str(&text, &path, Vec::new()).expect("valid");
        config
            .warnings
            .into_iter()
            .filter(|w| w.key == "domains.a.hosts")
            .map(|w| (w.value.unwrap_or_default(), w.reason))
            .collect::<Vec<_>>()
    };

    let warned = ip_hosts("");
    let values: Vec<&str> = warned.iter().map(|(value, _)| value.as_str()).collect();
    assert_eq!(values, ["\"127.0.0.1\"", "\"[::1]\""], "{warned:#?}");
    assert!(
        warned[0].1.contains("tls_default_domain = \"a\""),
        "{warned:#?}"
    );
    assert!(ip_hosts(r#"tls_default_domain = "a""#).is_empty());
}

#[test]
fn renewed_certificate_picked_up_by_watch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let (_gateway, tls) = start(dir.path(), &config(unused_origin(), "", ""));
    // The renewed files have a new modification time, which the watch (every 2 seconds) notices.
    pki.issue("a", "a.test", "DNS:a.test", 8);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut seen = handshake(tls, &["-servername", "a.test"]);
    while seen != Ok("subject=CN = a.test serial=08".to_string())
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(200));
        seen = handshake(tls, &["-servername", "a.test"]);
    }
    assert_eq!(seen, Ok("subject=CN = a.test serial=08".to_string()));
}

/// Requests that an HTTP/1.1 client sends ahead over TLS are served in order on one connection.
#[tokio::test(flavor = "multi_thread")]
async fn pipelined_requests_over_tls() {
    let origin =
        TestOrigin::start(|request| Reply::ok(&format!("body of {}", request.target))).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let _pki = Pki::new(dir.path());
    let (_gateway, tls) = start(dir.path(), &config(origin.addr, "", ""));

    let batch = "GET /one HTTP/1.1\r\nHost: a.test\r\n\r\n\
                 GET /two HTTP/1.1\r\nHost: a.test\r\n\r\n\
                 GET /one HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n";
    let connect = tls.to_string();
    let out = tokio::task::spawn_blocking(move || {
        // The client offers no ALPN, so the connection speaks HTTP/1.1. `-quiet` keeps it open
        // after the input ends, until the gateway closes it after the last response.
        let mut client = Command::new("timeout")
            .args(["10", "openssl", "s_client", "-quiet", "-connect", &connect])
            .args(["-servername", "a.test"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run openssl s_client");
        client
            .stdin
            .take()
            .expect("stdin")
            .write_all(batch.as_bytes())
            .expect("send requests");
        client.wait_with_output().expect("openssl s_client")
    })
    .await
    .expect("client task");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let statuses = stdout.matches("HTTP/1.1 200 OK").count();
    assert_eq!(statuses, 3, "{}", text(&out));
    let bodies: Vec<&str> = stdout.matches("body of /").collect();
    assert_eq!(bodies.len(), 3, "{stdout}");
    let one = stdout.find("body of /one").expect("first body");
    let two = stdout.find("body of /two").expect("second body");
    assert!(one < two, "responses out of order: {stdout}");
    assert_eq!(origin.count(), 2);
}

/// Connects to `tls` with `openssl s_client` offering only `h2`, sends `bytes` after the
/// handshake and keeps its input open, so that only the gateway can end the session. Returns
/// how long the session lasted and the client's output; `timeout` stops it after 10 s.
async fn h2_session(tls: SocketAddr, bytes: &'static [u8]) -> (Duration, Output) {
    let connect = tls.to_string();
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let mut client = Command::new("timeout")
            .args(["10", "openssl", "s_client", "-quiet", "-alpn", "h2"])
            .args(["-connect", &connect, "-servername", "a.test"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run openssl s_client");
        let mut input = client.stdin.take().expect("stdin");
        input.write_all(bytes).expect("send");
        input.flush().expect("flush");
        let out = client.wait_with_output().expect("openssl s_client");
        drop(input);
        (started.elapsed(), out)
    })
    .await
    .expect("client task")
}

/// Checks that the gateway, not `timeout` (exit status 124 after 10 s), ended an
/// [`h2_session`], and no sooner than a limit of 1 s.
fn assert_closed_after_limit(waited: Duration, out: &Output) {
    assert_ne!(
        out.status.code(),
        Some(124),
        "still open after 10 s: {}",
        text(out)
    );
    assert!(
        waited >= Duration::from_millis(900),
        "closed after {waited:?}"
    );
}

/// An HTTP/2 connection with no stream open is closed after `server.keepalive_timeout_secs`.
#[tokio::test(flavor = "multi_thread")]
async fn idle_h2_connection_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _pki = Pki::new(dir.path());
    let server = "keepalive_timeout_secs = 1";
    let (_gateway, tls) = start(dir.path(), &config(unused_origin(), server, ""));

    // The connection preface and an empty SETTINGS frame, then nothing.
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    let (waited, out) = h2_session(tls, preface).await;
    assert_closed_after_limit(waited, &out);
}

/// A connection counts as open for a graceful shutdown only once its TLS handshake is done: one
/// that connects and sends nothing must not keep a stopping gateway waiting.
#[tokio::test(flavor = "multi_thread")]
async fn connection_counted_after_handshake() {
    let origin = TestOrigin::start(|_| Reply::ok("from origin")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let (gateway, tls) = start(dir.path(), &config(origin.addr, "", ""));
    let connections = std::sync::Arc::clone(&gateway.running.monitor().connections);

    let _silent = tokio::net::TcpStream::connect(tls).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(connections.count(), 0, "a connection without a handshake");

    let client = https_client(&pki, tls).build().expect("client");
    let response = client
        .get(format!("https://a.test:{}/x", tls.port()))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    // The client keeps its connection for the next request.
    assert_eq!(connections.count(), 1);
    drop(client);
}

/// A client that negotiates HTTP/2 and sends no connection preface is closed after
/// `server.keepalive_timeout_secs`, and until then does not count as an open connection, so it
/// cannot hold a graceful shutdown.
#[tokio::test(flavor = "multi_thread")]
async fn h2_client_without_preface_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _pki = Pki::new(dir.path());
    let server = "keepalive_timeout_secs = 1";
    let (gateway, tls) = start(dir.path(), &config(unused_origin(), server, ""));
    let connections = std::sync::Arc::clone(&gateway.running.monitor().connections);

    // After the handshake the client sends nothing.
    let client = tokio::spawn(h2_session(tls, b""));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(connections.count(), 0, "a connection without a preface");
    let (waited, out) = client.await.expect("client task");
    assert_closed_after_limit(waited, &out);
}
