//! Arbitrary bytes into the Outbound Message SOAP parser.
//!
//! Checks: `parse_outbound_message` never panics (no index/slice/overflow panics, no
//! `unwrap` on hostile input), never overflows the stack, finishes well inside libFuzzer's
//! `-timeout` whatever the nesting or entity tricks, and that an accepted message keeps the
//! invariants the parser documents.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use sf_centercode_relay::inbound::soap::{parse_outbound_message, MAX_NOTIFICATIONS};

fuzz_target!(|data: &[u8]| {
    match parse_outbound_message(data) {
        Ok(msg) => {
            // At least one Notification, at most the WSDL's maxOccurs.
            assert!(!msg.notifications.is_empty(), "Ok with no notifications");
            assert!(
                msg.notifications.len() <= MAX_NOTIFICATIONS,
                "Ok with {} notifications",
                msg.notifications.len()
            );
            // Duplicate Notification Ids are dropped after the first.
            let mut ids = HashSet::new();
            for n in &msg.notifications {
                assert!(ids.insert(n.id.as_str()), "duplicate Notification Id kept");
                assert!(!n.sobject_type.is_empty(), "empty sObject type");
            }
        }
        Err(e) => {
            // Every error has a stable code and a fixed message.
            assert!(!e.code().is_empty());
            assert!(!e.to_string().is_empty());
        }
    }
});
