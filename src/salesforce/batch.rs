//! Coalesces ready upserts of one sObject into sObject Collections calls (up to
//! `salesforce.batch_size` records each, `allOrNone=false`) and hands each job its own
//! record's result. Whatever is waiting when a call slot frees goes in the next call, so a
//! lone job is sent at once and a backlog goes 200 records per request.

use super::{SalesforceClient, WriteResult};
use crate::mapping::SalesforceUpsert;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot, Semaphore};

struct Pending {
    record: SalesforceUpsert,
    reply: oneshot::Sender<WriteResult>,
}

/// One queue per (sObject, external id field), sharing `calls` concurrent requests.
pub struct Batcher {
    client: Arc<SalesforceClient>,
    calls: Arc<Semaphore>,
    lanes: Mutex<HashMap<(String, String), mpsc::UnboundedSender<Pending>>>,
}

impl Batcher {
    /// `concurrency` requests to Salesforce at once, across every sObject.
    pub fn new(client: Arc<SalesforceClient>, concurrency: usize) -> Self {
        Self {
            client,
            calls: Arc::new(Semaphore::new(concurrency.max(1))),
            lanes: Mutex::default(),
        }
    }

    pub fn client(&self) -> &Arc<SalesforceClient> {
        &self.client
    }

    /// Upsert `record`, alone or with others of its sObject; its own result.
    pub async fn upsert(&self, record: SalesforceUpsert) -> WriteResult {
        let (reply, answer) = oneshot::channel();
        let key = (record.sobject.clone(), record.external_id_field.clone());
        let mut pending = Pending { record, reply };
        for _ in 0..2 {
            let lane = {
                let mut lanes = self.lanes.lock().unwrap();
                lanes
                    .entry(key.clone())
                    .or_insert_with(|| self.spawn_lane())
                    .clone()
            };
            match lane.send(pending) {
                Ok(()) => break,
                Err(mpsc::error::SendError(back)) => {
                    // The lane's task ended (runtime shutting down): start a new one once.
                    self.lanes.lock().unwrap().remove(&key);
                    pending = back;
                }
            }
        }
        answer.await.unwrap_or_else(|_| WriteResult {
            outcome: super::WriteOutcome::Transient {
                status: None,
                reason: "the Salesforce batch was cancelled before it was sent".into(),
            },
            status: None,
            excerpt: None,
        })
    }

    fn spawn_lane(&self) -> mpsc::UnboundedSender<Pending> {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run_lane(self.client.clone(), self.calls.clone(), rx));
        tx
    }
}

/// Take a call slot, then everything waiting (up to the batch size), send, repeat. A record
/// whose external id is already in the batch waits for the next call: Salesforce refuses
/// every record of a Collections call that names one external id twice.
async fn run_lane(
    client: Arc<SalesforceClient>,
    calls: Arc<Semaphore>,
    mut rx: mpsc::UnboundedReceiver<Pending>,
) {
    let max = client.batch_size().max(1);
    let mut held_back: VecDeque<Pending> = VecDeque::new();
    loop {
        let first = match held_back.pop_front() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let Ok(permit) = calls.clone().acquire_owned().await else {
            return;
        };
        // Gathered after the slot is free: what piled up while every slot was busy goes now.
        let mut ids = HashSet::from([first.record.external_id.clone()]);
        let mut batch = vec![first];
        let mut again = VecDeque::new();
        while batch.len() < max {
            let next = match held_back.pop_front() {
                Some(p) => p,
                None => match rx.try_recv() {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            if ids.insert(next.record.external_id.clone()) {
                batch.push(next);
            } else {
                again.push_back(next);
            }
        }
        again.extend(held_back.drain(..));
        held_back = again;
        let client = client.clone();
        tokio::spawn(async move {
            let records: Vec<&SalesforceUpsert> = batch.iter().map(|p| &p.record).collect();
            let results = client.upsert_many(&records).await;
            drop(permit);
            for (pending, result) in batch.into_iter().zip(results) {
                let _ = pending.reply.send(result);
            }
        });
    }
}
