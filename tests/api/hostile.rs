//! Generated hostile input against a real `relay serve` process: every body gets a 4xx,
//! nothing is stored, and the process stays responsive with bounded memory (RSS).

use crate::helpers::{fixture, spawn_relay, write_relay_config};
use fake_centercode::{FakeCentercode, FakeConfig};
use std::process::Stdio;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn hostile_bodies() -> Vec<(&'static str, Vec<u8>)> {
    let valid = String::from_utf8(fixture("om_contact_gdpr_removal_single.xml")).unwrap();
    let after_decl = valid.find("?>").unwrap() + 2;
    let with_doctype =
        |dt: &str| format!("{}{dt}{}", &valid[..after_decl], &valid[after_decl..]).into_bytes();
    let notification = {
        let s = valid.find("<Notification>").unwrap();
        let e = valid.find("</Notification>").unwrap() + "</Notification>".len();
        valid[s..e].to_owned()
    };
    let big_field = "A".repeat(60 * 1024);
    let many_big: String = (0..100)
        .map(|i| {
            notification
                .replace("04l8d0000100001AAA", &format!("04l8d00001{i:08}"))
                .replace(
                    "<sf:LastName>Kowalska",
                    &format!("<sf:LastName>{big_field}"),
                )
        })
        .collect();
    let mut invalid_utf8 = valid.clone().into_bytes();
    let at = invalid_utf8.windows(5).position(|w| w == b"Marta").unwrap();
    invalid_utf8[at] = 0xC3;
    invalid_utf8[at + 1] = 0x28;
    let mut utf16 = vec![0xFF, 0xFE];
    utf16.extend(valid.encode_utf16().flat_map(|u| u.to_le_bytes()));
    vec![
        (
            "doctype with internal subset",
            with_doctype("<!DOCTYPE x [<!ENTITY a \"b\">]>"),
        ),
        (
            "doctype system",
            with_doctype("<!DOCTYPE x SYSTEM \"file:///etc/passwd\">"),
        ),
        (
            "doctype public",
            with_doctype("<!DOCTYPE x PUBLIC \"-//X//Y\" \"http://169.254.169.254/\">"),
        ),
        (
            "doctype parameter entities",
            with_doctype("<!DOCTYPE x [<!ENTITY % p SYSTEM \"http://127.0.0.1/\"> %p;]>"),
        ),
        ("bare doctype", with_doctype("<!DOCTYPE soapenv:Envelope>")),
        ("invalid utf-8", invalid_utf8),
        ("utf-16", utf16),
        (
            "100,000-character field name",
            valid
                .replace("sf:FirstName", &format!("sf:F{}", "x".repeat(100_000)))
                .into_bytes(),
        ),
        (
            "deep nesting",
            format!("{}{}", "<a>".repeat(50_000), "</a>".repeat(50_000)).into_bytes(),
        ),
        (
            "100 notifications near the size limit",
            valid.replace(&notification, &many_big).into_bytes(),
        ),
        (
            "unclosed CDATA",
            valid.replace("Marta", "<![CDATA[Marta").into_bytes(),
        ),
        (
            "undeclared entity",
            valid.replace("Marta", "&bogus;").into_bytes(),
        ),
        (
            "huge character reference",
            valid.replace("Marta", "&#99999999999;").into_bytes(),
        ),
    ]
}

#[tokio::test]
async fn hostile_bodies_get_4xx_store_nothing_and_memory_stays_bounded() {
    // Arrange
    let centercode = FakeCentercode::start(FakeConfig::demo()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_relay_config(
        dir.path(),
        "[server]\nbind = \"127.0.0.1:0\"\nworkers = 2\nbody_timeout_ms = 1000\n[queue]\n[worker]\nenabled = false\n[centercode]\napi_key = \"test-key\"\n",
        &centercode.base_url(),
    );
    let (mut child, base) = spawn_relay(&config, &["serve"], &[], Stdio::null());
    let client = reqwest::Client::new();
    let url = format!("{base}/salesforce/outbound/gdpr");
    // Warm up (allocator pools, first connections) before the baseline.
    for _ in 0..5 {
        client
            .post(&url)
            .header("Content-Type", "text/xml")
            .body(fixture("hostile_truncated.xml"))
            .send()
            .await
            .unwrap();
    }
    let before = rss_kib(child.id());

    // Act: every hostile body, 8 rounds, 8 at a time.
    let bodies = hostile_bodies();
    for round in 0..8 {
        let tasks: Vec<_> = bodies
            .iter()
            .map(|(name, body)| {
                let (client, url, body, name) = (client.clone(), url.clone(), body.clone(), *name);
                tokio::spawn(async move {
                    let r = client
                        .post(url)
                        .header("Content-Type", "text/xml; charset=utf-8")
                        .body(body)
                        .send()
                        .await
                        .unwrap();
                    (
                        name,
                        r.status().as_u16(),
                        r.text().await.unwrap_or_default(),
                    )
                })
            })
            .collect();
        for t in tasks {
            let (name, status, text) = t.await.unwrap();
            assert!(
                (400..500).contains(&status),
                "round {round}, {name}: {status}"
            );
            assert!(!text.contains("<Ack>true</Ack>"), "{name}");
        }
    }
    // A body over the limit, sent slowly and never finished.
    let slow = tokio::spawn({
        let base = base.clone();
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
                .await
                .unwrap();
            s.write_all(b"POST /salesforce/outbound/gdpr HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\nTransfer-Encoding: chunked\r\n\r\n").await.unwrap();
            // A slow sender, on purpose: one 1 KiB chunk every 50 ms.
            let mut pace = tokio::time::interval(std::time::Duration::from_millis(50));
            for _ in 0..30 {
                pace.tick().await;
                if s.write_all(b"400\r\n").await.is_err()
                    || s.write_all(&[b'x'; 1024]).await.is_err()
                    || s.write_all(b"\r\n").await.is_err()
                {
                    break;
                }
            }
            let mut buf = Vec::new();
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut buf))
                    .await;
            String::from_utf8_lossy(&buf)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        }
    });
    let first_line = slow.await.unwrap();
    assert!(
        first_line.starts_with("HTTP/1.1 408") || first_line.is_empty(),
        "slow sender got: {first_line}"
    );

    // Assert: still answering, nothing stored, memory bounded.
    let r = client
        .post(&url)
        .header("Content-Type", "text/xml")
        .body(fixture("om_contact_gdpr_removal_single.xml"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the relay still acks valid messages");
    let after = rss_kib(child.id());
    child.kill().unwrap();
    child.wait().unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("relay.db")).unwrap();
    let jobs: i64 = conn
        .query_row("SELECT count(*) FROM jobs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(jobs, 1, "only the valid message was stored");
    println!("RSS before {before} KiB, after {after} KiB");
    assert!(
        after < before + 64 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
}
