//! Access control on inbound routes: secret path tokens, IP allowlists, trusted proxies,
//! slow clients; and no secret or personal data in the logs.

use crate::helpers::{fixture, spawn_app_with};

const TOKEN: &str = "s3cret-path-token-0123456789";

#[tokio::test]
async fn a_route_with_a_path_token_answers_only_at_its_secret_url() {
    let app = spawn_app_with(|s| s.routes[0].path_token = Some(TOKEN.to_owned().into())).await;
    let body = || fixture("om_contact_gdpr_removal_single.xml");
    assert_eq!(app.post_outbound("gdpr", body()).await.status(), 404);
    assert_eq!(
        app.post_outbound("gdpr/wrong-token-0123456789", body())
            .await
            .status(),
        404
    );
    let r = app.post_outbound(&format!("gdpr/{TOKEN}"), body()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.stats().await.ready, 1);
    // A route without a token does not answer under a token path.
    assert_eq!(
        app.post_outbound(
            &format!("feedback/{TOKEN}"),
            fixture("om_feedback_custom_object.xml")
        )
        .await
        .status(),
        404
    );
}

#[tokio::test]
async fn the_ip_allowlist_refuses_other_addresses() {
    let app = spawn_app_with(|s| {
        s.routes[0].allowed_ips = vec!["10.0.0.0/8".into()];
        s.routes[1].allowed_ips = vec!["127.0.0.1/32".into()];
        s.routes[3].allowed_ips = vec!["192.0.2.0/24".into()];
    })
    .await;
    let r = app
        .post_outbound("gdpr", fixture("om_contact_gdpr_removal_single.xml"))
        .await;
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("may not send"));
    assert_eq!(
        app.post_outbound("feedback", fixture("om_feedback_custom_object.xml"))
            .await
            .status(),
        200
    );
    let callout = app
        .post_callout(
            "apex-removal",
            &fixture("apex_removal_request.json"),
            &crate::helpers::bearer("k"),
        )
        .await;
    assert_eq!(callout.status(), 403);
    // X-Forwarded-For from an untrusted peer is ignored.
    let r = app
        .client
        .post(format!("{}/salesforce/outbound/gdpr", app.address))
        .header("Content-Type", "text/xml")
        .header("X-Forwarded-For", "10.1.2.3")
        .body(fixture("om_contact_gdpr_removal_single.xml"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(app.stats().await.ready, 1);
}

#[tokio::test]
async fn x_forwarded_for_counts_only_behind_a_trusted_proxy() {
    let app = spawn_app_with(|s| {
        s.server.trusted_proxies = vec!["127.0.0.0/8".into()];
        s.routes[0].allowed_ips = vec!["203.0.113.0/24".into()];
    })
    .await;
    let send = |xff: &'static str| {
        app.client
            .post(format!("{}/salesforce/outbound/gdpr", app.address))
            .header("Content-Type", "text/xml")
            .header("X-Forwarded-For", xff)
            .body(fixture("om_contact_gdpr_removal_single.xml"))
            .send()
    };
    assert_eq!(send("198.51.100.7").await.unwrap().status(), 403);
    assert_eq!(send("203.0.113.9").await.unwrap().status(), 200);
}

#[tokio::test]
async fn every_x_forwarded_for_line_counts_so_a_forged_first_line_does_not_win() {
    let app = spawn_app_with(|s| {
        s.server.trusted_proxies = vec!["127.0.0.0/8".into()];
        s.routes[0].allowed_ips = vec!["203.0.113.0/24".into()];
    })
    .await;
    let send = |lines: &'static [&'static str]| {
        let mut req = app
            .client
            .post(format!("{}/salesforce/outbound/gdpr", app.address))
            .header("Content-Type", "text/xml");
        for line in lines {
            // reqwest appends: each value goes out as its own header line.
            req = req.header("X-Forwarded-For", *line);
        }
        req.body(fixture("om_contact_gdpr_removal_single.xml"))
            .send()
    };
    // The client forged an allowed address; the proxy appended the real one on a new line.
    let r = send(&["203.0.113.9", "198.51.100.7"]).await.unwrap();
    assert_eq!(r.status(), 403);
    // The real client is allowed; an earlier (untrusted) line is not what decides.
    let r = send(&["198.51.100.7", "203.0.113.9"]).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(app.stats().await.ready, 1);
}

#[tokio::test]
async fn a_slow_client_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app_with(|s| {
        s.server.body_timeout_ms = 300;
        s.server.header_timeout_ms = 300;
    })
    .await;
    let addr = app.address.trim_start_matches("http://").to_owned();
    // Headers that never finish.
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stream
        .write_all(b"POST /salesforce/outbound/gdpr HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut buf),
    )
    .await;
    assert!(read.is_ok(), "the relay kept a half-sent request open");
    // A body that trickles.
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stream
        .write_all(b"POST /salesforce/outbound/gdpr HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\nContent-Length: 1000\r\n\r\n<")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut buf),
    )
    .await;
    assert!(read.is_ok(), "the relay waited for a trickling body");
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert_eq!(app.stats().await.ready, 0);
}

/// Open `n` connections that send a request head and then one body byte a second; returns
/// the tasks keeping them trickling (abort them to stop).
async fn trickling_bodies(addr: &str, n: usize, head: &str) -> Vec<tokio::task::JoinHandle<()>> {
    use tokio::io::AsyncWriteExt;
    let mut tasks = Vec::new();
    for _ in 0..n {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
                if stream.write_all(b"<").await.is_err() {
                    return;
                }
            }
        }));
    }
    tasks
}

#[tokio::test]
async fn slow_senders_do_not_hold_the_slots_salesforce_traffic_needs() {
    // Arrange: 64 connections trickling an Outbound Message body one byte a second, twice
    // as many as there are request slots (server.max_concurrent_requests = 32).
    let app = spawn_app_with(|s| s.server.max_concurrent_requests = 32).await;
    let addr = app.address.trim_start_matches("http://").to_owned();
    let head = "POST /salesforce/outbound/gdpr HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\nContent-Length: 100000\r\n\r\n<";
    let slow = trickling_bodies(&addr, 64, head).await;

    // Act: Salesforce's own messages, one after another.
    let mut latencies = Vec::new();
    for n in 0..10u32 {
        let body = String::from_utf8(fixture("om_contact_gdpr_removal_single.xml"))
            .unwrap()
            .replace("04l8d0000100001AAA", &format!("04l8d00001{n:08}"));
        let started = std::time::Instant::now();
        let r = app.post_outbound("gdpr", body.into_bytes()).await;
        latencies.push(started.elapsed());
        assert_eq!(r.status(), 200);
    }
    for task in slow {
        task.abort();
    }

    // Assert: normal latency (the trickling bodies take 10 s to time out).
    let worst = latencies.iter().max().unwrap();
    assert!(
        *worst < std::time::Duration::from_secs(1),
        "with 64 slow senders a message took {worst:?} ({latencies:?})"
    );
    assert_eq!(app.stats().await.ready, 10);
}

#[tokio::test]
async fn a_callout_without_its_token_is_refused_before_its_body_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app_with(|_| {}).await;
    let addr = app.address.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    // A body announced but never sent, behind a wrong bearer token.
    stream
        .write_all(b"POST /salesforce/callout/apex-removal HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer wrong-token-0123456789\r\nContent-Length: 5000\r\n\r\n{")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(2), stream.read(&mut buf))
        .await
        .expect("the refusal came without waiting for the body")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
}
