//! The relay end to end on RabbitMQ: the real gateway and worker, a per-test queue prefix,
//! Redis dedupe; a broken connection answers 503, and a broker restart loses nothing acked.

use crate::helpers::{
    fixture, redis_url, spawn_app_in, spawn_app_on, Backend, BrokerOwner, RabbitEnv, TestApp,
};
use sf_centercode_relay::queue::{EnqueueOutcome, Job, NewJob, QueueError};
use sf_centercode_relay::settings::Action;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

fn removal(n: u32) -> Vec<u8> {
    String::from_utf8(fixture("om_contact_gdpr_removal_single.xml"))
        .unwrap()
        .replace("04l8d0000100001AAA", &format!("04l{n:015}"))
        .replace(
            "marta.kowalska@example.org",
            &format!("user{n}@example.com"),
        )
        .into_bytes()
}

fn finds(app: &TestApp) -> Vec<String> {
    app.centercode
        .requests()
        .iter()
        .filter_map(|r| {
            r.query
                .get("find")
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        })
        .collect()
}

async fn ready_status(app: &TestApp) -> u16 {
    app.client
        .get(format!("{}/health/ready", app.address))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Poll `check` every 20 ms until it holds, for at most `limit`.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await; // poll with deadline
    }
}

#[tokio::test]
async fn a_batch_of_100_is_delivered_exactly_once_through_rabbitmq() {
    // Arrange
    let app = spawn_app_on(Backend::Rabbitmq, |_| {}).await;
    // Act: the batch, then Salesforce's redelivery of the same batch.
    let first = app
        .post_outbound("gdpr", fixture("om_contact_batch_100.xml"))
        .await;
    let second = app
        .post_outbound("gdpr", fixture("om_contact_batch_100.xml"))
        .await;
    // Assert
    assert_eq!(first.status(), 200);
    assert!(first.text().await.unwrap().contains("<Ack>true</Ack>"));
    assert_eq!(second.status(), 200, "a redelivered batch is acknowledged");
    assert_eq!(app.stats().await.ready, 100, "stored once, not twice");
    let outcomes = app.deliver_until_settled().await;
    assert_eq!(outcomes.len(), 100);
    let mut sent = finds(&app);
    sent.sort();
    sent.dedup();
    assert_eq!(sent.len(), 100, "every e-mail once");
    assert_eq!(app.centercode.requests().len(), 100, "nothing sent twice");
    assert_eq!(app.stats().await, Default::default());
}

#[tokio::test]
async fn a_notification_being_stored_by_another_request_gets_503_not_a_duplicate_ack() {
    // Arrange: another gateway holds the claim for this notification id (in Redis).
    let app = spawn_app_on(Backend::Rabbitmq, |_| {}).await;
    let prefix = &app.rabbit.as_ref().unwrap().prefix;
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("{prefix}:dedupe:om:00D8d000001AbCd:04l000000000000007");
    redis::cmd("SET")
        .arg(&key)
        .arg("pending:someone-else")
        .arg("PX")
        .arg(30_000)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    // Act
    let busy = app.post_outbound("gdpr", removal(7)).await;
    redis::cmd("DEL")
        .arg(&key)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let later = app.post_outbound("gdpr", removal(7)).await;
    // Assert
    assert_eq!(busy.status(), 503, "Salesforce must retry, not get an Ack");
    assert_eq!(later.status(), 200);
    assert_eq!(app.stats().await.ready, 1);
}

