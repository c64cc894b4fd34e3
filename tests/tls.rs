//! TLS on both listeners, with a CA and a broker certificate made at test
//! time (rcgen): clients that trust the CA are served; plain-TCP clients
//! and clients that trust another CA are not; the admin listener speaks
//! HTTPS; a bad certificate file stops `bida serve` at start.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests and benches fail loudly

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bida::client::{
    Client, ConnectOptions, Consumer, ConsumerOptions, OutgoingMessage, Producer, ProducerOptions,
};
use bida::tls::ClientTls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::broker::BrokerProcess;
use support::certs::make_certificates;

fn tls_broker(data: &Path, certs: &Path) -> BrokerProcess {
    let cert = certs.join("cert.pem");
    let key = certs.join("key.pem");
    BrokerProcess::start(
        data,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    )
}

fn options(ca_pem: &str, name: &str) -> ConnectOptions {
    ConnectOptions {
        token: None,
        tls: Some(ClientTls::new(ca_pem.as_bytes(), name).unwrap()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_trust_the_ca_are_served_and_no_one_else() {
    let dir = tempfile::tempdir().unwrap();
    let ca = make_certificates(dir.path(), "bida test CA");
    let broker = tls_broker(&dir.path().join("data"), dir.path());

    // By IP and by name: the certificate carries both.
    for name in ["127.0.0.1", "localhost"] {
        let client = Client::connect_with(broker.addr, options(&ca, name))
            .await
            .unwrap_or_else(|e| panic!("TLS as {name}: {e}"));
        let producer = Producer::new(client.clone(), "secure", ProducerOptions::default())
            .await
            .unwrap();
        let mut sends = Vec::new();
        for i in 0..500 {
            sends.push(producer.send(OutgoingMessage::new(format!("{name}-{i}").into_bytes())));
        }
        for s in sends {
            s.await.unwrap();
        }
    }
    let client = Client::connect_with(broker.addr, options(&ca, "localhost"))
        .await
        .unwrap();
    let consumer = Consumer::new(
        client,
        "secure",
        "g",
        ConsumerOptions {
            max_wait: Duration::from_millis(100),
            ..ConsumerOptions::default()
        },
    );
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while got.len() < 1000 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of 1000",
            got.len()
        );
        let batch = consumer.fetch().await.unwrap();
        got.extend(batch.into_iter().map(|d| d.payload));
    }
    assert_eq!(got.len(), 1000);
    assert_eq!(&got[0][..], b"127.0.0.1-0");

    // Plain TCP gets no service: the broker wanted a TLS handshake.
    let plain = tokio::time::timeout(Duration::from_secs(10), Client::connect(broker.addr))
        .await
        .expect("refused promptly");
    assert!(plain.is_err(), "a plain client was served by a TLS broker");

    // Trusting another CA: the handshake fails on the client.
    let other = tempfile::tempdir().unwrap();
    let other_ca = make_certificates(other.path(), "some other CA");
    let err = Client::connect_with(broker.addr, options(&other_ca, "localhost"))
        .await
        .err()
        .expect("a certificate from an untrusted CA is refused");
    assert!(
        matches!(err, bida::client::ClientError::Connect { .. }),
        "{err}"
    );

    // A name the certificate does not carry: refused too.
    assert!(
        Client::connect_with(broker.addr, options(&ca, "bida.example"))
            .await
            .is_err()
    );

    // The CLI speaks TLS with --tls-ca.
    std::fs::write(dir.path().join("ca.pem"), &ca).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_bida"))
        .args(["produce", "--topic", "cli", "--broker"])
        .arg(broker.addr.to_string())
        .arg("--tls-ca")
        .arg(dir.path().join("ca.pem"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"one\ntwo\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_speaks_https_only() {
    let dir = tempfile::tempdir().unwrap();
    let ca = make_certificates(dir.path(), "bida test CA");
    let broker = tls_broker(&dir.path().join("data"), dir.path());

    let tcp = tokio::net::TcpStream::connect(broker.admin).await.unwrap();
    let mut tls = ClientTls::new(ca.as_bytes(), "localhost")
        .unwrap()
        .connect(tcp)
        .await
        .expect("HTTPS handshake with the admin listener");
    tls.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tls.read_to_string(&mut response).await.ok();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("bida_connections"), "{response}");

    // Plain HTTP gets no page.
    let mut tcp = tokio::net::TcpStream::connect(broker.admin).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut plain = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut plain)).await;
    assert!(
        !String::from_utf8_lossy(&plain).contains("bida_connections"),
        "metrics served over plain HTTP"
    );
}

#[test]
fn a_bad_certificate_stops_the_start_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let _ = make_certificates(dir.path(), "bida test CA");
    std::fs::write(dir.path().join("broken.pem"), "not a certificate").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bida"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "off",
            "--data",
        ])
        .arg(dir.path().join("data"))
        .arg("--tls-cert")
        .arg(dir.path().join("broken.pem"))
        .arg("--tls-key")
        .arg(dir.path().join("key.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("broken.pem"), "{stderr}");
    assert!(
        !dir.path().join("data").exists(),
        "nothing opened before the certificate was checked"
    );
    // Only one of the pair: rejected by the flags.
    let out = Command::new(env!("CARGO_BIN_EXE_bida"))
        .args(["serve", "--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(dir.path().join("cert.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success());
}
