//! Per-record order on both backends: with several workers, scripted retries and versions
//! posted out of order, each record's deliveries only ever go forward in version, the newest
//! is delivered last, and every acknowledged job is accounted for (delivered or superseded).

use crate::helpers::{fixture, spawn_app_on, Backend, TestApp};
use fake_centercode::Fault;
use sf_centercode_relay::ordering::Decision;
use sf_centercode_relay::queue::Queue;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const RECORDS: u32 = 200;
const VERSIONS: u32 = 3;

/// Feedback record `r` at version `v`: its own notification, `SystemModstamp` v seconds after
/// a base time, and the subject `r{r}-v{v}` so Centercode's copy says which version it got.
fn feedback(r: u32, v: u32) -> Vec<u8> {
    let stamp = format!("2026-12-01T10:00:{v:02}.000Z");
    String::from_utf8(fixture("om_feedback_custom_object.xml"))
        .unwrap()
        .replace("04l8d0000100030AAA", &format!("04l{:015}", r * 10 + v))
        .replace("a0B8d00000AbCdEEAV", &format!("a0B{r:015}"))
        .replace("Folder rename reverted after sync", &format!("r{r}-v{v}"))
        .replace("2024-05-14T12:01:09.000Z", &stamp)
        .into_bytes()
}

async fn several_workers_deliver_each_record_in_version_order(backend: Backend) {
    // Arrange: three worker loops (8 deliveries each) on one queue, and Centercode failing
    // the first 150 calls with 503 so retries reorder deliveries (enough retries that none
    // parks, and a circuit that recovers at once). On RabbitMQ the ledger is in PostgreSQL.
    let pg = tokio::task::spawn_blocking(|| crate::services::postgres().url.clone())
        .await
        .unwrap();
    let app = spawn_app_on(backend, move |s| {
        let tier = if s.queue.backend == sf_centercode_relay::settings::QueueBackend::Rabbitmq {
            s.ledger.url = Some(pg.into());
            s.ledger.schema = format!("{}_order", s.queue.prefix);
            0.2
        } else {
            0.05
        };
        s.worker.retry_schedule_secs = vec![tier; 8];
        s.worker.circuit_cooldown_secs = 0.05;
    })
    .await;
    for _ in 0..150 {
        app.centercode.push_fault(Fault {
            status: 503,
            ..Fault::default()
        });
    }
    let stop = CancellationToken::new();
    let workers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(app.worker.clone().run_until_stopped(stop.clone())))
        .collect();

    // Act: every version of every record, interleaved (v2, v1, v3 in a shuffled record
    // order), posted by eight concurrent senders while the workers run.
    let mut order: Vec<(u32, u32)> = (0..RECORDS)
        .flat_map(|r| [2, 1, 3].map(|v| (r, v)))
        .collect();
    order.sort_by_key(|&(r, v)| (r.wrapping_mul(2_654_435_761) ^ v) % 1_000);
    let chunks: Vec<Vec<(u32, u32)>> = order
        .chunks(order.len() / 8 + 1)
        .map(<[_]>::to_vec)
        .collect();
    let senders = chunks.into_iter().map(|chunk| {
        let (client, address) = (app.client.clone(), app.address.clone());
        async move {
            for (r, v) in chunk {
                let res = client
                    .post(format!("{address}/salesforce/outbound/feedback"))
                    .header("content-type", "text/xml; charset=utf-8")
                    .header("SOAPAction", "\"\"")
                    .body(feedback(r, v))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 200, "every version is acknowledged");
            }
        }
    });
    futures_util::future::join_all(senders).await;
    let total = (RECORDS * VERSIONS) as usize;
    let outcomes = wait_for_outcomes(&app, total).await;
    stop.cancel();
    for w in workers {
        w.await.unwrap();
    }

    // Assert: per record, the versions Centercode received only increase, ending at the newest.
    let mut received: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for fb in app.centercode.feedback() {
        // The relay's JSON as Centercode received it.
        let sent: serde_json::Value =
            serde_json::from_str(fb["rawBody"].as_str().unwrap()).unwrap();
        let summary = sent["summary"].as_str().unwrap().to_owned();
        let (r, v) = summary
            .trim_start_matches('r')
            .split_once("-v")
            .unwrap_or_else(|| panic!("{sent}"));
        received
            .entry(r.parse().unwrap())
            .or_default()
            .push(v.parse().unwrap());
    }
    assert_eq!(
        received.len(),
        RECORDS as usize,
        "every record reached Centercode"
    );
    for (r, versions) in &received {
        assert!(
            versions.windows(2).all(|w| w[0] < w[1]),
            "record {r} went back in version: {versions:?}"
        );
        assert_eq!(
            versions.last(),
            Some(&VERSIONS),
            "record {r} ended on {versions:?}"
        );
    }
    // Every acknowledged job accounted for: delivered or superseded, nothing else, none lost.
    let delivered = outcomes.get("delivered").copied().unwrap_or(0);
    let superseded = outcomes.get("superseded").copied().unwrap_or(0);
    assert_eq!(delivered + superseded, total, "{outcomes:?}");
    assert_eq!(
        delivered,
        received.values().map(Vec::len).sum::<usize>(),
        "each delivery recorded once"
    );
    assert!(
        superseded > 0,
        "interleaving superseded some versions: {outcomes:?}"
    );
    let metrics = app
        .client
        .get(format!("{}/metrics", app.address))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "relay_deliveries_total{{action=\"create_feedback\",outcome=\"superseded\",route=\"feedback\"}} {superseded}"
        )) || metrics.contains("outcome=\"superseded\""),
        "{metrics}"
    );
}

