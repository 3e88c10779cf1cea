//! Test fixtures shared by the store's unit tests: records of a known shape, written through
//! the real write path.
//!
//! Records are struct literals here rather than built by the typed constructors: the tests
//! need exact times and ids, and code inside `outcome` is where a record may be built field by
//! field.

use std::path::Path;

use super::{Reader, Store, StoreOptions};
use crate::outcome::{BizCode, Code, Record};

/// Record `i` at `time_ms`: two products, three devices, and a service type that follows the
/// code.
pub(crate) fn record(i: usize, time_ms: i64, code: Code) -> Record {
    Record {
        time_ms,
        trace_id: format!("t{i}"),
        message_id: format!("m{i}"),
        product_key: format!("p{}", i % 2),
        device_name: format!("d{}", i % 3),
        biz_code: if code.is_success() {
            BizCode::Uplink
        } else {
            BizCode::RuleEngine
        },
        operation: format!("/p{}/d{}/post", i % 2, i % 3),
        code,
        reason: String::new(),
        content: format!("{{\"i\":{i}}}"),
        tenant_id: String::new(),
        instance_id: String::new(),
    }
}

/// Record times are `base() + i`: recent, so the retention at open keeps them.
pub(super) fn base() -> i64 {
    static BASE: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *BASE.get_or_init(|| crate::message::now_ms() - 1_000_000)
}

/// A store at `dir/o.db` holding records `0..n` (every fourth a 9325), committed.
pub(super) async fn filled(dir: &Path, n: usize) -> (Store, Reader) {
    let store = Store::open(&dir.join("o.db"), StoreOptions::default(), None).unwrap();
    let tx = store.sender();
    for i in 0..n {
        let code = if i % 4 == 0 {
            Code::DestinationUnavailable
        } else {
            Code::Ok
        };
        tx.send(record(i, base() + i as i64, code)).await.unwrap();
    }
    store.flush().await.unwrap();
    let reader = store.reader().unwrap();
    (store, reader)
}