#[tokio::test]
async fn an_unroutable_publish_is_an_error_not_an_ack() {
    // Arrange: the work queue disappears behind the relay's back.
    let env = RabbitEnv::new().await;
    let q = env.open(env.config(&[0.2], true)).await;
    let (conn, channel) = broker_channel(&env.url).await;
    channel
        .queue_delete(
            &format!("{}.work", env.prefix),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    // Act
    let job = removal_job("k");
    let result = q.enqueue(vec![job.clone()]).await;
    // Assert: mandatory publish came back; the dedupe claim was released.
    assert!(
        matches!(&result, Err(QueueError::Broker(m)) if m.contains("unroutable")),
        "{result:?}"
    );
    let _ = conn.close(200, "done").await;
    assert!(
        !matches!(q.enqueue(vec![job]).await, Err(QueueError::InProgress)),
        "a failed publish leaves no pending claim behind"
    );
}

#[tokio::test]
async fn an_unreadable_message_is_dead_lettered_to_parked_not_lost() {
    // Arrange: something that is not a job lands in the work queue.
    let env = RabbitEnv::new().await;
    let q = env.open(env.config(&[0.2], true)).await;
    let (conn, channel) = broker_channel(&env.url).await;
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = channel
        .basic_publish(
            "",
            &format!("{}.work", env.prefix),
            lapin::options::BasicPublishOptions::default(),
            b"not a job",
            lapin::BasicProperties::default().with_message_id("garbage-1".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    let _ = conn.close(200, "done").await;
    // Act
    let leased = q.lease(10, Vec::new()).await.unwrap();
    // Assert: no worker gets it; the broker's dead-letter route took it to parked.
    assert!(leased.is_empty());
    eventually(Duration::from_secs(5), "the message is parked", || async {
        q.stats().await.unwrap().parked == 1
    })
    .await;
    let parked = q.parked(10).await.unwrap();
    assert_eq!(parked[0].id, "garbage-1");
    assert_eq!(parked[0].reason, "dead-lettered by RabbitMQ (rejected)");
}

/// A TCP forwarder to the broker that the test can cut and restore, so one relay loses its
/// connection without disturbing the broker other tests use.
struct Proxy {
    port: u16,
    target: String,
    cut: Mutex<CancellationToken>,
    /// While true, the broker's bytes are held back (the client's still go through).
    hold: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    async fn start(target: &str) -> Arc<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Arc::new(Proxy {
            port: listener.local_addr().unwrap().port(),
            target: target.to_owned(),
            cut: Mutex::new(CancellationToken::new()),
            hold: tokio::sync::watch::channel(false).0,
        });
        proxy.serve(listener);
        proxy
    }

    fn serve(self: &Arc<Self>, listener: TcpListener) {
        let token = self.cut.lock().unwrap().clone();
        let target = self.target.clone();
        let hold = self.hold.clone();
        tokio::spawn(async move {
            loop {
                let (inbound, _) = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => return },
                    _ = token.cancelled() => return,
                };
                let (token, target) = (token.clone(), target.clone());
                let mut hold = hold.subscribe();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let (mut from_client, mut to_client) = inbound.into_split();
                    let (mut from_broker, mut to_broker) = outbound.into_split();
                    let replies = async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match from_broker.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if hold.wait_for(|held| !held).await.is_err() {
                                return;
                            }
                            if to_client.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    tokio::select! {
                        _ = tokio::io::copy(&mut from_client, &mut to_broker) => {}
                        _ = replies => {}
                        _ = token.cancelled() => {}
                    }
                });
            }
        });
    }

    /// Hold back (true) or pass on (false) what the broker sends.
    fn hold_replies(&self, held: bool) {
        self.hold.send_replace(held);
    }

    /// Drop every connection and refuse new ones.
    fn cut(&self) {
        self.cut.lock().unwrap().cancel();
    }

    /// Accept connections again on the same port.
    async fn restore(self: &Arc<Self>) {
        *self.cut.lock().unwrap() = CancellationToken::new();
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        self.serve(listener);
    }
}

#[tokio::test]
async fn the_gateway_answers_503_while_the_broker_connection_is_down_and_recovers() {
    // Arrange: the relay reaches the broker through a proxy.
    let env_url = crate::helpers::amqp_url();
    let broker = crate::helpers::broker_address(&env_url);
    let proxy = Proxy::start(&broker).await;
    let proxied = env_url.replacen(&broker, &format!("127.0.0.1:{}", proxy.port), 1);
    let app = spawn_app_on(Backend::Rabbitmq, |s| s.queue.url = proxied.clone().into()).await;
    assert_eq!(app.post_outbound("gdpr", removal(1)).await.status(), 200);
    assert_eq!(ready_status(&app).await, 200);
    // Act: the connection drops and cannot be re-established.
    proxy.cut();
    // Assert: fail fast with 503 (Salesforce retries), readiness says not ready.
    eventually(Duration::from_secs(5), "enqueue fails", || async {
        app.post_outbound("gdpr", removal(2)).await.status() == 503
    })
    .await;
    let started = Instant::now();
    assert_eq!(app.post_outbound("gdpr", removal(3)).await.status(), 503);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "503 without waiting"
    );
    assert_eq!(ready_status(&app).await, 503);
    // Act: the broker is reachable again.
    proxy.restore().await;
    // Assert: the relay reconnected by itself; what was acknowledged is delivered.
    eventually(Duration::from_secs(15), "the relay reconnects", || async {
        ready_status(&app).await == 200
    })
    .await;
    assert_eq!(app.post_outbound("gdpr", removal(4)).await.status(), 200);
    app.deliver_until_settled().await;
    let sent: HashSet<String> = finds(&app).into_iter().collect();
    assert!(sent.contains("user1@example.com") && sent.contains("user4@example.com"));
}