/// Wait (polling with a deadline) until the ledger holds `n` jobs that ended, and count them
/// by outcome.
async fn wait_for_outcomes(app: &TestApp, n: usize) -> BTreeMap<String, usize> {
    use sf_centercode_relay::ledger::LedgerQuery;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut counts = BTreeMap::new();
        let mut after = None;
        loop {
            let page = app
                .queue
                .ledger_query(LedgerQuery {
                    route: Some("feedback".into()),
                    after: after.clone(),
                    limit: 1000,
                    ..LedgerQuery::default()
                })
                .await
                .unwrap();
            for e in &page {
                *counts
                    .entry(e.last_outcome.clone().unwrap_or_else(|| "pending".into()))
                    .or_insert(0) += 1;
            }
            match page.last() {
                Some(e) if page.len() == 1000 => {
                    after = Some(sf_centercode_relay::ledger::LedgerCursor {
                        stored_at_ms: e.facts.stored_at_ms,
                        job_id: e.facts.job_id.clone(),
                    })
                }
                _ => break,
            }
        }
        let ended: usize = ["delivered", "superseded"]
            .iter()
            .map(|o| counts.get(*o).copied().unwrap_or(0))
            .sum();
        if ended >= n {
            return counts;
        }
        if Instant::now() >= deadline {
            let sample = app
                .queue
                .ledger_query(LedgerQuery {
                    outcome: Some("pending".into()),
                    history: true,
                    limit: 3,
                    ..LedgerQuery::default()
                })
                .await
                .unwrap();
            panic!(
                "not all jobs ended: {counts:?}; {:?}; stats {:?}",
                sample,
                app.stats().await
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // poll with deadline
    }
}

#[tokio::test]
async fn embedded_several_workers_deliver_each_record_in_version_order() {
    several_workers_deliver_each_record_in_version_order(Backend::Embedded).await;
}

#[tokio::test]
async fn rabbitmq_several_workers_deliver_each_record_in_version_order() {
    several_workers_deliver_each_record_in_version_order(Backend::Rabbitmq).await;
}

/// The store's answers, and that they outlive the process holding them.
async fn the_newest_delivered_version_survives_a_restart(
    open: impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Queue>>>,
) {
    let key = format!("feedback\u{1f}a0B{}", uuid::Uuid::new_v4().simple());
    let q = open().await;
    assert_eq!(q.order_begin(&key, 20, 60_000).await.unwrap(), Decision::Go);
    assert_eq!(
        q.order_begin(&key, 10, 60_000).await.unwrap(),
        Decision::Busy,
        "20 is in flight"
    );
    q.order_finish(&key, 20, true).await.unwrap();
    q.close();
    drop(q);
    let q = open().await;
    assert_eq!(
        q.order_begin(&key, 10, 60_000).await.unwrap(),
        Decision::Superseded { newer: 20 },
        "the delivered version outlived the restart"
    );
    q.order_seen(vec![(key.clone(), 30)]).await.unwrap();
    assert_eq!(
        q.order_begin(&key, 25, 60_000).await.unwrap(),
        Decision::Superseded { newer: 30 },
        "a newer version waiting supersedes"
    );
    assert_eq!(q.order_begin(&key, 30, 60_000).await.unwrap(), Decision::Go);
    q.close();
}

#[tokio::test]
async fn embedded_the_newest_delivered_version_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.db");
    the_newest_delivered_version_survives_a_restart(|| {
        let path = path.clone();
        Box::pin(async move {
            Queue::Embedded(
                sf_centercode_relay::queue::SqliteQueue::open(
                    &path,
                    Duration::from_secs(30),
                    Duration::from_secs(600),
                    Duration::ZERO,
                )
                .unwrap(),
            )
        })
    })
    .await;
}

#[tokio::test]
async fn rabbitmq_the_newest_delivered_version_survives_a_restart() {
    let env = crate::helpers::RabbitEnv::new().await;
    let config = env.config(&[0.2], true);
    the_newest_delivered_version_survives_a_restart(|| {
        let config = config.clone();
        Box::pin(async move {
            Queue::Rabbit(
                sf_centercode_relay::queue::RabbitQueue::connect(config)
                    .await
                    .unwrap(),
            )
        })
    })
    .await;
}
