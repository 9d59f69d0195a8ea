//! The SOAP gateway: statuses, the exact ack, and "rejected means nothing stored".

use crate::helpers::{fixture, spawn_app, spawn_app_with, TestApp};
use serde_json::Value;

const ACK: &str = "response_ack_true.xml";

fn route_for(body: &[u8]) -> &'static str {
    let text = String::from_utf8_lossy(body);
    if text.contains("sf:Feedback__c") {
        "feedback"
    } else if text.contains("sf:Case") {
        "case-feedback"
    } else {
        "gdpr"
    }
}

/// A `.http` fixture: headers, blank line, body.
fn split_http(raw: &[u8]) -> (String, Vec<u8>) {
    let text = String::from_utf8(raw.to_vec()).unwrap();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .or_else(|| text.split_once("\n\n"))
        .unwrap();
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .unwrap()
        .trim()
        .to_owned();
    (content_type, body.as_bytes().to_vec())
}

async fn queued(app: &TestApp) -> u64 {
    let s = app.stats().await;
    s.ready + s.in_flight + s.retrying + s.parked
}

#[tokio::test]
async fn every_fixture_gets_the_status_and_ack_from_the_manifest() {
    let manifest: Value = serde_json::from_slice(&fixture("manifest.json")).unwrap();
    let ack = fixture(ACK);
    let mut checked = 0;
    for case in manifest["outbound_message_fixtures"].as_array().unwrap() {
        // Arrange: a fresh relay per fixture (an empty dedupe store, as the manifest assumes).
        let app = spawn_app().await;
        let file = case["file"].as_str().unwrap();
        let raw = fixture(file);
        let (content_type, body) = match case["send_content_type"].as_str() {
            Some(ct) => (ct.to_owned(), raw),
            None => split_http(&raw),
        };
        if case["kind"] == "valid-duplicate" {
            let original = fixture("om_contact_gdpr_removal_single.xml");
            assert_eq!(app.post_outbound("gdpr", original).await.status(), 200);
        }
        let before = queued(&app).await;

        // Act
        let response = app
            .post_outbound_as(route_for(&body), body, &content_type)
            .await;

        // Assert
        let status = response.status().as_u16();
        assert!(
            response.headers().contains_key("x-request-id"),
            "{file}: no request id"
        );
        let response_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        let text = response.bytes().await.unwrap();
        assert_eq!(
            status,
            case["expected_status"].as_u64().unwrap() as u16,
            "{file}: {}",
            String::from_utf8_lossy(&text)
        );
        if case["expected_ack_true"].as_bool().unwrap() {
            assert_eq!(
                text.as_ref(),
                ack.as_slice(),
                "{file}: ack must be byte-identical"
            );
            assert_eq!(response_type, "text/xml; charset=utf-8");
        } else {
            assert!(
                !String::from_utf8_lossy(&text).contains("<Ack>true</Ack>"),
                "{file}: must not ack"
            );
            if status != 415 {
                assert!(
                    String::from_utf8_lossy(&text).contains("<faultcode>"),
                    "{file}: SOAP Fault expected"
                );
            }
        }
        let enqueued = queued(&app).await - before;
        assert_eq!(
            enqueued,
            case["expected_enqueued"].as_u64().unwrap(),
            "{file}: jobs stored"
        );
        checked += 1;
    }
    assert!(checked >= 20, "manifest drove only {checked} cases");
}

#[tokio::test]
async fn a_redelivered_notification_is_stored_once() {
    let app = spawn_app().await;
    for _ in 0..3 {
        let r = app
            .post_outbound("gdpr", fixture("om_contact_gdpr_removal_single.xml"))
            .await;
        assert_eq!(r.status(), 200);
    }
    let r = app
        .post_outbound("gdpr", fixture("om_contact_gdpr_removal_redelivery.xml"))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.stats().await.ready, 1);
}

#[tokio::test]
async fn duplicate_ids_inside_one_message_are_stored_once() {
    let app = spawn_app().await;
    let single = String::from_utf8(fixture("om_contact_gdpr_removal_single.xml")).unwrap();
    let start = single.find("<Notification>").unwrap();
    let end = single.find("</Notification>").unwrap() + "</Notification>".len();
    let notification = &single[start..end];
    let doubled = single.replace(notification, &format!("{notification}\n{notification}"));
    let r = app.post_outbound("gdpr", doubled.into_bytes()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.stats().await.ready, 1);
}

#[tokio::test]
async fn any_namespace_prefix_is_accepted() {
    let app = spawn_app().await;
    let body = String::from_utf8(fixture("om_contact_gdpr_removal_single.xml"))
        .unwrap()
        .replace("soapenv:", "S:")
        .replace("xmlns:soapenv", "xmlns:S")
        .replace("sf:", "ent:")
        .replace("xmlns:sf", "xmlns:ent")
        .replace("xsi:", "i:")
        .replace("xmlns:xsi", "xmlns:i");
    let r = app.post_outbound("gdpr", body.into_bytes()).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(app.stats().await.ready, 1);
}