#[tokio::test]
async fn a_broker_restart_mid_load_loses_nothing_acknowledged() {
    // Arrange: exclusive use of the broker; a relay with its worker running; four senders
    // that, like Salesforce, send each notification again until it is acknowledged.
    let owner = BrokerOwner::acquire().await;
    let env = RabbitEnv::unlocked().await;
    let app = spawn_app_in(Some(env), |s| s.worker.poll_interval_ms = 50).await;
    let stop = CancellationToken::new();
    let worker = tokio::spawn(app.worker.clone().run_until_stopped(stop.clone()));
    let acked: Arc<Mutex<HashSet<u32>>> = Arc::default();
    let refused = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let sending = CancellationToken::new();
    let mut senders = Vec::new();
    for s in 0..4u32 {
        let (client, url, acked, refused, sending) = (
            app.client.clone(),
            format!("{}/salesforce/outbound/gdpr", app.address),
            acked.clone(),
            refused.clone(),
            sending.clone(),
        );
        senders.push(tokio::spawn(async move {
            let mut n = s * 100_000;
            // Salesforce's retry delay, shortened: a refused send is tried again on the next
            // tick, or never once the test stops sending.
            let mut retry = tokio::time::interval(Duration::from_millis(50));
            retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !sending.is_cancelled() {
                let r = client
                    .post(&url)
                    .header("Content-Type", "text/xml; charset=utf-8")
                    .body(removal(n))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => {
                        acked.lock().unwrap().insert(n);
                        n += 1;
                    }
                    _ => {
                        refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        retry.reset();
                        tokio::select! {
                            _ = retry.tick() => {}
                            _ = sending.cancelled() => break,
                        }
                    }
                }
            }
        }));
    }
    let count = |acked: &Arc<Mutex<HashSet<u32>>>| acked.lock().unwrap().len();
    eventually(Duration::from_secs(20), "40 acknowledgements", || async {
        count(&acked) >= 40
    })
    .await;

    // Act: stop the broker mid-load, then start it again.
    owner.stop_app().await;
    eventually(Duration::from_secs(10), "the gateway refuses", || async {
        refused.load(std::sync::atomic::Ordering::Relaxed) > 0
    })
    .await;
    assert_eq!(
        ready_status(&app).await,
        503,
        "not ready while the broker is down"
    );
    let during_outage = count(&acked);
    owner.start_app().await;
    eventually(
        Duration::from_secs(30),
        "40 more acknowledgements",
        || async { count(&acked) >= during_outage + 40 },
    )
    .await;
    sending.cancel();
    for s in senders {
        s.await.unwrap();
    }

    // Assert: every acknowledged notification reaches Centercode.
    let expected: HashSet<String> = acked
        .lock()
        .unwrap()
        .iter()
        .map(|n| format!("user{n}@example.com"))
        .collect();
    let mut missing = expected.len();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let seen: HashSet<String> = finds(&app).into_iter().collect();
        missing = expected.difference(&seen).count();
        if missing == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // poll with deadline
    }
    stop.cancel();
    let _ = worker.await;
    let sent = finds(&app);
    let unique: HashSet<&String> = sent.iter().collect();
    eprintln!(
        "broker restart: {} acknowledged ({during_outage} before the outage), {} requests refused, \
         {} deliveries for {} notifications",
        expected.len(),
        refused.load(std::sync::atomic::Ordering::Relaxed),
        sent.len(),
        unique.len()
    );
    assert_eq!(
        missing,
        0,
        "{missing} of {} acknowledged notifications never reached Centercode",
        expected.len()
    );
    assert_eq!(ready_status(&app).await, 200);
    drop(app); // deletes the queues while the broker is still ours
    drop(owner);
}

