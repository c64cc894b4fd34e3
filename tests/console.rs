//! The admin web console in a real headless Chromium (through chromedriver
//! and the WebDriver protocol), against a real `bida serve` that requires a
//! token: the page asks for it, shows a topic the test created, shows a
//! poisoned message in the dead-letter view, and re-drives it back to its
//! topic, where the group's consumer receives it.
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (Debian packages
//! `chromium` and `chromium-driver`; `.ci/run` installs them). Without them
//! the test says so and passes, unless `BIDA_REQUIRE_BROWSER=1` (set by CI),
//! in which case it fails. `BIDA_CONSOLE_SCREENSHOT=PATH` saves a PNG of the
//! page (docs/console.png is made that way).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests and benches fail loudly

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bida::client::{Client, Consumer, ConsumerOptions, OutgoingMessage, Producer, ProducerOptions};
use fantoccini::{ClientBuilder, Locator};

use support::admin::poison;
use support::broker::BrokerProcess;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const TOKEN: &str = "console-s3cret";

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts chromedriver on a free loopback port; returns it and its URL.
async fn chromedriver() -> (Driver, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let driver = Driver(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "chromedriver did not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (driver, format!("http://127.0.0.1:{port}"))
}

fn browser_present() -> bool {
    let present = Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists();
    if !present {
        assert!(
            std::env::var("BIDA_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "BIDA_REQUIRE_BROWSER=1 but {CHROMIUM} or {CHROMEDRIVER} is missing \
             (apt-get install chromium chromium-driver)"
        );
        eprintln!(
            "SKIPPED: the console test needs {CHROMIUM} and {CHROMEDRIVER} \
             (apt-get install chromium chromium-driver)"
        );
    }
    present
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_topics_and_dead_letters_and_redrives_one() {
    if !browser_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &["--auth-token", TOKEN]);
    let client = Client::connect_with_token(broker.addr, Some(TOKEN))
        .await
        .unwrap();
    poison(&client, "orders", b"order 42: bad").await;
    // Some traffic for the throughput chart and the group table: bounded
    // in count and time.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let client = client.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let producer = Producer::new(client.clone(), "payments", ProducerOptions::default())
                .await
                .unwrap();
            let consumer = Consumer::new(
                client,
                "payments",
                "ledger",
                ConsumerOptions {
                    max_messages: 2500,
                    max_wait: Duration::from_millis(20),
                    ..ConsumerOptions::default()
                },
            );
            let until = Instant::now() + Duration::from_secs(60);
            let mut n = 0u32;
            let stopped = || stop.load(std::sync::atomic::Ordering::Acquire);
            while !stopped() && Instant::now() < until && n < 5_000_000 {
                for _ in 0..2000 {
                    n += 1;
                    producer
                        .send_with_callback(
                            OutgoingMessage::new(format!("payment {n}").into_bytes()),
                            |_| {},
                        )
                        .await;
                }
                producer.flush().await;
                let got = consumer.fetch().await.unwrap();
                consumer.ack(&got.iter().collect::<Vec<_>>()).await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let (_driver, url) = chromedriver().await;
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1400,1250"],
        }),
    );
    // This test binary links rustls with two crypto providers (ring for
    // bida's TLS, aws-lc-rs through fantoccini): name the process default,
    // or rustls refuses to guess and panics.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let browser = ClientBuilder::rustls()
        .unwrap()
        .capabilities(caps)
        .connect(&url)
        .await
        .expect("a Chromium session");
    let result = drive(&browser, &broker).await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    let _ = browser.close().await;
    result.unwrap();
    traffic.await.unwrap();

    // The re-driven message reaches the group's consumer.
    let workers = Consumer::new(
        client.clone(),
        "orders",
        "workers",
        ConsumerOptions {
            max_wait: Duration::from_millis(200),
            ..ConsumerOptions::default()
        },
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let got = loop {
        let got = workers.fetch().await.unwrap();
        if !got.is_empty() || Instant::now() > deadline {
            break got;
        }
    };
    assert_eq!(got.len(), 1, "the re-driven message is delivered");
    assert_eq!(&got[0].payload[..], b"order 42: bad");
    assert_eq!(got[0].offset, 1);
}

async fn drive(
    b: &fantoccini::Client,
    broker: &BrokerProcess,
) -> Result<(), Box<dyn std::error::Error>> {
    let wait = || b.wait().at_most(Duration::from_secs(20));
    b.goto(&format!("http://{}/", broker.admin)).await?;
    // The broker requires a token: the page asks for it.
    let input = wait().for_element(Locator::Id("token-input")).await?;
    assert!(input.is_displayed().await?, "the token form is shown");
    input.send_keys(TOKEN).await?;
    b.find(Locator::Id("token-submit")).await?.click().await?;

    // The topic the test created.
    let row = wait()
        .for_element(Locator::Css(r#"#topics tr[data-topic="orders"]"#))
        .await?;
    let text = row.text().await?;
    assert!(text.starts_with("orders"), "{text}");
    wait()
        .for_element(Locator::Css(r#"#topics tr[data-topic="orders.dlq"]"#))
        .await?;
    wait()
        .for_element(Locator::Css(
            r#"#groups tr[data-topic="orders"][data-group="workers"]"#,
        ))
        .await?;

    // The poisoned message in the dead-letter view.
    let dead = wait()
        .for_element(Locator::Css(r#"#dlq-messages tr[data-offset="0"]"#))
        .await?;
    let text = dead.text().await?;
    assert!(text.contains("orders #0"), "{text}");
    assert!(text.contains("order 42: bad"), "{text}");
    dead.click().await?;
    let payload = wait().for_element(Locator::Id("payload")).await?;
    assert_eq!(payload.text().await?, "order 42: bad");
    let detail = b.find(Locator::Id("message-detail")).await?.text().await?;
    assert!(detail.contains("bida-original-topic"), "{detail}");
    assert!(detail.contains("bida-attempts"), "{detail}");

    // For the picture, let the chart gather some traffic first.
    if let Ok(path) = std::env::var("BIDA_CONSOLE_SCREENSHOT") {
        tokio::time::sleep(Duration::from_secs(20)).await;
        std::fs::write(&path, b.screenshot().await?)?;
    }

    // Re-drive it.
    b.find(Locator::Id("redrive")).await?.click().await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let notice = b.find(Locator::Id("notice")).await?.text().await?;
        if notice.contains("Re-driven: orders partition 0 offset 1") {
            break;
        }
        assert!(Instant::now() < deadline, "no confirmation: {notice:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