#[tokio::test]
async fn an_sobject_the_route_does_not_accept_is_refused() {
    let app = spawn_app().await;
    let r = app
        .post_outbound("feedback", fixture("om_contact_gdpr_removal_single.xml"))
        .await;
    assert_eq!(r.status(), 400);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("not accepted by this route"));
    assert_eq!(app.stats().await.ready, 0);
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413_and_stores_nothing() {
    let app = spawn_app().await;
    let filler = "X".repeat(1024 * 1024 + 4096);
    let body = String::from_utf8(fixture("om_feedback_custom_object.xml"))
        .unwrap()
        .replacen(
            "<sf:Description__c>",
            &format!("<sf:Description__c>{filler}"),
            1,
        );
    let r = app.post_outbound("feedback", body.into_bytes()).await;
    assert_eq!(r.status(), 413);
    assert_eq!(app.stats().await.ready, 0);
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_gets_413_while_streaming() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app().await;
    let addr = app.address.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = "POST /salesforce/outbound/gdpr HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\nTransfer-Encoding: chunked\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'<'; 64 * 1024];
    // Send up to 2 MiB (twice the limit) without a Content-Length; the relay must stop us.
    for _ in 0..32 {
        let frame = [
            format!("{:x}\r\n", chunk.len()).into_bytes(),
            chunk.clone(),
            b"\r\n".to_vec(),
        ]
        .concat();
        if stream.write_all(&frame).await.is_err() {
            break;
        }
    }
    let mut response = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut response),
    )
    .await;
    let text = String::from_utf8_lossy(&response);
    assert!(
        text.starts_with("HTTP/1.1 413"),
        "got: {}",
        text.lines().next().unwrap_or("")
    );
    assert_eq!(app.stats().await.ready, 0);
}

#[tokio::test]
async fn wrong_method_unknown_route_and_content_type_have_clear_answers() {
    let app = spawn_app().await;
    let url = format!("{}/salesforce/outbound/gdpr", app.address);
    let r = app.client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert!(r.headers().contains_key("x-request-id"));
    let r = app.client.put(&url).body("x").send().await.unwrap();
    assert_eq!(r.status(), 405);
    let r = app
        .post_outbound(
            "no-such-route",
            fixture("om_contact_gdpr_removal_single.xml"),
        )
        .await;
    assert_eq!(r.status(), 404);
    // A callout route is not an Outbound Message route.
    let r = app
        .post_outbound(
            "apex-removal",
            fixture("om_contact_gdpr_removal_single.xml"),
        )
        .await;
    assert_eq!(r.status(), 404);
    assert_eq!(app.stats().await.ready, 0);
}

#[tokio::test]
async fn a_storage_failure_answers_503_so_salesforce_retries() {
    let app = spawn_app().await;
    app.queue.close();
    let r = app
        .post_outbound("gdpr", fixture("om_contact_gdpr_removal_single.xml"))
        .await;
    assert_eq!(r.status(), 503);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("soapenv:Server") && !text.contains("<Ack>true"),
        "{text}"
    );
}

#[tokio::test]
async fn readiness_reports_the_queue() {
    let app = spawn_app().await;
    let live = app
        .client
        .get(format!("{}/health/live", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
    let ready = app
        .client
        .get(format!("{}/health/ready", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    app.queue.close();
    let ready = app
        .client
        .get(format!("{}/health/ready", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
}

#[tokio::test]
async fn a_hostile_flood_leaves_the_gateway_responsive() {
    let app = spawn_app_with(|s| s.server.max_body_bytes = 64 * 1024).await;
    let hostile = [
        "hostile_billion_laughs.xml",
        "hostile_xxe_external_entity.xml",
        "hostile_truncated.xml",
    ];
    let deep = format!("{}{}", "<a>".repeat(100_000), "</a>".repeat(10));
    let mut tasks = Vec::new();
    for i in 0..60 {
        let body = if i % 4 == 3 {
            deep.clone().into_bytes()
        } else {
            fixture(hostile[i % 3])
        };
        let client = app.client.clone();
        let url = format!("{}/salesforce/outbound/gdpr", app.address);
        tasks.push(tokio::spawn(async move {
            client
                .post(url)
                .header("Content-Type", "text/xml")
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    for t in tasks {
        let status = t.await.unwrap();
        assert!(status == 400 || status == 413, "got {status}");
    }
    let r = app
        .post_outbound("gdpr", fixture("om_contact_gdpr_removal_single.xml"))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.stats().await.ready, 1);
}

#[tokio::test]
async fn requests_beyond_the_concurrency_cap_wait_and_are_acked() {
    let app = spawn_app_with(|s| s.server.max_concurrent_requests = 1).await;
    let single = String::from_utf8(fixture("om_contact_gdpr_removal_single.xml")).unwrap();
    let sends: Vec<_> = (0..20)
        .map(|n| {
            let body = single
                .replace("04l8d0000100001AAA", &format!("04l8d00001{n:08}"))
                .into_bytes();
            app.post_outbound("gdpr", body)
        })
        .collect();
    for r in futures_util::future::join_all(sends).await {
        assert_eq!(r.status(), 200);
    }
    assert_eq!(app.stats().await.ready, 20);
}