#[tokio::test]
async fn settings_accept_rabbitmq_and_name_the_bad_key() {
    use sf_centercode_relay::settings::Settings;
    let ok = Settings::from_toml("[queue]\nbackend = \"rabbitmq\"\n").expect("defaults are valid");
    assert_eq!(ok.queue.prefix, "relay");
    assert_eq!(ok.worker.prefetch(), 2 * ok.worker.concurrency as u16);
    assert_eq!(ok.queue.confirm_timeout_ms, 5000);
    assert!(ok.queue.redis_url.is_none());
    for (toml, key) in [
        (
            "[queue]\nbackend = \"rabbitmq\"\nurl = \"http://x\"\n",
            "queue.url",
        ),
        (
            "[queue]\nbackend = \"rabbitmq\"\nprefix = \"a b\"\n",
            "queue.prefix",
        ),
        (
            "[queue]\nbackend = \"rabbitmq\"\nconfirm_timeout_ms = 0\n",
            "queue.confirm_timeout_ms",
        ),
        (
            "[queue]\nbackend = \"rabbitmq\"\nredis_url = \"localhost\"\n",
            "queue.redis_url",
        ),
        (
            "[queue]\nbackend = \"rabbitmq\"\n[worker]\nprefetch = 0\n",
            "worker.prefetch",
        ),
        (
            "[queue]\nbackend = \"rabbitmq\"\nqueue_type = \"stream\"\n",
            "queue.queue_type",
        ),
    ] {
        let err = Settings::from_toml(toml).unwrap_err();
        assert!(
            err.key == key || err.to_string().contains(key),
            "{key}: {err}"
        );
    }
}

/// A connection of the test's own to the broker, and a channel on it.
async fn broker_channel(url: &str) -> (lapin::Connection, lapin::Channel) {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    (conn, channel)
}

/// `x-queue-type: quorum` and `x-overflow: reject-publish`, plus `extra`.
fn quorum_args(extra: Option<(&str, i64)>) -> lapin::types::FieldTable {
    use lapin::types::AMQPValue;
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    if let Some((k, v)) = extra {
        args.insert(k.into(), AMQPValue::LongLongInt(v));
    }
    args
}

async fn declare(url: &str, queue: &str, args: lapin::types::FieldTable) -> Result<(), String> {
    let (conn, ch) = broker_channel(url).await;
    let durable = lapin::options::QueueDeclareOptions {
        durable: true,
        ..lapin::options::QueueDeclareOptions::default()
    };
    let result = ch
        .queue_declare(queue, durable, args)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    let _ = conn.close(200, "test").await;
    result
}

#[tokio::test]
async fn the_parked_queue_has_a_delivery_limit_that_listings_never_reach() {
    // RabbitMQ 4.0-4.2 would otherwise drop a parked job after ~20 listings put it back.
    let env = RabbitEnv::new().await;
    let _q = env.open(env.config(&[0.2], true)).await;
    let parked = format!("{}.parked", env.prefix);
    declare(
        &env.url,
        &parked,
        quorum_args(Some(("x-delivery-limit", 1_000_000_000))),
    )
    .await
    .expect("the relay declared exactly these arguments");
    let without = declare(&env.url, &parked, quorum_args(None)).await;
    assert!(
        without.as_ref().is_err_and(|e| e.contains("PRECONDITION")),
        "{without:?}"
    );
}

#[tokio::test]
async fn a_parked_queue_declared_by_an_older_relay_is_kept() {
    let env = RabbitEnv::new().await;
    let parked = format!("{}.parked", env.prefix);
    declare(&env.url, &parked, quorum_args(None)).await.unwrap();
    let q = env.open(env.config(&[0.2], true)).await;
    assert_eq!(q.stats().await.unwrap().parked, 0);
}

#[test]
fn a_redis_dedupe_outlives_the_runtime_its_thread_connection_was_made_on() {
    // Each thread gets its own Redis connection, driven by that thread's runtime. A thread
    // can outlive that runtime; the store must then connect again, not fail forever.
    use sf_centercode_relay::queue::dedupe::{Claim, Dedupe, KeyedJob};
    let url = crate::helpers::redis_url();
    let namespace = format!("relay-test-{}", uuid::Uuid::new_v4().simple());
    let job = |key: &str| KeyedJob {
        key: key.into(),
        job_id: format!("job-{key}"),
        body_hash: None,
    };
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let first = runtime();
    let store = first.block_on(async {
        let ttl = Duration::from_secs(60);
        let store = Dedupe::redis(&url, &namespace, ttl, ttl, Duration::from_secs(2))
            .await
            .expect("Redis at RELAY_TEST_REDIS_URL or 127.0.0.1:6379");
        assert_eq!(
            store.claim(&[job("a")]).await.unwrap(),
            vec![Claim::Claimed]
        );
        store
    });
    drop(first);
    runtime().block_on(async {
        // The first call may meet the dead connection; the next one has a fresh one.
        let _ = store.claim(&[job("b")]).await;
        assert_eq!(
            store.claim(&[job("c")]).await.unwrap(),
            vec![Claim::Claimed]
        );
    });
}

#[tokio::test]
async fn redis_claims_are_exclusive_pending_until_confirmed_and_free_once_abandoned() {
    use sf_centercode_relay::queue::dedupe::{Claim, Dedupe, KeyedJob};
    let url = crate::helpers::redis_url();
    crate::helpers::require_redis(&url).await;
    let namespace = format!("relay-test-{}", uuid::Uuid::new_v4().simple());
    let ttl = Duration::from_secs(60);
    let store = Dedupe::redis(&url, &namespace, ttl, ttl, Duration::from_secs(2))
        .await
        .unwrap();
    let job = |key: &str, id: &str, hash: Option<&str>| KeyedJob {
        key: key.into(),
        job_id: id.into(),
        body_hash: hash.map(str::to_owned),
    };

    let first = store
        .claim(&[job("a", "j1", Some("h1")), job("b", "j2", None)])
        .await
        .unwrap();
    assert_eq!(first, vec![Claim::Claimed, Claim::Claimed]);
    // Another request meets both claims still pending: never "stored" before the confirm.
    let racing = store
        .claim(&[
            job("a", "j3", None),
            job("b", "j4", None),
            job("c", "j5", None),
        ])
        .await
        .unwrap();
    assert_eq!(
        racing,
        vec![
            Claim::Pending {
                job_id: "j1".into()
            },
            Claim::Pending {
                job_id: "j2".into()
            },
            Claim::Claimed
        ]
    );
    store.confirm(&[job("a", "j1", Some("h1"))]).await.unwrap();
    store.abandon(&[job("b", "j2", None)]).await.unwrap();
    // Someone else's claim is not released by an abandon naming another job.
    store.abandon(&[job("c", "j9", None)]).await.unwrap();
    let later = store
        .claim(&[
            job("a", "j6", None),
            job("b", "j7", None),
            job("c", "j8", None),
        ])
        .await
        .unwrap();
    assert_eq!(
        later,
        vec![
            Claim::Stored {
                job_id: "j1".into(),
                body_hash: Some("h1".into())
            },
            Claim::Claimed,
            Claim::Pending {
                job_id: "j5".into()
            }
        ]
    );
}

#[tokio::test]
async fn a_broker_nack_is_an_error_and_releases_the_claim() {
    // Arrange: an operator's length limit on the work queue; with `reject-publish` the broker
    // nacks publishes once the queue is full.
    let env = RabbitEnv::new().await;
    let q = env.open(env.config(&[0.2], true)).await;
    let work = format!("{}.work", env.prefix);
    let policy = format!("{}-limit", env.prefix);
    let ctl = |args: Vec<String>| async move {
        let out = tokio::process::Command::from(crate::services::rabbitmqctl())
            .args(&args)
            .output()
            .await
            .expect("rabbitmqctl runs");
        assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let applied = |want: bool| {
        let (work, policy) = (work.clone(), policy.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let listing = ctl(vec![
                    "list_queues".into(),
                    "-q".into(),
                    "name".into(),
                    "policy".into(),
                ])
                .await;
                let now = listing
                    .lines()
                    .any(|l| l.split_whitespace().eq([work.as_str(), policy.as_str()]));
                if now == want {
                    return;
                }
                assert!(Instant::now() < deadline, "policy {policy} applied: {now}");
                tokio::time::sleep(Duration::from_millis(100)).await; // poll with deadline
            }
        }
    };
    ctl(vec![
        "set_policy".into(),
        "--apply-to".into(),
        "queues".into(),
        "--priority".into(),
        "100".into(),
        policy.clone(),
        format!("^{}$", work.replace('.', "\\.")),
        r#"{"max-length":1}"#.into(),
    ])
    .await;
    applied(true).await;
    let job = |key: &str| removal_job(&format!("{}-{key}", env.prefix));

    // Act: publish until the broker refuses one.
    let mut refused = None;
    for i in 0..10 {
        let next = job(&i.to_string());
        match q.enqueue(vec![next.clone()]).await {
            Ok(_) => continue,
            Err(e) => {
                refused = Some((next, e, i));
                break;
            }
        }
    }

    // Assert: the refusal is an error (the gateway answers 503), not a stored job.
    let (refused, error, stored) = refused.expect("the broker nacked a publish to the full queue");
    assert!(
        matches!(&error, QueueError::Broker(m) if m.contains("nack")),
        "{error:?}"
    );
    // Room again once a worker drained the queue: the same notification is stored, not held
    // back by its own failed claim.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut drained = 0;
    while drained < stored {
        for leased in q.lease(10, Vec::new()).await.unwrap() {
            q.ack(&leased).await.unwrap();
            drained += 1;
        }
        assert!(Instant::now() < deadline, "drained {drained} jobs");
    }
    let again = q.enqueue(vec![refused]).await;
    ctl(vec!["clear_policy".into(), policy.clone()]).await;
    assert!(
        matches!(again.as_deref(), Ok([EnqueueOutcome::Stored])),
        "{again:?}"
    );
}

/// A removal callout job with this dedupe key.
fn removal_job(dedupe_key: &str) -> NewJob {
    NewJob {
        received_at_ms: 0,
        id: uuid::Uuid::new_v4().to_string(),
        route: "gdpr".into(),
        action: Action::RemoveUser,
        dedupe_key: Some(dedupe_key.into()),
        body_hash: None,
        org_id: None,
        notification_id: None,
        record_id: None,
        job: Job::CalloutV1 {
            idempotency_key: None,
            body: serde_json::json!({}),
        },
    }
}

#[tokio::test]
async fn a_confirm_that_never_comes_is_an_error_and_releases_the_claim() {
    // Arrange: the queue reaches the broker through a proxy that can hold back its answers.
    let env = RabbitEnv::new().await;
    let broker = crate::helpers::broker_address(&env.url);
    let proxy = Proxy::start(&broker).await;
    let mut config = env.config(&[0.2], true);
    config.url = env
        .url
        .replacen(&broker, &format!("127.0.0.1:{}", proxy.port), 1)
        .into();
    config.confirm_timeout = Duration::from_millis(500);
    let q = env.open(config).await;
    let job = removal_job(&format!("{}-late", env.prefix));

    // Act: the publish goes out, its confirm does not come back in time.
    proxy.hold_replies(true);
    let result = tokio::time::timeout(Duration::from_secs(10), q.enqueue(vec![job.clone()])).await;
    proxy.hold_replies(false);
    let result = result.expect("the enqueue gives up by itself, well before 10 s");

    // Assert: an error (the gateway answers 503 and Salesforce sends it again), and the claim
    // is released, so the redelivery is stored rather than held back as "in progress".
    assert!(
        matches!(&result, Err(QueueError::Broker(m)) if m.contains("no publisher confirm")),
        "{result:?}"
    );
    let again = q.enqueue(vec![job]).await;
    assert!(
        matches!(again.as_deref(), Ok([EnqueueOutcome::Stored])),
        "{again:?}"
    );
}
